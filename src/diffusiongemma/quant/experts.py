"""The MoE experts with quantized weights: each expert's gate/up (one [2I, D] matrix) and down ([D, I]) a
`QuantMatrix`, the per-expert tensors stacked into [E, ...] buffers. Routing, the slot order of the sum and the
fp32 accumulation are `model.layers.Experts`'s; only the per-expert matmuls differ (each expert's rows through
its matrix's kernel, e.g. tinygemm int4 on the ~16 rows an expert sees of a 256-token canvas)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Experts, gelu_tanh
from .linear import QuantMatrix


class QuantExperts(Experts):
    DENSE_LIMIT = -1  # never every expert on every row: that would read every expert's weights each step

    def __init__(self, gate_up: list[QuantMatrix], down: list[QuantMatrix]):
        nn.Module.__init__(self)
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError("one gate/up and one down matrix per expert")
        self.num_experts = len(gate_up)
        self.intermediate = gate_up[0].shape[0] // 2
        self.hidden = down[0].shape[0]
        self.gate_up_scheme, self.down_scheme = gate_up[0].scheme, down[0].scheme
        self._meta = {}
        for prefix, mats in (("gate_up", gate_up), ("down", down)):
            first = mats[0]
            if any(m.shape != first.shape or set(m.t) != set(first.t) or m.scheme != first.scheme for m in mats):
                raise ValueError(f"the experts' {prefix} matrices differ in shape or layout")
            self._meta[prefix] = (first.scheme, first.shape, first.dtype, tuple(first.t), first.layout)
            for name in first.t:
                self.register_buffer(f"{prefix}_{name}", torch.stack([m.t[name] for m in mats]))

    def matrix(self, prefix: str, e: int) -> QuantMatrix:
        scheme, shape, dtype, names, layout = self._meta[prefix]
        return QuantMatrix(scheme, shape, dtype, layout, **{n: getattr(self, f"{prefix}_{n}")[e] for n in names})

    def grouped_mlp(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = rows.new_empty(rows.shape[0], self.hidden)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                part = rows[start:start + c]
                gate, up = self.matrix("gate_up", e).matmul(part).split(self.intermediate, dim=-1)
                out[start:start + c] = self.matrix("down", e).matmul(gelu_tanh(gate) * up)
                start += c
        return out

    def forward_reference(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in range(self.num_experts):
            if not bool((index == e).any()):
                continue
            w = (weights * (index == e)).sum(-1).float()
            gate, up = F.linear(x, self.matrix("gate_up", e).dequantize(x.dtype)).split(self.intermediate, dim=-1)
            y = F.linear(gelu_tanh(gate) * up, self.matrix("down", e).dequantize(x.dtype))
            out += y.float() * w[:, None]
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, gate_up={self.gate_up_scheme.name}, "
                f"down={self.down_scheme.name}")
