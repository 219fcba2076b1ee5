"""`generation_config.json`: the released sampler's settings and the stop ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fields import ConfigError, _id_list, _read_json, _take, _where


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
