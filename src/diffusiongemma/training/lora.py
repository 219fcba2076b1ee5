"""LoRA on the attention and dense-MLP projections.

Encoder and decoder are one stack here, so each shared weight gets exactly one adapter, and merging
adds B @ A * scale to it once: the merged checkpoint stores it once under `model.decoder.*`, which the
reference ties into both modes (other runtimes that keep two copies of the stack have merged the
adapter twice into a tied weight). Adapters live beside the base weights (`lora_a`, `lora_b`) and are
saved to `adapter.safetensors` until merged.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "adapter.safetensors"


def _add_adapters(module: nn.Module, rank: int, alpha: float | None, dtype, device) -> None:
    """lora_a (Kaiming-uniform) and lora_b (zeros: the update starts at zero) and the alpha / rank scale."""
    module.scale = (alpha if alpha is not None else rank) / rank
    module.lora_a = nn.Parameter(torch.empty(rank, module.in_features, dtype=dtype, device=device))
    module.lora_b = nn.Parameter(torch.zeros(module.out_features, rank, dtype=dtype, device=device))
    nn.init.kaiming_uniform_(module.lora_a, a=math.sqrt(5))


def _update(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (x @ module.lora_a.t() @ module.lora_b.t()) * module.scale


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update; state-dict compatible with nn.Linear
    for its `weight` (adapters are extra `lora_a` / `lora_b` entries)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        _add_adapters(self, rank, alpha, self.weight.dtype, self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + _update(self, x)

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=False, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + (self.lora_b @ self.lora_a) * self.scale)
        return out


class QuantLoRALinear(nn.Module):
    """A frozen quantized linear layer (`quant.linear.QuantLinear`, kept as `base`) plus a trainable low-rank update
    in the activation dtype; its adapters have the same state-dict names as `LoRALinear`'s."""

    def __init__(self, base, rank: int, alpha: float | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base = base
        _add_adapters(self, rank, alpha, base.matrix.dtype, next(iter(base.matrix.t.values())).device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + _update(self, x)

    def merged(self) -> nn.Linear:
        """The dequantized base weight plus the update, in full precision (re-quantize with `diffusiongemma
        quantize` if wanted: merging into quantized codes would round the update away)."""
        w = self.base.matrix.dequantize(torch.float32)
        out = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=self.lora_a.dtype)
        with torch.no_grad():
            out.weight.copy_(w + (self.lora_b.float() @ self.lora_a.float()) * self.scale)
        return out


def _targets(model: nn.Module):
    from ..quant.linear import QuantLinear

    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                child = getattr(parent, name, None)
                if isinstance(child, (nn.Linear, QuantLinear, QuantLoRALinear)):
                    yield parent, name, child


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None) -> int:
    """Freeze the model and put adapters on the attention and dense-MLP projections (over full-precision or
    quantized weights); returns their count."""
    from ..quant.linear import QuantLinear

    model.requires_grad_(False)
    n = 0
    for parent, name, child in list(_targets(model)):
        if isinstance(child, QuantLinear):
            setattr(parent, name, QuantLoRALinear(child, rank, alpha))
            n += 1
        elif not isinstance(child, (LoRALinear, QuantLoRALinear)):
            setattr(parent, name, LoRALinear(child, rank, alpha))
            n += 1
    return n


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight and remove it (so a second merge changes nothing)."""
    n = 0
    for parent, name, child in list(_targets(model)):
        if isinstance(child, (LoRALinear, QuantLoRALinear)):
            setattr(parent, name, child.merged())
            n += 1
    return n


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapters(model: nn.Module, path: str | Path) -> None:
    state = adapter_state(model)
    if state:
        save_file(state, str(Path(path) / ADAPTER))


def load_adapters(model: nn.Module, path: str | Path) -> bool:
    f = Path(path) / ADAPTER
    if not f.is_file():
        return False
    missing = model.load_state_dict(load_file(str(f)), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{f} holds adapters this model does not have: {missing.unexpected_keys[:3]}")
    return True
