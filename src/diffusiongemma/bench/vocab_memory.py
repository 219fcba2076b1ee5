"""Peak tensor memory of one denoising step's vocabulary work (LM head, softcap, temperature, sample,
entropy, argmax, acceptance, self-conditioning embedding) at a given vocabulary and canvas size:
this engine's fused pass against the reference's (transformers 5.23.0) per-step code.

    python -m diffusiongemma.bench.vocab_memory [--vocab 262144] [--canvas 256] [--hidden 1024]

Each side runs in a fresh process; the figure is the peak of live torch tensors allocated during the
step (torch profiler), so allocator caching cannot blur it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch


def _ours(h, E, L):
    from ..sampling.vocab import vocab_pass

    return vocab_pass(h, E, 30.0, torch.full((L,), 0.7), torch.rand(L, dtype=torch.float64), True,
                      torch.tensor(E.shape[1] ** 0.5).to(E.dtype))


def _reference(h, E, L, sc_prev):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSampler,
        EntropyBoundSamplerConfig,
        StableAndConfidentStoppingCriteria,
    )

    V = E.shape[0]
    soft = torch.matmul(sc_prev.softmax(dim=-1, dtype=torch.float32).to(E.dtype), E) * (E.shape[1] ** 0.5)
    from ..sampling.head import lm_head

    logits = lm_head(h, E, 30.0)[None]  # the reference's full [1, canvas, vocab] logits
    processed = logits / 0.7
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sample = torch.multinomial(probs.view(-1, V), num_samples=1).view(1, L)
    argmax = processed.argmax(-1)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.1), L, V, 48)
    sampler.renoise_canvas(sampler.accept_canvas(argmax, sample, processed, 1), 1)
    StableAndConfidentStoppingCriteria(1, 0.005)(argmax, processed)
    return soft, processed.to(E.dtype)


def measure(which: str, vocab: int, canvas: int, hidden: int) -> dict:
    from .memory import peak_tensor_bytes

    torch.manual_seed(0)
    E = (torch.randn(vocab, hidden) * 0.02).bfloat16()
    h = torch.randn(canvas, hidden).bfloat16()
    if which == "ours":
        _, peak = peak_tensor_bytes(lambda: _ours(h, E, canvas))
        carried = canvas * hidden * 2  # the soft embedding kept for the next step
    else:
        sc_prev = torch.randn(canvas, vocab).bfloat16()  # the previous step's logits it keeps
        _, peak = peak_tensor_bytes(lambda: _reference(h, E, canvas, sc_prev))
        carried = sc_prev.numel() * sc_prev.element_size()
    return {"which": which, "peak_step_MiB": round(peak / 2**20, 1), "carried_between_steps_MiB": round(carried / 2**20, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--which", choices=["ours", "reference"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.which:
        print(json.dumps(measure(a.which, a.vocab, a.canvas, a.hidden)))
        return
    rows = []
    for which in ("ours", "reference"):
        out = subprocess.run([sys.executable, "-m", "diffusiongemma.bench.vocab_memory", "--which", which,
                              f"--vocab={a.vocab}", f"--canvas={a.canvas}", f"--hidden={a.hidden}"],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"vocab {a.vocab}, canvas {a.canvas}, hidden {a.hidden}, bf16 embedding")
    print(f"{'':10} {'peak in step (MiB)':>20} {'kept between steps (MiB)':>26}")
    for r in rows:
        print(f"{r['which']:10} {r['peak_step_MiB']:>20} {r['carried_between_steps_MiB']:>26}")
    print(json.dumps({"vocab_memory": rows}))


if __name__ == "__main__":
    main()
