"""`text_config`: the text stack's shape, attention layout, RoPE and MoE sizes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

from .fields import FULL, SLIDING, SUPPORTED_ACTIVATIONS, ConfigError, _id_list, _positive, _take, _where

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeParameters:
    """One attention type's rotary embedding (`rope_parameters[layer_type]`)."""

    rope_type: str
    rope_theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    """`text_config` of a DiffusionGemma checkpoint (model_type `diffusion_gemma_text`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    layer_types: tuple[str, ...]
    rope_parameters: dict[str, RopeParameters]
    # Per-layer overrides for full-attention layers: layer index -> {"head_dim": .., "num_key_value_heads": ..}.
    per_layer_config: dict[int, dict[str, int]] = field(default_factory=dict)
    sliding_window: int = 512
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: tuple[int, ...] = (1,)
    bos_token_id: int = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    final_logit_softcapping: float = 30.0
    use_bidirectional_attention: str | None = None
    initializer_range: float = 0.02

    # -- per-layer geometry --------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.per_layer_config.get(layer, {}).get("head_dim", self.head_dim)

    def layer_kv_heads(self, layer: int) -> int:
        return self.per_layer_config.get(layer, {}).get("num_key_value_heads", self.num_key_value_heads)

    def layer_has_v_proj(self, layer: int) -> bool:
        # Global (full-attention) layers take their values from the raw k projection (K = V).
        return self.is_sliding(layer)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None, prefix: str = "text_config.") -> TextConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"field '{prefix.rstrip('.')}'{_where(source)} must be an object")
        mt = d.get("model_type", "diffusion_gemma_text")
        if mt != "diffusion_gemma_text":
            raise ConfigError(f"field '{prefix}model_type'{_where(source)} is {mt!r}, expected 'diffusion_gemma_text'")

        def take(name, kind, default=...):
            return _take(d, name, kind, source, default, prefix)

        kw: dict[str, Any] = {}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                     "top_k_experts", "moe_intermediate_size"):
            kw[name] = _positive(take(name, int), prefix + name, source)
        kw["sliding_window"] = _positive(take("sliding_window", int, 512), prefix + "sliding_window", source)
        kw["hidden_activation"] = take("hidden_activation", str, "gelu_pytorch_tanh")
        kw["max_position_embeddings"] = take("max_position_embeddings", int, 131_072)
        kw["rms_norm_eps"] = take("rms_norm_eps", float, 1e-6)
        kw["pad_token_id"] = take("pad_token_id", int, 0)
        kw["bos_token_id"] = take("bos_token_id", int, 2)
        kw["eos_token_id"] = _id_list(take("eos_token_id", (int, list), 1), prefix + "eos_token_id", source)
        kw["tie_word_embeddings"] = take("tie_word_embeddings", bool, True)
        kw["attention_bias"] = take("attention_bias", bool, False)
        kw["final_logit_softcapping"] = take("final_logit_softcapping", float, 30.0)
        kw["initializer_range"] = take("initializer_range", float, 0.02)
        kw["use_bidirectional_attention"] = take("use_bidirectional_attention", str, None)

        if kw["hidden_activation"] not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"field '{prefix}hidden_activation'{_where(source)} is {kw['hidden_activation']!r}; "
                              f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if kw["attention_bias"]:
            raise ConfigError(f"field '{prefix}attention_bias'{_where(source)} is true; DiffusionGemma has no biases")
        if kw["use_bidirectional_attention"] not in (None, "vision"):
            raise ConfigError(f"field '{prefix}use_bidirectional_attention'{_where(source)} is "
                              f"{kw['use_bidirectional_attention']!r}; only 'vision' or null are supported")
        if kw["top_k_experts"] > kw["num_experts"]:
            raise ConfigError(f"field '{prefix}top_k_experts'{_where(source)} ({kw['top_k_experts']}) exceeds "
                              f"'{prefix}num_experts' ({kw['num_experts']})")

        n_layers = kw["num_hidden_layers"]
        layer_types = d.get("layer_types")
        if layer_types is None:  # the reference's default pattern: 5 sliding : 1 full
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]
        if not isinstance(layer_types, list) or any(t not in (SLIDING, FULL) for t in layer_types):
            raise ConfigError(f"field '{prefix}layer_types'{_where(source)} must be a list of "
                              f"'{SLIDING}'/'{FULL}', got {layer_types!r}")
        if len(layer_types) != n_layers:
            raise ConfigError(f"field '{prefix}layer_types'{_where(source)} has {len(layer_types)} entries but "
                              f"'{prefix}num_hidden_layers' is {n_layers}")
        layer_types = list(layer_types)
        if layer_types[-1] != FULL:
            # The reference forces this too (with a warning); follow it so the same file means the same model.
            log.warning("last layer must use full attention; forcing it as the reference does (%s)", source)
            layer_types[-1] = FULL
        kw["layer_types"] = tuple(layer_types)

        kw["rope_parameters"] = _rope_parameters(d.get("rope_parameters"), source, prefix)
        kw["per_layer_config"] = _per_layer_config(d, kw["layer_types"], source, prefix)

        cfg = cls(**kw)
        for i in range(n_layers):
            if cfg.num_attention_heads % cfg.layer_kv_heads(i):
                raise ConfigError(f"layer {i}{_where(source)}: num_attention_heads ({cfg.num_attention_heads}) is not "
                                  f"a multiple of its key/value heads ({cfg.layer_kv_heads(i)})")
            if cfg.layer_head_dim(i) % 2:
                raise ConfigError(f"layer {i}{_where(source)}: head_dim {cfg.layer_head_dim(i)} must be even for RoPE")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["model_type"] = "diffusion_gemma_text"
        d["layer_types"] = list(self.layer_types)
        d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        d["rope_parameters"] = {
            t: {k: v for k, v in vars(p).items() if not (k in ("partial_rotary_factor", "factor") and v == 1.0)}
            for t, p in self.rope_parameters.items()
        }
        d["per_layer_config"] = {str(k): dict(v) for k, v in self.per_layer_config.items()}
        if d["use_bidirectional_attention"] is None:
            del d["use_bidirectional_attention"]
        return d



def _rope_parameters(raw, source, prefix) -> dict[str, RopeParameters]:
    if raw is None:  # reference defaults (DiffusionGemmaTextConfig.__post_init__)
        return {SLIDING: RopeParameters("default", 10_000.0),
                FULL: RopeParameters("proportional", 1_000_000.0, partial_rotary_factor=0.25)}
    if not isinstance(raw, dict):
        raise ConfigError(f"field '{prefix}rope_parameters'{_where(source)} must be an object")
    out = {}
    for t in (SLIDING, FULL):
        p = raw.get(t)
        label = f"{prefix}rope_parameters.{t}."
        if not isinstance(p, dict):
            raise ConfigError(f"missing required field '{prefix}rope_parameters.{t}'{_where(source)}")
        rope_type = p.get("rope_type", p.get("type", "default"))
        theta = _take(p, "rope_theta", float, source, prefix=label)
        partial = _take(p, "partial_rotary_factor", float, source, 1.0, prefix=label)
        factor = _take(p, "factor", float, source, 1.0, prefix=label)
        if rope_type not in ("default", "proportional"):
            raise ConfigError(f"field '{label}rope_type'{_where(source)} is {rope_type!r}; "
                              "supported: 'default', 'proportional'")
        if rope_type == "default" and (partial != 1.0 or factor != 1.0):
            raise ConfigError(f"field '{label}partial_rotary_factor'{_where(source)}: the 'default' rope rotates the "
                              "whole head; use rope_type 'proportional' for partial rotation")
        if not 0.0 < partial <= 1.0:
            raise ConfigError(f"field '{label}partial_rotary_factor'{_where(source)} must be in (0, 1], got {partial}")
        out[t] = RopeParameters(rope_type, theta, partial, factor)
    return out


def _per_layer_config(d, layer_types, source, prefix) -> dict[int, dict[str, int]]:
    """Full-attention layers' head geometry, in either form the reference accepts.

    Saved checkpoints carry `per_layer_config` ({"5": {"head_dim": 512, "num_key_value_heads": 2}});
    hand-written ones may instead give `global_head_dim` / `num_global_key_value_heads`, which the
    reference converts in `__post_init__` (global_head_dim defaults to 512 there).
    """
    raw = d.get("per_layer_config")
    n = len(layer_types)
    if raw is None:
        over: dict[str, int] = {"head_dim": _take(d, "global_head_dim", int, source, 512, prefix)}
        kv = _take(d, "num_global_key_value_heads", int, source, None, prefix)
        if kv is not None:
            over["num_key_value_heads"] = kv
        return {i: dict(over) for i, t in enumerate(layer_types) if t == FULL}
    if not isinstance(raw, dict):
        raise ConfigError(f"field '{prefix}per_layer_config'{_where(source)} must be an object")
    out: dict[int, dict[str, int]] = {}
    for key, over in raw.items():
        label = f"{prefix}per_layer_config.{key}"
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"field '{label}'{_where(source)}: keys must be layer indices") from None
        if not 0 <= idx < n:
            raise ConfigError(f"field '{label}'{_where(source)}: layer index out of range (0..{n - 1})")
        if not isinstance(over, dict):
            raise ConfigError(f"field '{label}'{_where(source)} must be an object")
        unknown = set(over) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ConfigError(f"field '{label}'{_where(source)} overrides {sorted(unknown)}; only head_dim and "
                              "num_key_value_heads may differ per layer")
        out[idx] = {k: _positive(_take(over, k, int, source, prefix=label + "."), f"{label}.{k}", source)
                    for k in over}
    return out

