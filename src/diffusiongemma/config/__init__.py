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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fields import FULL, SLIDING, ConfigError, _id_list, _positive, _read_json, _take, _where
from .generation import GenerationConfig
from .text import RopeParameters, TextConfig
from .vision import VisionConfig

__all__ = ["FULL", "SLIDING", "ConfigError", "GenerationConfig", "ModelConfig", "RopeParameters", "TextConfig",
           "VisionConfig", "release_config"]


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
    # config.json's quantization_config, as given (read by `quant.config.QuantPlan` when the weights load)
    quantization: dict | None = field(default=None, compare=False, hash=False)

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
            quantization=d.get("quantization_config"),
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
        if self.quantization is not None:
            d["quantization_config"] = self.quantization
        return d


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
