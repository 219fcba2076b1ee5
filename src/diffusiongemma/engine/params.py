"""Per-request sampler settings: the one place their names, types, ranges and defaults are written.

`SETTINGS` describes every field of `SamplingParams` (its kind, the rule its value must satisfy, the
`generation_config.json` field that gives its default, a help line); `SamplingParams` checks each value
against it on construction and `resolve` fills what was left `None` from the checkpoint's
`generation_config.json`. The command line and the HTTP protocol map their own fields onto these and
report a `RequestError` as it is (it names the field in `.param`). The release file's `max_new_tokens`
(256) is only a default: a request asking for more gets more.

`decoding` chooses how a request writes: `diffusion` (the released sampler, as the reference), `speculative`
(each denoised canvas verified by the causal encoder when it is committed: the output is the
autoregressive output, greedy or sampled at `ar_temperature`) or `autoregressive` (the encoder alone).

`temperature` scales the whole released schedule (OpenAI's `temperature` on the server, `--temperature`
on the command line): t_max = temperature * t_max of the checkpoint, t_min likewise; 0 is taken as 0.01
(practically greedy). An explicit t_max or t_min wins over it.

What is not here: output options (stop strings, a thinking budget, draft frames) belong to the text
side (`generation.OutputOptions`); per-server limits (largest `max_tokens`) to the server.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

from ..config import GenerationConfig


class RequestError(ValueError):
    """A request parameter is invalid; the message names it, and so does `param` (None: the prompt)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_ids(v) -> bool:
    return isinstance(v, (tuple, list)) and all(_is_int(i) and i >= 0 for i in v)


DECODING = ("diffusion", "speculative", "autoregressive")
# A speculative canvas is denoised one step unless the request says otherwise: the verifier corrects what
# the draft gets wrong, and on the shipped model one step per canvas gave the most tokens per pass (sort
# 2.09, arithmetic 2.57, against 1.85 / 2.04 at two steps and 0.91 / 0.66 at the released 48-step cap;
# autoregressive decoding is 1.0) with, by construction, the same answers.
SPECULATIVE_STEPS = 1


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # int, float or tuple (token ids): what a command-line string is parsed as
    ok: Callable[[object], bool]
    rule: str  # what `ok` demands, in words: "... must be <rule>"
    help: str
    default: str | None = None  # the generation_config.json field that gives the default (None: none)

    def check(self, value) -> None:
        if value is not None and not self.ok(value):
            raise RequestError(f"{self.name} must be {self.rule}, got {value!r}", self.name)

    def parse(self, text: str):
        """A command-line string as this setting's value (checked)."""
        try:
            value = self.kind(text) if self.kind is not tuple else tuple(int(t) for t in text.split(","))
        except ValueError:
            raise RequestError(f"{self.name} must be {self.rule}, got {text!r}", self.name) from None
        self.check(value)
        return value


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("max_tokens", int, lambda v: _is_int(v) and v > 0, "a positive integer",
            "exact cap on generated tokens", "max_new_tokens"),
    Setting("max_denoising_steps", int, lambda v: _is_int(v) and v > 0, "a positive integer",
            "denoising step cap per canvas", "max_denoising_steps"),
    Setting("temperature", float, lambda v: _is_num(v) and 0 <= v <= 2, "a number between 0 and 2",
            "scales the whole temperature schedule (t_max and t_min); 0 is practically greedy"),
    Setting("t_max", float, lambda v: _is_num(v) and v > 0, "a positive number", "temperature at the first step",
            "t_max"),
    Setting("t_min", float, lambda v: _is_num(v) and v >= 0, "a number >= 0", "temperature the schedule approaches",
            "t_min"),
    Setting("entropy_bound", float, lambda v: _is_num(v) and v > 0, "a positive number",
            "entropy bound of the acceptance rule", "entropy_bound"),
    Setting("stability_threshold", int, lambda v: _is_int(v) and v >= 0, "an integer >= 0",
            "steps the argmax must be unchanged to stop", "stability_threshold"),
    Setting("confidence_threshold", float, lambda v: _is_num(v) and v > 0, "a positive number",
            "mean-entropy threshold to stop", "confidence_threshold"),
    Setting("schedule_steps", int, lambda v: _is_int(v) and v > 0, "a positive integer",
            "temperature schedule length, independent of the step cap"),
    Setting("seed", int, _is_int, "an integer", "random seed (default: random)"),
    Setting("stop_token_ids", tuple, _is_ids, "a list of token ids", "stop token ids", "eos_token_id"),
    Setting("decoding", str, lambda v: v in DECODING, "one of " + ", ".join(DECODING),
            "diffusion (the released sampler), speculative (canvases verified by the causal encoder) or "
            "autoregressive (the encoder alone, one token per forward)"),
    Setting("ar_temperature", float, lambda v: _is_num(v) and v >= 0, "a number >= 0",
            "temperature of the causal verifier and of autoregressive decoding (0: greedy)"),
    Setting("initial_canvas", tuple, lambda v: _is_ids(v) and len(v) > 0, "a non-empty list of token ids",
            "the first canvas, supplied by the caller"),
)}


def _check_schedule(t_max: float, t_min: float, param: str = "t_max") -> None:
    if not t_max > t_min:
        raise RequestError(f"t_max must be greater than t_min, got t_max={t_max}, t_min={t_min}", param)


@dataclass(frozen=True)
class SamplingParams:
    """What a request may set; `None` takes the checkpoint's value (see `SETTINGS`)."""

    max_tokens: int | None = None
    max_denoising_steps: int | None = None  # the step cap per canvas
    temperature: float | None = None
    t_max: float | None = None
    t_min: float | None = None
    entropy_bound: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    # Beyond the reference (off by default):
    schedule_steps: int | None = None  # temperature schedule length independent of the step cap
    initial_canvas: tuple[int, ...] | None = None  # first canvas supplied by the caller
    decoding: str | None = None  # "diffusion" (default), "speculative", "autoregressive"
    ar_temperature: float | None = None  # the causal verifier's / autoregressive temperature (default 0: greedy)

    def __post_init__(self):
        for f in fields(self):
            SETTINGS[f.name].check(getattr(self, f.name))
        for name in ("stop_token_ids", "initial_canvas"):  # lists are accepted and kept as tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.t_max is not None and self.t_min is not None:
            _check_schedule(self.t_max, self.t_min)
        if self.initial_canvas is not None and self.decoding == "autoregressive":
            raise RequestError("initial_canvas has no canvas to start in autoregressive decoding", "initial_canvas")

    def resolve(self, gen: GenerationConfig, seed: int | None = None) -> ResolvedParams:
        """Every setting decided: the request's own, else the checkpoint's; `seed` (else a random one) when the
        request gave none. Raises RequestError when the resolved schedule is empty (t_max <= t_min)."""
        pick = lambda value, default: default if value is None else value  # noqa: E731
        scale = 1.0 if self.temperature is None else max(self.temperature, 0.01)
        t_max = float(pick(self.t_max, gen.t_max * scale))
        t_min = float(pick(self.t_min, gen.t_min * scale))
        _check_schedule(t_max, t_min, "t_max" if self.t_max is not None or self.t_min is None else "t_min")
        if self.seed is not None:
            seed = self.seed
        elif seed is None:
            seed = int.from_bytes(os.urandom(7), "little")
        return ResolvedParams(
            max_tokens=pick(self.max_tokens, gen.max_new_tokens),
            max_denoising_steps=pick(self.max_denoising_steps,
                                     SPECULATIVE_STEPS if self.decoding == "speculative" else gen.max_denoising_steps),
            t_max=t_max,
            t_min=t_min,
            entropy_bound=float(pick(self.entropy_bound, gen.entropy_bound)),
            stability_threshold=pick(self.stability_threshold, gen.stability_threshold),
            confidence_threshold=float(pick(self.confidence_threshold, gen.confidence_threshold)),
            stop_token_ids=tuple(pick(self.stop_token_ids, gen.eos_token_id)),
            seed=seed,
            schedule_steps=self.schedule_steps,
            initial_canvas=self.initial_canvas,
            decoding=self.decoding or "diffusion",
            ar_temperature=float(pick(self.ar_temperature, 0.0)),
        )


@dataclass(frozen=True)
class ResolvedParams:
    """A request's settings with every default filled in: what the engine runs."""

    max_tokens: int
    max_denoising_steps: int
    t_max: float
    t_min: float
    entropy_bound: float
    stability_threshold: int
    confidence_threshold: float
    stop_token_ids: tuple[int, ...]
    seed: int
    schedule_steps: int | None
    initial_canvas: tuple[int, ...] | None
    decoding: str = "diffusion"
    ar_temperature: float = 0.0
