"""The release shape, quantized, on this machine: `diffusiongemma bench --size release --quant int4|mixed`.

Writes once (cached under ~/.cache/diffusiongemma) a random checkpoint of the full release configuration (30
layers, 128 experts top-8 plus the dense MLP, hidden 2816, vocabulary 262,144, canvas 256: 25.2 B parameters)
directly in the quantized format, tensor by tensor (never whole in memory, never a bf16 copy on disk); then, in
a fresh process, loads it (the safetensors files memory-mapped) and denoises one canvas with a fixed number of
steps through the ordinary engine path (`Engine.generate`: prefill, denoising steps, commit). Reports the size on
disk, load time, resident memory after loading and at peak, seconds per denoising step and per commit, where
the time goes (engine phases, and with --profile the top operators of one decoder step). There is no reference
side: the reference cannot hold this model in this machine's memory.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..loader.random_weights import size_config
from ..loader.write_quantized import Recipe, write_random_quantized
from .memory import rss_bytes


def checkpoint(cache: Path, size: str, quant: str, group_size: int) -> Path:
    path = cache / f"random-{size}-{quant}-g{group_size}"
    if not (path / "config.json").is_file():
        print(f"writing a random {size} checkpoint ({quant}) to {path} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        write_random_quantized(path, size_config(size), Recipe.named(quant, group_size))
        print(f"  written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def run(a, cache: Path) -> int:
    """The parent: write (cached), then measure in a fresh process so its peak memory is the run's own."""
    from ..loader.write_quantized import auto_group_size, config_in_dims

    group = a.group_size or auto_group_size(config_in_dims(size_config(a.size)))
    path = checkpoint(cache, a.size, a.quant, group)
    disk = sum(f.stat().st_size for f in path.glob("model*.safetensors"))
    cmd = [sys.executable, "-m", "diffusiongemma.bench.release", str(path), "--steps", str(a.steps)] + (
        ["--profile"] if a.profile else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["disk_GiB"] = round(disk / 2**30, 2)
    gib = 2**30
    print(f"checkpoint {path} ({a.quant}, int4 groups of {group}, {res['params_B']} B parameters, {res['disk_GiB']} GiB on disk)")
    print(f"load {res['load_s']} s | resident after load {res['rss_after_load'] / gib:.2f} GiB | "
          f"peak resident {res['peak_rss'] / gib:.2f} GiB (target 16 GiB)")
    print(f"one canvas of {res['canvas']} tokens, {a.steps} denoising steps, prompt {res['prompt_tokens']} tokens: "
          f"{res['generate_s']} s")
    print(f"per denoising step {res['s_per_step']} s (decoder {res['s_decoder']} s, vocabulary pass "
          f"{res['s_vocabulary']} s, sampler {res['s_sampler']} s) | commit {res['s_commit']} s | "
          f"prefill {res['s_prefill']} s")
    for line in res.get("profile", []):
        print("  " + line)
    print(json.dumps({"release": res}))
    return 0


def worker(path: str, steps: int, profile: bool) -> dict:
    import diffusiongemma as dg

    from ..engine import Engine, SamplingParams
    from ..quant.experts import QuantExperts
    from ..quant.linear import QuantEmbedding, QuantLinear

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    ck = dg.load(path, dtype="bfloat16", vision=False, text=False)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_bytes()
    params_b = sum(p.numel() for p in ck.model.parameters())
    for m in ck.model.modules():  # count quantized weights by their unpacked shapes
        if isinstance(m, QuantExperts):
            params_b += m.num_experts * sum(m.matrix(part, 0).shape[0] * m.matrix(part, 0).shape[1]
                                            for part in ("gate_up", "down"))
        elif isinstance(m, (QuantLinear, QuantEmbedding)):
            params_b += m.matrix.shape[0] * m.matrix.shape[1]
    engine = Engine.from_checkpoint(ck, max_batch=1)
    engine.timings.enabled = True
    prompt = torch.randint(3, ck.config.text.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    L = ck.config.canvas_length
    sp = SamplingParams(max_tokens=L, seed=0, max_denoising_steps=steps, confidence_threshold=1e-30,
                        stop_token_ids=[])
    t0 = time.perf_counter()
    done = engine.generate([prompt], sp)[0]
    gen_s = time.perf_counter() - t0
    t = engine.timings
    ms = t.ms_per_call
    res = {"params_B": round(params_b / 1e9, 2), "load_s": round(load_s, 1), "rss_after_load": rss_loaded,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "canvas": L,
           "prompt_tokens": len(prompt), "generate_s": round(gen_s, 1), "tokens": len(done.token_ids),
           "s_per_step": round(t.ms_per_step("decoder", "vocabulary", "sampler") / 1e3, 2),
           "s_decoder": round(ms("decoder") / 1e3, 2), "s_vocabulary": round(ms("vocabulary") / 1e3, 2),
           "s_sampler": round(t.ms_per_step("sampler") / 1e3, 3), "s_commit": round(ms("commit") / 1e3, 2),
           "s_prefill": round(ms("prefill") / 1e3, 2), "steps": done.stats.steps_per_canvas}
    # one canvas is one generation's last canvas, which is never committed: time a commit (the encoder pass that
    # stores a finished canvas's keys and values) directly, on a cache holding the prompt
    cache = ck.model.new_cache()
    with torch.no_grad():
        ck.model.encode(torch.tensor(prompt), [cache], hidden=False)
        t0 = time.perf_counter()
        ck.model.encode(torch.tensor(done.token_ids[:L]), [cache], hidden=False)
    res["s_commit"] = round(time.perf_counter() - t0, 4)
    if profile:
        res["profile"] = _profile(ck.model, L)
    return res


def _profile(model, length: int) -> list[str]:
    """The top operators (self CPU time) of one decoder step over a canvas."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache()
    with torch.no_grad():
        model.encode(torch.arange(3, 35), [cache])
        canvas = torch.randint(3, model.config.vocab_size, (length,))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.decode(canvas, [cache])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return table.splitlines()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    print(json.dumps(worker(a.path, a.steps, a.profile)))
