"""Building blocks of the DiffusionGemma text stack: norms, rotary embeddings, the dense MLP, the MoE.

Numerics follow transformers 5.23.0 step by step (fp32 norms cast back to the activation dtype,
cos/sin cast to the activation dtype, router softmax in fp32), because parity at 1e-5 depends on the
order of roundings, not only on the formulas. Tokens are packed: activations are [N, D] for N tokens
of any number of sequences.

Each fast path keeps an obviously-correct reference beside it (`*_reference`), used by the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeParameters, TextConfig
from ..parallel import SINGLE


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def may_reorder_sums(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether a fast path that reorders floating-point sums (experts batched over all rows, several
    sequences' attention in one masked call) may run: reduced-precision (bf16/fp16) inference only. fp32,
    the parity dtype, and training keep the reference's order of operations: in fp32 such a reordering moves
    logits by an ulp, enough to flip a sampled token against transformers' `generate`. Under `torch.compile`
    (the engine's opt-in compiled step) sums are reordered by the compiler anyway, so the fast paths are taken
    in any dtype (they are also the ones it compiles best: no data-dependent shapes)."""
    if x.dtype not in (torch.bfloat16, torch.float16) and not torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params))


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * (mean(x^2) + eps)^-1/2 in fp32 (the reference uses pow(., -0.5), not rsqrt)."""
    xf = x.float()
    return xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: multiplies by its weight directly (no 1 + w); optionally weightless."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rms(x, self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


def rope_inv_freq(params: RopeParameters, head_dim: int) -> torch.Tensor:
    """Inverse frequencies of one attention type, [head_dim / 2].

    default: full rotation, 1 / theta^(2k/d).
    proportional (global layers): the first partial_rotary_factor * d/2 pairs rotate with exponent
    denominator d (the *full* head dim), the rest get frequency 0 (identity), so the result still
    spans the whole head.
    """
    if params.rope_type == "default":
        return 1.0 / (params.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    angles = int(params.partial_rotary_factor * head_dim // 2)
    rotated = 1.0 / (params.rope_theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    inv = torch.cat([rotated, torch.zeros(head_dim // 2 - angles, dtype=torch.float32)])
    return inv / params.factor


class RotaryEmbedding(nn.Module):
    """cos/sin per attention type for given absolute positions ([N] -> two [N, head_dim])."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.types = sorted(set(config.layer_types))
        for t in self.types:
            layer = config.layer_types.index(t)
            inv = rope_inv_freq(config.rope_parameters[t], config.layer_head_dim(layer))
            self.register_buffer(f"{t}_inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for t in self.types:
            inv = getattr(self, f"{t}_inv_freq")
            freqs = positions[:, None].float() * inv.float()
            emb = torch.cat([freqs, freqs], dim=-1)
            out[t] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [N, H, d] with cos/sin [N, d]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class GeGLU(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)): the dense ("shared") MLP and the self-conditioning MLP."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k router over the *un-normed* residual: RMS (no weight) * scale * D^-1/2, fp32 softmax,
    top-k, renormalised to sum 1, times the per-expert scale."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.top_k = config.top_k_experts
        self.root = config.hidden_size**-0.5
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = rms(x, self.eps).type_as(x)
        h = h * self.scale * self.root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.per_expert_scale[index]
        return weights, index  # [N, K] (fp32, or the parameter dtype), [N, K]


class Experts(nn.Module):
    """E GeGLU experts stored as 3-D tensors (checkpoint layout):
    gate_up_proj [E, 2I, D] (rows 0..I-1 gate, I..2I-1 up), down_proj [E, D, I].

    Under tensor parallelism (`model.shard`) a rank holds every expert's share of I, or (expert parallel)
    experts [first, first + E/N); either way it returns its fp32 partial sum, which the layer all-reduces."""

    tp = SINGLE
    first = 0  # the global index of this module's first expert

    def __init__(self, config: TextConfig):
        super().__init__()
        e, d, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.intermediate = e, i
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    # Every expert on every row when that is at most this many (row, expert) pairs (and `may_reorder_sums`):
    # on a small step one batched matmul per projection beats E small ones (a dispatch-bound CPU step).
    DENSE_LIMIT = 4096

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sort the (token, slot) assignments by expert and run each expert once on its rows
        (or every expert on every row, `forward_dense`, when that is small)."""
        if (not self.tp.expert_parallel and x.shape[0] * self.num_experts <= self.DENSE_LIMIT
                and may_reorder_sums(x, self.gate_up_proj)):
            return self.forward_dense(x, index, weights)
        n, k = index.shape
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        held = flat
        if self.tp.expert_parallel:  # this rank's experts only: the slots other ranks hold sort to either end
            local = flat[order] - self.first
            keep = (local >= 0) & (local < self.num_experts)
            order, held = order[keep], local[keep]
        # counted by scatter, not bincount: CUDA's bincount reads the max back to the host (no graph capture)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=held.device).scatter_add_(
            0, held, torch.ones_like(held))
        rows = x[order // k]  # grouped by expert
        hidden = self.grouped_mlp(rows, counts)
        hidden = hidden * weights.reshape(-1)[order, None]  # promotes to fp32 as the reference does
        # expert parallel: 0 for the slots other ranks hold
        unsorted = hidden.new_zeros(n * k, hidden.shape[1]) if self.tp.expert_parallel else torch.empty_like(hidden)
        unsorted[order] = hidden
        # sum the k slots of each token in slot order, in fp32, rounding once
        out = unsorted.view(n, k, -1).sum(dim=1)
        return out if self.tp.active else out.to(x.dtype)

    def grouped_mlp(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert's GeGLU on its rows (rows grouped by expert, counts[e] each)."""
        hidden = self._grouped(rows, self.gate_up_proj, counts, transpose=True)
        gate, up = hidden.split(self.intermediate, dim=-1)
        return self._grouped(gelu_tanh(gate) * up, self.down_proj, counts, transpose=True)

    def forward_dense(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """All E experts on all N rows in two batched matmuls, then each row's k slots picked and summed
        in slot order in fp32, as `forward` does."""
        n, k = index.shape
        gate, up = torch.matmul(x, self.gate_up_proj.transpose(1, 2)).split(self.intermediate, dim=-1)  # [E, N, I]
        hidden = torch.matmul(gelu_tanh(gate) * up, self.down_proj.transpose(1, 2))  # [E, N, D]
        picked = hidden[index, torch.arange(n, device=x.device)[:, None]]  # [N, k, D]
        out = (picked * weights[..., None]).sum(dim=1)
        return out if self.tp.active else out.to(x.dtype)

    @staticmethod
    def _grouped(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, transpose: bool) -> torch.Tensor:
        """rows (grouped by expert, counts[e] rows each) @ weight[e].T per group."""
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        w = weight.transpose(1, 2) if transpose else weight
        if _grouped_mm_ok(rows, w):
            return torch._grouped_mm(rows, w, offs=offsets)
        parts, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                parts.append(rows[start:start + c] @ w[e])
                start += c
        return torch.cat(parts) if parts else rows.new_zeros(0, w.shape[-1])

    def forward_reference(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, then the sparse weighted sum: slow and obviously correct."""
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in range(self.num_experts):
            w = (weights * (index == e)).sum(-1).float()  # [N]
            if not bool((index == e).any()):
                continue
            gate, up = F.linear(x, self.gate_up_proj[e]).split(self.intermediate, dim=-1)
            y = F.linear(gelu_tanh(gate) * up, self.down_proj[e])
            out += y.float() * w[:, None]
        return out.to(x.dtype)


def _grouped_mm_ok(rows: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or rows.requires_grad or w.requires_grad:
        return False
    if rows.dtype not in (torch.bfloat16, torch.float32) or rows.dtype != w.dtype:
        return False
    es = rows.element_size()
    # the kernel requires 16-byte aligned strides on both operands and on the output
    strides = (*rows.stride()[:-1], *[s for s in w.stride() if s != 1], w.shape[-1])
    return all((s * es) % 16 == 0 for s in strides)

