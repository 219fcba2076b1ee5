"""Checkpoint configuration: `config.json` and `generation_config.json` as frozen dataclasses.

Field names are the checkpoint's own (transformers 5.23.0 `DiffusionGemmaConfig`,
`DiffusionGemmaTextConfig`, `Gemma4VisionConfig`, `DiffusionGemmaGenerationConfig`), so a value can be
looked up in the release files by the same name. Defaults are the reference classes' defaults, so a
config that omits an optional field means what it means to the reference. Unknown keys are ignored;
a missing structural field, a wrong type or a contradiction raises `ConfigError` naming the field and
the file.

This module does not build models or decide sampler behaviour; it only reads and validates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


class ConfigError(ValueError):
    """A configuration file is missing a field, has a wrong value, or contradicts itself."""


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def _take(d: dict, name: str, kind, source: str | None, default=..., prefix: str = ""):
    """Read `d[name]` checking its type; `default=...` marks the field required."""
    label = prefix + name
    if name not in d or d[name] is None:
        if default is ...:
            raise ConfigError(f"missing required field '{label}'{_where(source)}")
        return default
    value = d[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"field '{label}'{_where(source)} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"field '{label}'{_where(source)} must be {want}, got {value!r}")
    return value


def _positive(value, label: str, source: str | None, allow_zero: bool = False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"field '{label}'{_where(source)} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


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


def _id_list(value, label: str, source: str | None) -> tuple[int, ...]:
    ids = value if isinstance(value, list) else [value]
    if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise ConfigError(f"field '{label}'{_where(source)} must be a token id or a non-empty list of ids, got {value!r}")
    return tuple(ids)


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


@dataclass(frozen=True)
class ModelConfig:
    """Top-level `config.json` (model_type `diffusion_gemma`)."""

    text: TextConfig
    vision: VisionConfig | None = None
    canvas_length: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    eos_token_id: tuple[int, ...] | None = None
    tie_word_embeddings: bool = True
    dtype: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source or 'config'} must hold a JSON object")
        mt = d.get("model_type")
        if mt != "diffusion_gemma":
            raise ConfigError(f"field 'model_type'{_where(source)} is {mt!r}, expected 'diffusion_gemma' "
                              "(is this a DiffusionGemma checkpoint?)")
        if "text_config" not in d:
            raise ConfigError(f"missing required field 'text_config'{_where(source)}")
        text = TextConfig.from_dict(d["text_config"], source)
        vision = VisionConfig.from_dict(d["vision_config"], source) if d.get("vision_config") is not None else None
        canvas = _positive(_take(d, "canvas_length", int, source, 256), "canvas_length", source)
        tie = _take(d, "tie_word_embeddings", bool, source, True)
        if not tie or not text.tie_word_embeddings:
            raise ConfigError(f"field 'tie_word_embeddings'{_where(source)} is false: untied encoder/decoder weights "
                              "are not a DiffusionGemma release layout and are not supported")
        eos = d.get("eos_token_id")
        kw = dict(
            text=text, vision=vision, canvas_length=canvas, tie_word_embeddings=tie,
            boi_token_id=_take(d, "boi_token_id", int, source, 255_999),
            eoi_token_id=_take(d, "eoi_token_id", int, source, 258_882),
            image_token_id=_take(d, "image_token_id", int, source, 258_880),
            eos_token_id=None if eos is None else _id_list(eos, "eos_token_id", source),
            dtype=_take(d, "dtype", str, source, _take(d, "torch_dtype", str, source, None)),
        )
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(_read_json(path), str(path))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "text_config": self.text.to_dict(),
            "canvas_length": self.canvas_length,
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "image_token_id": self.image_token_id,
            "tie_word_embeddings": True,
            "initializer_range": self.text.initializer_range,
        }
        if self.vision is not None:
            d["vision_config"] = self.vision.to_dict()
        if self.eos_token_id is not None:
            d["eos_token_id"] = list(self.eos_token_id)
        if self.dtype is not None:
            d["dtype"] = self.dtype
        return d


@dataclass(frozen=True)
class GenerationConfig:
    """`generation_config.json`: the released sampler's settings and the stop ids.

    `max_new_tokens` is only a default for requests that do not say how many tokens they want; the
    release file's 256 must never cap a request that asks for more (see README).
    """

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int = 0
    bos_token_id: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self, source: str | None = None) -> None:
        def bad(name, why):
            raise ConfigError(f"field '{name}'{_where(source)} {why}, got {getattr(self, name)!r}")

        if self.max_new_tokens <= 0:
            bad("max_new_tokens", "must be > 0")
        if self.max_denoising_steps <= 0:
            bad("max_denoising_steps", "must be > 0")
        if not self.entropy_bound > 0:
            bad("entropy_bound", "must be > 0")
        if self.t_min < 0:
            bad("t_min", "must be >= 0")
        if not self.t_max > self.t_min:
            bad("t_max", f"must be greater than t_min ({self.t_min})")
        if self.stability_threshold < 0:
            bad("stability_threshold", "must be >= 0")
        if not self.confidence_threshold > 0:
            bad("confidence_threshold", "must be > 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> GenerationConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source or 'generation config'} must hold a JSON object")
        default = cls()

        def take(name, kind):
            return _take(d, name, kind, source, getattr(default, name))

        sampler = d.get("sampler_config")
        bound = default.entropy_bound
        if sampler is not None:
            if not isinstance(sampler, dict):
                raise ConfigError(f"field 'sampler_config'{_where(source)} must be an object")
            cls_name = sampler.get("_cls_name", "EntropyBoundSamplerConfig")
            if cls_name != "EntropyBoundSamplerConfig":
                raise ConfigError(f"field 'sampler_config._cls_name'{_where(source)} is {cls_name!r}; only "
                                  "EntropyBoundSamplerConfig is supported")
            bound = _take(sampler, "entropy_bound", float, source, prefix="sampler_config.")
        eos = d.get("eos_token_id")
        kw = dict(
            max_new_tokens=take("max_new_tokens", int),
            max_denoising_steps=take("max_denoising_steps", int),
            entropy_bound=bound,
            t_min=take("t_min", float),
            t_max=take("t_max", float),
            stability_threshold=take("stability_threshold", int),
            confidence_threshold=take("confidence_threshold", float),
            eos_token_id=() if eos is None else _id_list(eos, "eos_token_id", source),
            pad_token_id=take("pad_token_id", int),
            bos_token_id=_take(d, "bos_token_id", int, source, None),
        )
        try:
            return cls(**kw)
        except ConfigError as e:  # re-raise with the file named
            raise ConfigError(f"{e}{_where(source) if source and source not in str(e) else ''}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationConfig:
        return cls.from_dict(_read_json(path), str(path))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "max_new_tokens": self.max_new_tokens,
            "max_denoising_steps": self.max_denoising_steps,
            "sampler_config": {"entropy_bound": self.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
            "t_min": self.t_min,
            "t_max": self.t_max,
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": self.confidence_threshold,
            "pad_token_id": self.pad_token_id,
            "return_dict_in_generate": True,
        }
        if self.eos_token_id:
            d["eos_token_id"] = list(self.eos_token_id)
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        return d

    def with_overrides(self, **kw) -> GenerationConfig:
        return replace(self, **kw)


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def release_config() -> ModelConfig:
    """The released 26B-A4B configuration (reference-architecture.md section 2), for meta-device builds."""
    text = TextConfig.from_dict({
        "vocab_size": 262_144, "hidden_size": 2816, "intermediate_size": 2112, "num_hidden_layers": 30,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": 2, "sliding_window": 1024, "num_experts": 128, "top_k_experts": 8,
        "moe_intermediate_size": 704, "max_position_embeddings": 262_144, "use_bidirectional_attention": "vision",
        "eos_token_id": 1,
    })
    vision = VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          num_key_value_heads=16, head_dim=72, standardize=True)
    return ModelConfig(text=text, vision=vision, canvas_length=256, eos_token_id=(1, 106), dtype="bfloat16")

