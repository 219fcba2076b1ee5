"""GPU readiness: build a model with random weights directly on the device, time one decoder forward,
one commit forward and one sampler step at the canvas length, and project tokens/s.

    python -m diffusiongemma.bench.gpu                    # release-shaped, bf16, on the GPU
    python -m diffusiongemma.bench.gpu --tests            # ... and the test suite's `gpu` tests (from a checkout)
    python -m diffusiongemma.bench.gpu --size tiny --device cpu   # the small CPU mode the tests run

The step is timed twice: the engine's dynamic path, and the fixed-shape step (`engine.static`) that a
GPU captures as a CUDA graph; the projection uses the faster of the two.

Projection (batch 1): a canvas costs (forwards per canvas) decoder steps plus one commit; at T tokens
per forward a 256-token canvas takes 256/T steps, so tok/s = 256 / ((256/T) * t_step + t_commit).
The memory-bandwidth bound reads every weight once per forward (all experts are hit by a 256-token
canvas): bound tok/s = 256 / ((256/T + 1) * weight_bytes / bandwidth). Bandwidth is measured with a
device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..config import GenerationConfig
from ..engine import Engine, SamplingParams
from ..loader.random_weights import random_model, size_config


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(size: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The model of a named size, built and initialised on `device` (the reference's N(0, 0.02) weights)."""
    config = size_config(size)
    return random_model(config, dtype, seed, device), config


def bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    _sync(device)
    return 2 * a.numel() * 5 / (time.perf_counter() - t0)


def timed(fn, device, repeats: int):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(size: str, device: torch.device, dtype: torch.dtype, prompt: int, repeats: int) -> dict:
    model, config = build(size, dtype, device)
    L = config.canvas_length
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = Engine(model, GenerationConfig(eos_token_id=(1,)), L, max_batch=1, batch_invariant=False)
    engine.timings.enabled = True
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, config.text.vocab_size, (prompt,), generator=g).tolist()
    engine.add(ids, SamplingParams(max_tokens=L, max_denoising_steps=repeats + 2, confidence_threshold=1e-30, seed=0,
                                   stop_token_ids=()))
    list(engine.stream())
    t = engine.timings
    cache = model.new_cache()
    model.encode(torch.tensor(ids, device=device), [cache])
    canvas = torch.randint(0, config.text.vocab_size, (L,), device=device)
    t_commit = timed(lambda: _commit(model, cache, canvas), device, repeats)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "size": size, "dtype": str(dtype).removeprefix("torch."), "canvas": L, "weights_GB": weights / 1e9,
           "ms_decoder_forward": t.ms_per_call("decoder"), "ms_sampler_step": t.ms_per_step("vocabulary", "sampler"),
           "ms_commit_forward": 1000 * t_commit}
    # the same step with static shapes (a CUDA graph replay on a GPU): decoder forward + vocabulary pass
    static = Engine(model, GenerationConfig(eos_token_id=(1,)), L, max_batch=1, runner="static",
                    max_context=prompt + 2 * L)
    static.add(ids, SamplingParams(max_tokens=L, max_denoising_steps=2, seed=0, stop_token_ids=()))
    list(static.stream())
    out["cuda_graph"] = static.runner.static.graph_enabled
    out["ms_static_step"] = 1000 * timed(static.runner.static.run, device, repeats)
    step = (min(out["ms_decoder_forward"] + t.ms_per_call("vocabulary"), out["ms_static_step"])
            + t.ms_per_step("sampler")) / 1000
    bw = bandwidth(device)
    out["bandwidth_GBps"] = bw / 1e9
    for tpf in (15, 20):
        out[f"projected_tok_s_at_{tpf}"] = L / ((L / tpf) * step + t_commit)
        out[f"bandwidth_bound_tok_s_at_{tpf}"] = L / ((L / tpf + 1) * weights / bw)
    return out


def _commit(model, cache, canvas):
    """One commit forward of a canvas on a copy of the cache (so repeats do not grow it)."""
    import copy

    c = copy.copy(cache)
    c._k, c._v, c._len = list(cache._k), list(cache._v), list(cache._len)
    c._positions = cache._positions
    model.encode(canvas, [c])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="release", choices=["tiny", "mid", "release"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens before the canvas")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tests", action="store_true",
                    help="first run the test suite's tests marked gpu (pytest -m gpu tests/, from a checkout)")
    a = ap.parse_args(argv)
    tests = None
    if a.tests:
        import subprocess
        import sys

        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"]).returncode
    res = run(a.size, torch.device(a.device), getattr(torch, a.dtype), a.prompt, a.repeats)
    if tests is not None:
        res["gpu_tests_returncode"] = tests
    for k, v in res.items():
        print(f"{k:34} {v:,.2f}" if isinstance(v, float) else f"{k:34} {v}")
    print(json.dumps({"gpu_readiness": res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
