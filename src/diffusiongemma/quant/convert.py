"""In-memory conversion of a loaded text model: its Linears, embedding and experts to quant modules by kind
(`quantize_model`: the frozen base of LoRA fine-tuning over quantized weights), and back to full-precision modules
holding the dequantized weights (`dequantize_model`: what a merged checkpoint stores)."""

from __future__ import annotations

import torch
from torch import nn

from ..model.layers import Experts
from .codec import WeightScheme
from .experts import QuantExperts
from .linear import QuantEmbedding, QuantLinear, QuantMatrix

LINEAR_PARENTS = ("self_attn", "mlp", "self_conditioning")


def _kind(name: str, module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, Experts) and not isinstance(module, QuantExperts):
        return "experts"
    if type(module) is nn.Linear and "." in name and name.split(".")[-2] in LINEAR_PARENTS:
        return "linear"
    return None


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, experts: WeightScheme | None, linear: WeightScheme | None,
                   embedding: WeightScheme | None = None) -> int:
    """Replace modules by quant modules, each kind by its scheme (None: left as it is); returns the count. The
    weights are quantized as `diffusiongemma quantize` would write them (experts' gate and up apart)."""
    schemes = {"experts": experts, "linear": linear, "embedding": embedding}
    n = 0
    for name, module in list(model.named_modules()):
        kind = _kind(name, module)
        scheme = schemes.get(kind) if kind else None
        if scheme is None:
            continue
        dtype = next(module.parameters()).dtype
        if kind == "experts":  # scales are per row (or per row and group), so the joined gate/up quantizes as
            # its two halves do apart, as the checkpoint stores them
            new = QuantExperts([QuantMatrix.quantize(module.gate_up_proj[e], scheme, dtype) for e in range(module.num_experts)],
                               [QuantMatrix.quantize(module.down_proj[e], scheme, dtype) for e in range(module.num_experts)])
        elif kind == "linear":
            new = QuantLinear(QuantMatrix.quantize(module.weight, scheme, dtype))
        else:
            new = QuantEmbedding(QuantMatrix.quantize(module.weight, scheme, dtype, kernel=False))
        _set(model, name, new)
        n += 1
    return n


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every quant module by its full-precision counterpart holding the dequantized weight."""
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            w = module.matrix.dequantize(dtype or module.matrix.dtype)
            new = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
        elif isinstance(module, QuantEmbedding):
            w = module.matrix.dequantize(dtype or module.matrix.dtype)
            new = nn.Embedding(*w.shape, device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
        elif isinstance(module, QuantExperts):
            mats = [(module.matrix("gate_up", e), module.matrix("down", e)) for e in range(module.num_experts)]
            dt = dtype or mats[0][0].dtype
            new = Experts.__new__(Experts)
            nn.Module.__init__(new)
            new.num_experts, new.intermediate = module.num_experts, module.intermediate
            new.gate_up_proj = nn.Parameter(torch.stack([g.dequantize(dt) for g, _ in mats]), requires_grad=False)
            new.down_proj = nn.Parameter(torch.stack([d.dequantize(dt) for _, d in mats]), requires_grad=False)
        else:
            continue
        _set(model, name, new)
        n += 1
    return n
