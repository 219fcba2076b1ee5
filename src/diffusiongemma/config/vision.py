"""`vision_config`: the vision tower's shape."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .fields import ConfigError, _take, _where


@dataclass(frozen=True)
class VisionConfig:
    """`vision_config` (model_type `gemma4_vision`); defaults are `Gemma4VisionConfig`'s."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_theta: float = 100.0
    default_output_length: int = 280

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> VisionConfig:
        prefix = "vision_config."
        if not isinstance(d, dict):
            raise ConfigError(f"field 'vision_config'{_where(source)} must be an object")
        mt = d.get("model_type", "gemma4_vision")
        if mt != "gemma4_vision":
            raise ConfigError(f"field '{prefix}model_type'{_where(source)} is {mt!r}, expected 'gemma4_vision'")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "rope_theta":
                rope = d.get("rope_parameters") or {}
                kw["rope_theta"] = _take(rope, "rope_theta", float, source, 100.0, prefix + "rope_parameters.")
                continue
            kind = {int: int, float: float, bool: bool, str: str}[type(f.default)]
            kw[f.name] = _take(d, f.name, kind, source, f.default, prefix)
        if kw["use_clipped_linears"]:
            raise ConfigError(f"field '{prefix}use_clipped_linears'{_where(source)} is true; not supported")
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rope_theta"}
        d["model_type"] = "gemma4_vision"
        d["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        return d

