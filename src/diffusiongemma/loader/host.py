"""Which compute dtype this CPU runs fastest, by measurement.

bfloat16 halves the weights' memory, but whether its matrix products are fast depends on the CPU: with
AVX512-BF16 or AMX, oneDNN runs them 2-3x faster than float32; on a CPU with AVX2 only (no AVX-512, as
many desktop and some server parts) torch has no bf16 kernel and falls back to a generic loop, 20-200x
slower than float32 (measured on a 2-core AMD EPYC with AVX2 only: 1.9 vs 84 GFLOP/s for
[2943 x 384] x [384 x 192], a training step 18.9 s in bf16 autocast against 1.9 s in fp32;
docs/performance.md §9). The packed int8/int4 kernels of quantized weights go the other way there: fast with
bf16 activations, 30x slower with fp32 ones.

`matmul_rates()` times one small product in each dtype (once per process); `preferred_dtype()` names the
faster; `slow_bf16_note()` is the one-line warning the loader and the trainer give when bf16 dense compute
was asked for where it is slow (`bench` prints its choice and the rates). "host" as a dtype (`resolve_dtype`,
`--dtype host`) means `preferred_dtype()`.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time

import torch

log = logging.getLogger(__name__)
SHAPE = (64, 256, 1024)  # [m x k] @ [k x n]: 34 MFLOP; the whole measurement took 0.2 s on a 2-core AVX2 machine
SLOW = 2.0  # bf16 counts as slow where float32 runs at least this many times its rate
TIE = 1.1  # within this factor the two count as equal, and bf16 (half the memory) is preferred


def cpu_capability() -> str:
    """torch's view of this CPU's vector units: "AVX2", "AVX512", "AVX512_BF16"/"AMX" (newer torch), ..."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # an older torch, or a platform without the query
        return "unknown"


@functools.cache
def matmul_rates(shape: tuple[int, int, int] = SHAPE, repeats: int = 5) -> dict[str, float]:
    """Median GFLOP/s of one [m x k] @ [k x n] product per dtype on this CPU (cached per process)."""
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = a32.to(dtype), b32.to(dtype)
        a @ b  # first call: kernel selection, allocation
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        out[name] = 2 * m * k * n / max(statistics.median(times), 1e-9) / 1e9
    return out


def preferred_dtype() -> torch.dtype:
    """float32 or bfloat16, whichever this CPU multiplies faster (bf16 on a tie: half the memory)."""
    r = matmul_rates()
    return torch.float32 if r["float32"] > r["bfloat16"] * TIE else torch.bfloat16


def slow_bf16_note() -> str | None:
    """A sentence saying that bf16 dense compute is slow here, with the measured rates; None where it is not."""
    r = matmul_rates()
    if r["float32"] < SLOW * r["bfloat16"]:
        return None
    return (f"bfloat16 matrix products run at {r['bfloat16']:.1f} GFLOP/s on this CPU against {r['float32']:.0f} "
            f"for float32 (torch's CPU capability: {cpu_capability()}; no AVX512-BF16 or AMX kernel): float32 "
            f"(dtype='float32', --dtype float32, or 'host' for the faster) is ~{r['float32'] / r['bfloat16']:.0f}x "
            f"faster here")


_warned = False


def warn_if_slow_bf16(what: str) -> bool:
    """Log `slow_bf16_note()` after `what` ("loading X in bfloat16"), once per process; whether bf16 is slow."""
    global _warned
    note = slow_bf16_note()
    if note and not _warned:
        _warned = True
        log.warning("%s: %s", what, note)
    return note is not None
