"""Per-request settings, the events the engine emits, and per-request statistics.

`SamplingParams` holds what a request may set; anything left `None` takes the checkpoint's
`generation_config.json` value when the engine resolves it (`resolve`). The release file's
`max_new_tokens` (256) is only that default: a request asking for more gets more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from ..config import GenerationConfig


class RequestError(ValueError):
    """A request parameter is invalid; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    max_denoising_steps: int | None = None  # the step cap per canvas
    t_max: float | None = None
    t_min: float | None = None
    entropy_bound: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None
    # Beyond the reference (off by default):
    schedule_steps: int | None = None  # temperature schedule length independent of the step cap
    initial_canvas: tuple[int, ...] | None = None  # first canvas supplied by the caller
    draft: bool = False  # emit a DraftEvent per denoising step

    def __post_init__(self):
        def check(name, ok, why):
            v = getattr(self, name)
            if v is not None and not ok(v):
                raise RequestError(f"{name} {why}, got {v!r}")

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        check("max_tokens", lambda v: is_int(v) and v > 0, "must be a positive integer")
        check("max_denoising_steps", lambda v: is_int(v) and v > 0, "must be a positive integer")
        check("schedule_steps", lambda v: is_int(v) and v > 0, "must be a positive integer")
        check("t_max", lambda v: is_num(v) and v > 0, "must be a positive number")
        check("t_min", lambda v: is_num(v) and v >= 0, "must be a number >= 0")
        check("entropy_bound", lambda v: is_num(v) and v > 0, "must be a positive number")
        check("stability_threshold", lambda v: is_int(v) and v >= 0, "must be an integer >= 0")
        check("confidence_threshold", lambda v: is_num(v) and v > 0, "must be a positive number")
        check("seed", lambda v: is_int(v), "must be an integer")
        check("stop_token_ids", lambda v: all(is_int(i) and i >= 0 for i in v), "must be token ids")
        check("initial_canvas", lambda v: all(is_int(i) and i >= 0 for i in v), "must be token ids")
        if self.t_max is not None and self.t_min is not None and not self.t_max > self.t_min:
            raise RequestError(f"t_max must be greater than t_min, got t_max={self.t_max}, t_min={self.t_min}")

    def resolve(self, gen: GenerationConfig, seed: int) -> ResolvedParams:
        pick = lambda a, b: b if a is None else a  # noqa: E731
        r = ResolvedParams(
            max_tokens=pick(self.max_tokens, gen.max_new_tokens),
            max_denoising_steps=pick(self.max_denoising_steps, gen.max_denoising_steps),
            t_max=float(pick(self.t_max, gen.t_max)),
            t_min=float(pick(self.t_min, gen.t_min)),
            entropy_bound=float(pick(self.entropy_bound, gen.entropy_bound)),
            stability_threshold=pick(self.stability_threshold, gen.stability_threshold),
            confidence_threshold=float(pick(self.confidence_threshold, gen.confidence_threshold)),
            stop_token_ids=tuple(pick(self.stop_token_ids, gen.eos_token_id)),
            seed=pick(self.seed, seed),
            schedule_steps=self.schedule_steps,
            initial_canvas=self.initial_canvas,
            draft=self.draft,
        )
        if not r.t_max > r.t_min:
            raise RequestError(f"t_max must be greater than t_min, got t_max={r.t_max}, t_min={r.t_min}")
        return r

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class ResolvedParams:
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
    draft: bool

    def with_(self, **kw) -> ResolvedParams:
        return replace(self, **kw)


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decoder_forwards: int = 0
    commit_forwards: int = 0  # encoder passes: the prefill and each committed canvas
    steps_per_canvas: list[int] = field(default_factory=list)
    counted_tokens: int = 0  # non-pad committed tokens, as the reference counts them
    prefill_s: float = 0.0
    ttft_s: float | None = None  # time to the first committed token
    total_s: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.counted_tokens / self.decoder_forwards if self.decoder_forwards else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_forward"] = self.tokens_per_forward
        return d


@dataclass
class DraftEvent:
    """One denoising step of one request's canvas."""

    request_id: str
    canvas: int
    step: int
    temperature: float
    argmax: torch.Tensor  # [L] the current argmax canvas
    accepted: torch.Tensor  # [L] bool
    entropy: torch.Tensor  # [L] fp32
    finished_denoising: bool
    committed_tokens: int = 0  # tokens of this request committed before this canvas


@dataclass
class CommitEvent:
    """A canvas was committed: its new tokens (already cut to max_tokens and at a stop id)."""

    request_id: str
    canvas: int
    token_ids: list[int]
    finish_reason: str | None  # None while the request continues; "stop", "length", "cancelled"
    stats: RequestStats


Event = DraftEvent | CommitEvent

# A hook a caller may attach to a request, called with each committed canvas's new token ids. It
# returns None to accept them, or a CommitAction to cut them and/or finish (e.g. a stop string).
CommitHook = Callable[[Sequence[int]], "CommitAction | None"]


@dataclass
class CommitAction:
    keep: int  # how many of the new tokens to keep
    finish_reason: str | None = "stop"  # None: continue generating after the kept tokens
    append: tuple[int, ...] = ()  # forced tokens committed after the kept ones (e.g. closing a thought)
