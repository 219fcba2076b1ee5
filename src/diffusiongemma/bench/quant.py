"""Quantized weights measured: quality beside speed and memory, every scheme beside its full-precision baseline
in the same run.

    python -m diffusiongemma.bench.quant quality [--n 50] [--families arithmetic,sort,reverse,count,tools]
    python -m diffusiongemma.bench.quant mid [--repeat 7]

quality: the shipped model per family (exact match, steps per canvas) in fp32 and bf16 and quantized int8, int4
    and mixed (group 32: the shipped model's widths are 96 and 192), activations in bf16.
mid: the mid random checkpoint (hidden 1024, 8 layers, 32 experts, the real vocabulary), bf16 vs each scheme:
    one decoder step's logit error (max, RMS, argmax agreement), ms per denoising step (decoder forward and the
    vocabulary pass over a 256-token canvas, median and interquartile range) and weight memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..loader import default_model_dir, load
from ..loader.random_weights import write_random_checkpoint
from ..loader.write_quantized import Recipe, quantize_checkpoint
from ..sampling.vocab import vocab_pass
from .quant_kernels import host, time_ms
from .run import CACHE

SCHEMES = ("int8", "int4", "mixed", "fp8")


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def quality(a) -> dict:
    from ..training.evaluate import evaluate

    src = Path(a.model or default_model_dir())
    out = {}
    variants = [("fp32", src, "float32"), ("bf16", src, "bfloat16")]
    for s in a.schemes.split(","):
        d = CACHE / f"shipped-{s}-g32"
        quantize_checkpoint(src, d, Recipe.named(s, group_size=32), dtype="bfloat16")
        variants.append((s, d, "bfloat16"))
    for name, path, dtype in variants:
        ck = load(path, dtype=dtype, vision=False)
        t0 = time.perf_counter()
        res = evaluate(ck, n=a.n, families=a.families.split(","), seed=a.seed, progress=False)
        res.pop("text", None)
        out[name] = {f: {"exact_match": r["exact_match"], "steps_per_canvas": round(r["steps_per_canvas_mean"], 3)}
                     for f, r in res.items()}
        out[name]["weight_MiB"] = round(weight_bytes(ck.model) / 2**20, 2)
        print(f"{name:6} {time.perf_counter() - t0:6.0f} s  " + "  ".join(
            f"{f} {r['exact_match']:.0%} ({r['steps_per_canvas']:.2f} steps)" for f, r in out[name].items()
            if isinstance(r, dict)), flush=True)
    return out


def _step(model, canvas, cache, soft):
    hidden = model.decode(canvas, [cache], soft)
    n = canvas.shape[0]
    return vocab_pass(hidden, model.embed_tokens.weight, model.config.final_logit_softcapping,
                      torch.ones(n), torch.rand(n), True, model.embed_scale())


def _time(fn, repeat):
    med, iqr = time_ms(fn, repeat)
    return round(med, 1), round(iqr, 1)


@torch.no_grad()
def mid(a) -> dict:
    src = CACHE / "random-mid-bfloat16"
    if not (src / "model.safetensors").is_file():
        print(f"writing the mid random checkpoint to {src} ...", file=sys.stderr)
        write_random_checkpoint(src, "mid", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    base = load(src, dtype="bfloat16").model
    vocab, length = base.config.vocab_size, 256
    prompt = torch.randint(0, vocab, (64,), generator=g)
    canvas = torch.randint(0, vocab, (length,), generator=g)
    soft = torch.randn(length, base.config.hidden_size, generator=g).bfloat16() * 0.02

    def measure(model):
        cache = model.new_cache()
        model.encode(prompt, [cache])
        logits = model.logits(model.decode(canvas, [cache], soft)).float()
        return logits, _time(lambda: _step(model, canvas, cache, soft), a.repeat)

    ref_logits, ref_ms = measure(base)
    ref_bytes = weight_bytes(base)
    out = {"bf16": {"step_ms": ref_ms[0], "step_iqr_ms": ref_ms[1], "weight_GiB": round(ref_bytes / 2**30, 3)}}
    del base
    # the scale of the errors below: bf16's own rounding against fp32 (a random model amplifies any perturbation)
    full = load(src, dtype="float32").model
    cache = full.new_cache()
    full.encode(prompt, [cache])
    f32 = full.logits(full.decode(canvas, [cache], soft.float())).float()
    del full
    err = ref_logits - f32
    out["bf16"].update({"vs_fp32_rms_logit_error": round(err.pow(2).mean().sqrt().item(), 5),
                        "vs_fp32_argmax_agreement": round((ref_logits.argmax(-1) == f32.argmax(-1)).float().mean().item(), 4)})
    print(f"bf16    step {ref_ms[0]:7.1f} ms (IQR {ref_ms[1]})  weights {ref_bytes / 2**30:.3f} GiB  against fp32: RMS logit "
          f"error {out['bf16']['vs_fp32_rms_logit_error']}, argmax {out['bf16']['vs_fp32_argmax_agreement']:.1%}",
          flush=True)
    for s in a.schemes.split(","):
        d = CACHE / f"mid-{s}"
        if not (d / "config.json").is_file():
            quantize_checkpoint(src, d, Recipe.named(s), dtype="bfloat16")
        model = load(d, dtype="bfloat16").model
        logits, ms = measure(model)
        err = logits - ref_logits
        nbytes = weight_bytes(model)
        row = {"max_logit_error": round(err.abs().max().item(), 4),
               "rms_logit_error": round(err.pow(2).mean().sqrt().item(), 5),
               "logit_rms": round(ref_logits.pow(2).mean().sqrt().item(), 5),
               "argmax_agreement": round((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(), 4),
               "step_ms": ms[0], "step_iqr_ms": ms[1], "step_vs_bf16": round(ms[0] / ref_ms[0], 2),
               "weight_GiB": round(nbytes / 2**30, 3), "weight_vs_bf16": round(nbytes / ref_bytes, 3)}
        out[s] = row
        print(f"{s:7} step {ms[0]:7.1f} ms (IQR {ms[1]}, {row['step_vs_bf16']}x)  weights {row['weight_GiB']} GiB "
              f"({row['weight_vs_bf16']}x)  logits: max err {row['max_logit_error']}, RMS {row['rms_logit_error']} "
              f"(logit RMS {row['logit_rms']}), argmax {row['argmax_agreement']:.1%}", flush=True)
        del model
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quality", "mid"])
    ap.add_argument("--model", help="quality: the full-precision model (default: the shipped one)")
    ap.add_argument("--n", type=int, default=50, help="quality: items per family")
    ap.add_argument("--families", default="arithmetic,sort,reverse,count,tools")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--repeat", type=int, default=7, help="mid: timed steps per scheme")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    print(f"host: {host()}", flush=True)
    res = quality(a) if a.what == "quality" else mid(a)
    if a.json:
        Path(a.json).write_text(json.dumps({"host": host(), a.what: res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
