"""The roofline on this machine: the matrix-multiply peak for the shapes a denoising step uses, and the FLOPs
of each phase of the step, so that a measured time becomes achieved FLOP/s and a fraction of that peak.

FLOPs are counted as 2 per multiply-add of the step's matrix products (projections, attention scores and
their weighted sums, the dense MLP, the router, the chosen experts, self-conditioning, the logits and the
soft embedding); norms, RoPE, softmax and the sampler's elementwise work are not counted (they are what
keeps a step below the peak).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..config import TextConfig


def decoder_flops(cfg: TextConfig, canvas: int, context: int = 0, self_conditioning: bool = True) -> float:
    """FLOPs of one decoder forward over a canvas of `canvas` tokens with `context` committed tokens."""
    L, D = canvas, cfg.hidden_size
    total = 0.0
    for i in range(cfg.num_hidden_layers):
        H, Hkv, hd = cfg.num_attention_heads, cfg.layer_kv_heads(i), cfg.layer_head_dim(i)
        seen = (min(context, cfg.sliding_window - 1) if cfg.is_sliding(i) else context) + L
        kv = 2 if cfg.layer_has_v_proj(i) else 1
        total += 2 * L * D * (H * hd + kv * Hkv * hd) + 2 * L * H * hd * D  # q, k (, v), o
        total += 2 * 2 * L * seen * hd * H  # scores and weighted values
        total += 3 * 2 * L * D * cfg.intermediate_size  # the dense GeGLU
        total += 2 * L * D * cfg.num_experts  # the router
        total += cfg.top_k_experts * 3 * 2 * L * D * cfg.moe_intermediate_size  # the chosen experts
    if self_conditioning:
        total += 3 * 2 * L * D * cfg.intermediate_size
    return total


def vocabulary_flops(cfg: TextConfig, canvas: int, soft_fraction: float = 1.0) -> float:
    """FLOPs of the vocabulary pass: the logits, and the soft embedding on `soft_fraction` of the steps."""
    return 2 * canvas * cfg.hidden_size * cfg.vocab_size * (1 + soft_fraction)


def matmul_peak(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 15) -> float:
    """Median FLOP/s of [m x k] @ [k x n] in `dtype` on this machine (CPU)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times)


def peaks(cfg: TextConfig, canvas: int, dtypes: tuple[str, ...] = ("bfloat16", "float32")) -> dict:
    """This machine's matmul peak (FLOP/s) per dtype for the step's two main shapes: the vocabulary
    chunk [canvas x hidden] x [hidden x 8192] and the dense MLP [canvas x hidden] x [hidden x intermediate].
    (Only the dtypes asked: bf16 without AVX512-BF16 or AMX runs ~0.4 GFLOP/s, minutes for the mid shapes.)"""
    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        out[name] = {"vocabulary": matmul_peak(dtype, canvas, cfg.hidden_size, 8192),
                     "mlp": matmul_peak(dtype, canvas, cfg.hidden_size, cfg.intermediate_size)}
    return out


def achieved(cfg: TextConfig, canvas: int, ms_decoder: float | None, ms_vocabulary: float | None,
             ms_step: float | None, soft_fraction: float, peak: dict) -> dict:
    """Each phase's achieved FLOP/s and its fraction of the peak of its main shape."""
    dec, voc = decoder_flops(cfg, canvas), vocabulary_flops(cfg, canvas, soft_fraction)
    out = {"decoder_GFLOP": dec / 1e9, "vocabulary_GFLOP": voc / 1e9}
    for phase, flops, ms, shape in (("decoder", dec, ms_decoder, "mlp"), ("vocabulary", voc, ms_vocabulary, "vocabulary"),
                                    ("step", dec + voc, ms_step, "vocabulary")):
        if ms:
            rate = flops / (ms / 1000)
            out[f"{phase}_GFLOP_per_s"] = rate / 1e9
            out[f"{phase}_of_peak"] = rate / peak[shape]
    return out


def report(model_dir: Path, a, med: dict) -> dict:
    """Achieved FLOP/s of each phase against this machine's matmul peak for the step's shapes (`bench.roofline`)."""
    from ..config import ModelConfig

    config = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    cfg, L = config.text, config.canvas_length
    peak = peaks(cfg, L, (a.dtype,))[a.dtype]
    steps = med.get("ours", {}).get("steps_per_canvas") or 1
    # our engine skips the soft embedding on a canvas's last step when it hits the step cap (fixed mode: always)
    ours_soft = (a.steps - 1) / a.steps if a.mode == "fixed" else 1.0
    out = {"peak_GFLOP_per_s": {k: v / 1e9 for k, v in peak.items()}}
    for side, soft in (("ours", ours_soft), ("reference", 1.0)):
        m = med.get(side)
        if m:
            # apart only where they were timed apart: the compiled step and the reference's forward hold both
            apart = side == "ours" and bool(m.get("ms_vocabulary"))
            out[side] = achieved(cfg, L, m.get("ms_decoder_forward") if apart else None,
                                          m.get("ms_vocabulary") if apart else None, m.get("ms_step"), soft, peak)
    print(f"roofline ({a.dtype}, this machine): matmul peak {out['peak_GFLOP_per_s']['vocabulary']:.0f} GFLOP/s for "
          f"[{L} x {cfg.hidden_size}] x [{cfg.hidden_size} x 8192], {out['peak_GFLOP_per_s']['mlp']:.0f} for "
          f"[{L} x {cfg.hidden_size}] x [{cfg.hidden_size} x {cfg.intermediate_size}] (steps per canvas {steps:.1f})")
    for side in ("ours", "reference"):
        r = out.get(side)
        if r:
            parts = [f"{ph} {r[ph + '_GFLOP_per_s']:.0f} GFLOP/s ({100 * r[ph + '_of_peak']:.0f}% of peak)"
                     for ph in ("decoder", "vocabulary", "step") if ph + "_GFLOP_per_s" in r]
            print(f"  {side}: {r['decoder_GFLOP'] + r['vocabulary_GFLOP']:.1f} GFLOP per step; " + ", ".join(parts))
    return out
