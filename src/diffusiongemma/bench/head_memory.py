"""Peak tensor memory and time of the training loss of the LM head (tied embedding, softcap,
cross-entropy, forward and backward) at a given vocabulary: the tiled loss (`training.head`) against
the full-logits path (what `model.logits` + cross-entropy, and transformers, compute).

    python -m diffusiongemma.bench.head_memory [--vocab 262144] [--rows 512] [--hidden 256] [--repeats 3]

Rows are the scored positions of a batch (the decoder's canvases, or the encoder's next-token rows).
Each side runs in a fresh process; memory is the peak resident memory above the start during one
forward and backward (the gradients of the embedding and of the rows count), with glibc told to map
every allocation above 64 KiB on its own (`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave at once and
the resident peak is the peak of live tensors (the profiler's tensor accounting cannot be used here: it
books the frees inside a custom autograd function at the function's start); time, in another process
with the allocator's defaults, is the median of `repeats` runs after one warm-up; both sides in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def measure(which: str, part: str, vocab: int, rows: int, hidden: int, repeats: int) -> dict:
    from ..training.head import head_cross_entropy, head_cross_entropy_reference
    from .memory import peak_during

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    hidden_states = torch.randn(rows, hidden, generator=g).requires_grad_()
    targets = torch.randint(vocab, (rows,), generator=g)
    f = head_cross_entropy if which == "tiled" else head_cross_entropy_reference

    def step():
        loss = f(hidden_states, weight, targets, 30.0).mean()
        loss.backward()
        return float(loss)

    loss = step()  # warm-up
    if part == "memory":
        weight.grad = hidden_states.grad = None
        _, peak = peak_during(step)
        grads = (weight.numel() + hidden_states.numel()) * 4
        return {"peak_MiB": round(peak / 2**20, 1), "beyond_grads_MiB": round((peak - grads) / 2**20, 1)}
    times = []
    for _ in range(repeats):
        weight.grad = hidden_states.grad = None
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(times), 3), "loss": round(loss, 6)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--which", choices=["tiled", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=["memory", "time"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.which:
        print(json.dumps(measure(a.which, a.part, a.vocab, a.rows, a.hidden, a.repeats)))
        return
    rows = []
    for which in ("tiled", "reference"):
        row = {"which": which}
        for part in ("memory", "time"):  # the allocator setting that makes RSS exact would distort the time
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if part == "memory" else None
            out = subprocess.run([sys.executable, "-m", "diffusiongemma.bench.head_memory", "--which", which,
                                  "--part", part, f"--vocab={a.vocab}", f"--rows={a.rows}", f"--hidden={a.hidden}",
                                  f"--repeats={a.repeats}"], capture_output=True, text=True, check=True, env=env)
            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(row)
    print(f"LM-head training loss: vocab {a.vocab}, {a.rows} rows, hidden {a.hidden}, fp32, forward + backward")
    print(f"{'':10} {'peak (MiB)':>11} {'beyond the gradients (MiB)':>27} {'median (s)':>11} {'loss':>10}")
    for r in rows:
        print(f"{r['which']:10} {r['peak_MiB']:>11} {r['beyond_grads_MiB']:>27} "
              f"{r['median_s']:>11} {r['loss']:>10}")
    print(json.dumps({"head_memory": rows}))


if __name__ == "__main__":
    main()
