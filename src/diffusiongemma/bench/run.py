"""`diffusiongemma bench`: this engine against the reference (transformers 5.23.0
`DiffusionGemmaForBlockDiffusion.generate`) on the same checkpoint, prompts and sampler settings.

Each side runs in its own fresh process, alternating (ours, reference, ours, reference, ...): the
first generation of a process is the warm-up and gives the peak memory above the loaded weights;
the following ones are timed. The table shows medians over processes and the ratio of each figure
(ours / reference for rates, reference / ours for times: above 1 means we are better).

Modes: `adaptive` (the released sampler with adaptive stopping) and `fixed` (exactly --steps
denoising steps per canvas on both sides: the confidence threshold is set to 1e-30 so the stopping
rule never fires). `--size` builds a random checkpoint of a named size (tiny, mid, release-shaped)
in the release format under ~/.cache/diffusiongemma, so the figures can be reproduced without a
download. With a checkpoint that has a tokenizer (the shipped model), prompts come from the held-out
task families and the exact-match rate of both sides is reported beside the speed.

`--compile` runs our side with the compiled step runner (`Engine(runner="compiled")`); the compile happens in
the process's first generation, whose time is its own row, and the compiler's memory counts in the
peak. `--same-draws` makes the reference draw the engine's keyed random numbers (`bench.same_draws`),
so in adaptive mode both sides stop each canvas after the same steps and tokens/s compares like for like.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..loader.host import cpu_capability, matmul_rates, preferred_dtype
from ..loader.random_weights import SIZES, write_random_checkpoint
from . import curves, roofline
from .memory import rss_bytes

CACHE = Path(os.environ.get("DIFFUSIONGEMMA_CACHE", Path.home() / ".cache" / "diffusiongemma"))
METRICS = [  # (key, label, better): "higher" rates, "lower" times
    ("tokens_per_s", "tokens/s", "higher"),
    ("ms_per_token", "ms per generated token", "lower"),
    ("tokens_per_pass", "tokens per pass (any forward)", "same"),
    ("tokens_per_forward", "tokens per forward", "same"),
    ("steps_per_canvas", "steps per canvas", "same"),
    ("ms_step", "ms per denoising step (forward + sampler)", "lower"),
    ("ms_decoder_forward", "ms per decoder forward", "lower"),
    ("ms_sampler", "ms of sampler work per step", "lower"),
    ("ms_commit", "ms per commit forward", "lower"),
    ("ttft_s", "time to first committed token (s)", "lower"),
    ("warmup_s", "first generation (s): warm-up, compile", "lower"),
    ("peak_mem_above_weights_MiB", "peak memory above weights (MiB)", "lower"),
    ("weights_MiB", "weights in memory (MiB)", "same"),
    ("exact_match", "exact match (task prompts)", "same"),
]


def _prompts(model_dir: Path, n: int, vocab: int):
    """(ids, expected answer or None) per prompt."""
    if (model_dir / "tokenizer.json").is_file():  # the tokenizer and template only: no second copy of the weights
        from ..generation import PromptBuilder
        from ..text.chat import ChatTemplate
        from ..text.tokenizer import Tokenizer
        from ..training import tasks

        tok = Tokenizer.from_dir(model_dir)
        prompts = PromptBuilder(tok, ChatTemplate.from_dir(model_dir, tok.special_tokens_map()))
        out = []
        for i in range(n):
            fam = tasks.FAMILIES[i % 4]  # the single-turn families
            t = (ex := tasks.make_example(fam, tasks.EVAL_SEEDS.start + 777 + i)).turns[0]
            out.append((prompts.chat(t.messages, t.tools, t.thinking).ids, ex.answer))
        return out, tok
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(10, vocab, (32,), generator=g).tolist(), None) for _ in range(n)], None


def _answer_ok(tok, ids, expected) -> bool | None:
    if tok is None or expected is None:
        return None
    from ..generation import parse_ids

    return parse_ids(tok, ids).content.strip() == expected


def _touch(params) -> int:
    total = 0
    for p in params:
        total += p.numel() * p.element_size()
        p.data.reshape(-1).view(torch.uint8).sum()  # page the (possibly memory-mapped) weights in before the baseline
    return total


def worker(side: str, a) -> dict:
    from .memory import peak_during

    torch.manual_seed(0)
    model_dir = Path(a.model)
    dtype = getattr(torch, a.dtype)
    fixed = a.mode == "fixed"
    if side == "ours":
        import diffusiongemma as dg

        from ..engine import Engine, SamplingParams

        ck = dg.load(model_dir, dtype=dtype, vision=False, text=False)  # what the reference side loads: text
        weights = _touch([*ck.model.parameters(), *ck.model.buffers()])  # quantized weights are buffers
        vocab, L, stops = ck.config.text.vocab_size, ck.config.canvas_length, ck.generation_config.eos_token_id
        engine = Engine.from_checkpoint(ck, runner="compiled" if a.compile else "eager")
        engine.timings.enabled = True

        def generate(ids, seed):
            params = SamplingParams(max_tokens=a.max_tokens, seed=seed, max_denoising_steps=a.steps if fixed else None,
                                    confidence_threshold=1e-30 if fixed else None, decoding=a.decoding)
            c = engine.generate([ids], params)[0]
            st = c.stats
            return {"tokens": st.counted_tokens, "forwards": st.decoder_forwards, "steps": st.steps_per_canvas,
                    "ttft": st.ttft_s, "ids": c.token_ids, "passes": st.decoder_forwards + st.commit_forwards}

        def phase_ms():
            t = engine.timings
            return {"ms_decoder_forward": t.ms_per_call("decoder"),
                    "ms_sampler": t.ms_per_step("vocabulary", "sampler"),
                    "ms_step": t.ms_per_step("decoder", "vocabulary", "sampler"), "ms_commit": t.ms_per_call("commit"),
                    "ms_vocabulary": t.ms_per_call("vocabulary")}

        reset = engine.timings.reset
    else:
        from transformers import DiffusionGemmaForBlockDiffusion
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen_mod

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(model_dir), dtype=dtype).eval()
        weights = _touch(model.parameters())
        vocab, L = model.config.text_config.vocab_size, model.config.canvas_length
        stops = list(model.generation_config.eos_token_id or [])
        clock: dict[str, list[float]] = {"decoder": [], "step": [], "encoder": [], "first": []}
        fwd, enc = model.forward, model.model.encoder.forward
        step_fn, fin_fn = gen_mod.DiffusionGemmaGenerationMixin._denoising_step, \
            gen_mod.DiffusionGemmaGenerationMixin._finalize_canvas

        def timed(fn, key):
            def wrapper(*x, **k):
                t0 = time.perf_counter()
                out = fn(*x, **k)
                clock[key].append(time.perf_counter() - t0)
                return out
            return wrapper

        model.forward = timed(fwd, "decoder")
        model.model.encoder.forward = timed(enc, "encoder")
        gen_mod.DiffusionGemmaGenerationMixin._denoising_step = timed(step_fn, "step")

        def finalize(*x, **k):
            if not clock["first"]:
                clock["first"].append(time.perf_counter())
            return fin_fn(*x, **k)

        gen_mod.DiffusionGemmaGenerationMixin._finalize_canvas = staticmethod(finalize)
        same = None
        if a.same_draws:  # the reference draws our keyed random numbers: same decisions, same forwards
            from .same_draws import SameDraws

            same = SameDraws([0], L, vocab, a.steps if fixed else model.generation_config.max_denoising_steps,
                             keep_cost=True)  # its own draws still run (discarded): it keeps its own sampling cost
            same.install()

        def generate(ids, seed):
            torch.manual_seed(seed)
            if same is not None:
                same.reset([seed])
            clock["first"].clear()
            n_step, n_enc = len(clock["step"]), len(clock["encoder"])
            t0 = time.perf_counter()
            kw = dict(max_new_tokens=a.max_tokens)
            if fixed:
                kw.update(max_denoising_steps=a.steps, confidence_threshold=1e-30)
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), **kw)
            new = out.sequences[0, len(ids):].tolist()
            cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
            forwards = len(clock["step"]) - n_step
            canvases = max(1, -(-len(new) // L))
            return {"tokens": sum(1 for t in new[:cut] if t != 0), "forwards": forwards,
                    "passes": forwards + len(clock["encoder"]) - n_enc, "steps": [forwards / canvases] * canvases,
                    "ttft": (clock["first"][0] - t0) if clock["first"] else None, "ids": new[:cut]}

        def phase_ms():
            n = max(len(clock["decoder"]), 1)
            step = sum(clock["step"])
            dec = sum(clock["decoder"])
            enc_calls = clock["encoder"][1:] if len(clock["encoder"]) > 1 else clock["encoder"]
            return {"ms_decoder_forward": 1000 * dec / n, "ms_sampler": 1000 * (step - dec) / n,
                    "ms_step": 1000 * step / n,
                    "ms_commit": 1000 * statistics.mean(enc_calls) if enc_calls else 0.0}

        def reset():
            for v in clock.values():
                v.clear()

    prompts, tok = _prompts(model_dir, a.prompts, vocab)
    first: list[float] = []  # seconds of the process's first generation (one prompt): warm-up, or compile

    def timed_first(ids, seed):
        t = time.perf_counter()
        out = generate(ids, seed)
        if not first:
            first.append(time.perf_counter() - t)
        return out

    base = rss_bytes()  # with --compile the compiler's own memory counts in the peak: a user pays it too
    cold, peak = peak_during(lambda: [timed_first(ids, 1000 + i) for i, (ids, _) in enumerate(prompts)])
    reset()
    runs, t0 = [], time.perf_counter()
    for i, (ids, _) in enumerate(prompts):
        runs.append(generate(ids, 2000 + i))
    wall = time.perf_counter() - t0
    phases = phase_ms()
    tokens, forwards = sum(r["tokens"] for r in runs), sum(r["forwards"] for r in runs)
    passes = sum(r["passes"] for r in runs)
    ok = [_answer_ok(tok, r["ids"], exp) for r, (_, exp) in zip(runs + cold, prompts * 2)]
    ok = [x for x in ok if x is not None]
    steps = [s for r in runs for s in r["steps"]]
    return {"side": side, "tokens_per_s": tokens / wall, "ms_per_token": 1000 * wall / max(tokens, 1),
            "tokens_per_forward": tokens / max(forwards, 1), "tokens_per_pass": tokens / max(passes, 1),
            "steps_per_canvas": statistics.mean(steps) if steps else 0.0,
            "ttft_s": statistics.median(r["ttft"] for r in runs if r["ttft"] is not None),
            "peak_mem_above_weights_MiB": max(peak, rss_bytes() - base) / 2**20, "weights_MiB": weights / 2**20,
            "exact_match": (sum(ok) / len(ok)) if ok else None, "warmup_s": first[0], "tokens": tokens, "forwards": forwards,
            "wall_s": wall, **phases}


def _checkpoint(a) -> Path:
    if a.model:
        return Path(a.model)
    path = CACHE / f"random-{a.size}-{a.dtype}"
    if not (path / "model.safetensors").is_file():
        print(f"writing a random {a.size} checkpoint to {path} ...", file=sys.stderr)
        write_random_checkpoint(path, a.size, getattr(torch, a.dtype))
    return path


def _checkpoint_once(a) -> Path:
    """The random checkpoint, written by rank 0 only (the others wait for it) under torchrun."""
    path = CACHE / f"random-{a.size}-{a.dtype}"
    done = path / ".written"
    if os.environ.get("RANK", "0") == "0":
        _checkpoint(a)
        done.touch()
        return path
    while not done.is_file() or not (path / "model.safetensors").is_file():
        time.sleep(1)
    return path


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffusiongemma bench", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory")
    src.add_argument("--size", choices=list(SIZES), default="tiny", help="random checkpoint of a named size")
    ap.add_argument("--dtype", choices=["host", "bfloat16", "float32"], default="host",
                    help="both sides' dtype (default host: float32 or bfloat16, whichever this CPU multiplies faster, "
                         "measured once here; a CPU without bf16 kernels runs bf16 many times slower)")
    ap.add_argument("--mode", choices=["adaptive", "fixed"], default="adaptive")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per canvas in fixed mode")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per process (run one after another)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per prompt (default: one canvas)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per side, alternating")
    ap.add_argument("--compile", action="store_true",
                    help="our side runs the compiled step runner (Engine(runner='compiled')); the compile is in the warm-up")
    ap.add_argument("--same-draws", action="store_true",
                    help="the reference draws the engine's keyed random numbers (same seeds): both sides then take "
                         "the same path, so tokens per forward match and tokens/s compares like for like")
    ap.add_argument("--decoding", choices=["diffusion", "speculative", "autoregressive"], default="diffusion",
                    help="our side's decoding mode (the reference has only diffusion: its released sampler)")
    ap.add_argument("--quant", choices=["int8", "int4", "fp8", "mixed"],
                    help="a random checkpoint of --size written directly in this quantized format (cached), loaded "
                         "memory-mapped, one canvas of --steps denoising steps: size, load time, peak memory, time "
                         "per step and per commit (no reference side: see bench.release)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="with --quant: the int4 group size (default: the largest of 128, 64, 32 that fits the size)")
    ap.add_argument("--profile", action="store_true", help="with --quant: the top operators of one decoder step")
    curves.add_arguments(ap)
    tp = ap.add_argument_group("tensor parallel (under torchrun --nproc-per-node N; bench.parallel)")
    tp.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                    help="shard the model over N processes: ms per step and per commit against one process, bytes "
                         "per step by collective, weight memory per rank")
    tp.add_argument("--expert-parallel", action="store_true", help="with --tensor-parallel: whole experts per rank")
    tp.add_argument("--context-tokens", type=int, default=512, help="with --tensor-parallel: committed prompt tokens")
    ap.add_argument("--sides", default="ours,reference", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.dtype == "host":  # resolved once, here: the workers, the cache name and the report see a real dtype
        a.dtype = str(preferred_dtype()).removeprefix("torch.")
        if not a.worker:
            r = matmul_rates()
            print(f"dtype {a.dtype} (this CPU, {cpu_capability()}: {r['float32']:.0f} GFLOP/s float32, "
                  f"{r['bfloat16']:.1f} bfloat16 for a small product)", file=sys.stderr)
    if a.quant:
        from .release import run

        if a.model:
            ap.error("--quant writes its own random checkpoint of --size; quantize a model with diffusiongemma quantize")
        return run(a, CACHE)
    if a.tensor_parallel > 1:
        from . import parallel

        return parallel.run(a, Path(a.model) if a.model else _checkpoint_once(a))
    model_dir = _checkpoint(a)
    a.model = str(model_dir)
    if a.curve:
        from . import prefix

        torch.set_num_threads(os.cpu_count() or 1)
        a.sides = a.sides.split(",")
        return (prefix if a.curve == "prefix" else curves).run(a, model_dir, Path(a.out))
    if a.max_tokens is None:
        a.max_tokens = json.loads((model_dir / "config.json").read_text()).get("canvas_length", 256)
    if a.worker:
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(worker(a.worker, a)))
        return 0

    sides = a.sides.split(",")
    if "reference" in sides and "quantization_config" in json.loads((model_dir / "config.json").read_text()):
        # transformers' DiffusionGemma cannot read quantized (per-expert) weights: our side alone
        print("the checkpoint is quantized, which the reference cannot load: measuring our side only", file=sys.stderr)
        sides = [s for s in sides if s != "reference"]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(a.repeats):
        for side in sides:
            cmd = [sys.executable, "-m", "diffusiongemma.bench.run", "--worker", side, "--model", a.model,
                   "--dtype", a.dtype, "--mode", a.mode, "--steps", str(a.steps), "--prompts", str(a.prompts),
                   "--max-tokens", str(a.max_tokens), "--decoding", a.decoding] + (["--compile"] if a.compile else []) + (
                       ["--same-draws"] if a.same_draws else [])
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the {side} worker failed")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  run {r + 1}/{a.repeats} {side}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    med = {s: {k: statistics.median(x[k] for x in rows) if all(x.get(k) is not None for x in rows) else None
               for k, _, _ in METRICS + [("ms_vocabulary", "", "")] if k in rows[0]} for s, rows in results.items()}
    import transformers

    env = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "cpu_capability": cpu_capability(),
           "transformers": transformers.__version__, "dtype": a.dtype, "mode": a.mode,
           "steps": a.steps if a.mode == "fixed" else "adaptive (cap 48)", "model": a.model,
           "max_tokens": a.max_tokens, "prompts": a.prompts, "repeats": a.repeats, "compile": a.compile,
           "same_draws": a.same_draws, "decoding": a.decoding}
    print(f"checkpoint {a.model} | {a.dtype} | mode {a.mode}"
          f"{f' ({a.steps} steps)' if a.mode == 'fixed' else ''}{' | ours compiled' if a.compile else ''}"
          f"{' | same draws' if a.same_draws else ''}"
          f"{f' | ours {a.decoding}' if a.decoding != 'diffusion' else ''} | "
          f"{a.prompts} prompts x {a.max_tokens} tokens | "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs")
    print(f"{'':42} {'ours':>12} {'reference':>12} {'ratio':>8}")
    ratios = {}
    for key, label, better in METRICS:
        o, r = med.get("ours", {}).get(key), med.get("reference", {}).get(key)
        ratio = None
        if o is not None and r is not None and o and r:
            ratio = o / r if better == "higher" else r / o if better == "lower" else o / r
        ratios[key] = ratio
        print(f"{label:42} {_fmt(o):>12} {_fmt(r):>12} {(_fmt(ratio) + 'x') if ratio else '-':>8}")
    roof = roofline.report(model_dir, a, med)
    print(json.dumps({"bench": {"env": env, "ours": med.get("ours"), "reference": med.get("reference"),
                                "ratio": ratios, "roofline": roof, "runs": results}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
