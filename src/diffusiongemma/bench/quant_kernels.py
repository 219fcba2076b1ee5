"""Which matmul to run for a quantized weight, by rows: each kernel beside the bf16 dense matmul, one run.

    python -m diffusiongemma.bench.quant_kernels [--shapes 2048x1024,1024x2048,1024x512] [--rows 1,4,16,64,256]

Per weight shape [N, K] and row count M: median ms (and the spread) of
- bf16: F.linear with a bf16 weight (the baseline);
- int8-kernel: torch._weight_int8pack_mm (per-channel int8);
- int8-cast: the int8 codes cast to bf16 in row tiles, then the dense matmul (what QuantMatrix does above
  INT8_KERNEL_ROWS);
- int4-tinygemm: torch._weight_int4pack_mm_for_cpu, groups of 128 (what QuantMatrix does for int4);
- int4-unpack: plain nibbles unpacked and cast in tiles, then the dense matmul (what an embedding chunk does);
- fp8-cast: e4m3 values cast in tiles, then the dense matmul.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ..quant.codec import FP8, INT8, int4
from ..quant.linear import QuantMatrix


def time_ms(fn, repeat: int) -> tuple[float, float]:
    """Median and interquartile range (ms) of `repeat` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [min(ts), 0, max(ts)]
    return statistics.median(ts), q[2] - q[0]


def _runs(x, wb, mats) -> dict:
    i8 = mats["int8"]
    return {
        "bf16": lambda: torch.nn.functional.linear(x, wb),
        "int8-kernel": lambda: torch.ops.aten._weight_int8pack_mm(x, i8.t["q"], i8.t["scale"][:, 0]),
        "int8-cast": lambda: i8._tiled(x),
        "int4-tinygemm": lambda: mats["int4-tinygemm"].matmul(x),
        "int4-unpack": lambda: mats["int4-unpack"].matmul(x),
        "fp8-cast": lambda: mats["fp8-cast"].matmul(x),
    }


def host() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{name} ({torch.get_num_threads()} threads; {', '.join(isa)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="2048x1024,1024x2048,1024x512,1408x2816", help="N x K weight shapes")
    ap.add_argument("--rows", default="1,4,16,17,64,256", help="row counts M")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", help="also write the table here")
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    print(f"host: {host()}, torch {torch.__version__}")
    table = []
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k, generator=g) * 0.02
        wb = w.bfloat16()
        mats = {"int8": QuantMatrix.quantize(w, INT8, torch.bfloat16),
                "int4-tinygemm": QuantMatrix.quantize(w, int4(128), torch.bfloat16),
                "int4-unpack": QuantMatrix.quantize(w, int4(128), torch.bfloat16, kernel=False),
                "fp8-cast": QuantMatrix.quantize(w, FP8, torch.bfloat16)}
        for m in (int(v) for v in a.rows.split(",")):
            x = torch.randn(m, k, generator=g).bfloat16()
            runs = _runs(x, wb, mats)
            row = {"shape": [n, k], "rows": m}
            for name, fn in runs.items():
                med, iqr = time_ms(fn, a.repeat)
                row[name] = {"ms": round(med, 4), "iqr": round(iqr, 4)}
            table.append(row)
            base = row["bf16"]["ms"]
            cells = "  ".join(f"{name} {row[name]['ms']:.3f} ({row[name]['ms'] / base:.2f}x)" for name in runs)
            print(f"[{n}x{k}] M={m:4d}  {cells}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"host": host(), "torch": torch.__version__, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
