"""How a curve is reported: a table on stdout, one JSON line, and a PNG chart (matplotlib, the `plot` extra)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import textwrap
from pathlib import Path

import torch


def environment(**extra) -> dict:
    """The machine and versions a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__, **extra}


def median_spread(values: list[float]) -> dict:
    """Median with the smallest and largest of the samples (the spread a single figure hides)."""
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def table(title: str, columns: list[str], rows: list[list]) -> str:
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)

    cells = [[cell(x) for x in r] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def chart(path: Path, title: str, xlabel: str, panels: list[tuple[str, dict[str, tuple[list, list]]]],
          logx: bool = False) -> Path | None:
    """One PNG with a panel per (ylabel, {series: (xs, ys)}); None when matplotlib is missing (said on stderr)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print("no chart: matplotlib is missing (pip install 'diffusiongemma[plot]')", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for name, (xs, ys) in series.items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("symlog", linthresh=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 60 * len(panels)), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(kind: str, out: Path, title: str, columns: list[str], rows: list[list], record: dict,
           xlabel: str, panels, logx: bool = False) -> dict:
    """Print the table and the JSON line, write the JSON and the chart under `out`; returns the record."""
    print(table(title, columns, rows))
    png = chart(out / f"{kind}.png", title, xlabel, panels, logx)
    record = {"curve": kind, **record, "chart": str(png) if png else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return record
