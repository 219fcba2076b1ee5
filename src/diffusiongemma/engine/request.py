"""A request's life inside the engine: its state, its statistics, the events it produces, and the hook a
caller may attach to it.

Events: a `DraftEvent` per denoising step (only when the request asked for drafts) and a `CommitEvent`
per committed canvas, the last one carrying the finish reason. The engine speaks token ids; turning
them into text is the caller's business (`generation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from ..cache import KVCache
from ..sampling.draws import Draws
from .params import ResolvedParams


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens copied from the prefix cache instead of encoded
    completion_tokens: int = 0
    decoder_forwards: int = 0
    commit_forwards: int = 0  # encoder passes: the prefill and each committed canvas
    steps_per_canvas: list[int] = field(default_factory=list)
    accepted_per_canvas: list[int] = field(default_factory=list)  # speculative: canvas tokens the verifier kept
    counted_tokens: int = 0  # non-pad committed tokens, as the reference counts them
    prefill_s: float = 0.0
    decoding: str = "diffusion"  # the mode that ran (a constrained request runs speculatively)
    ttft_s: float | None = None  # time to the first committed token
    total_s: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens per denoising step, as the reference counts them (commit passes not counted)."""
        return self.counted_tokens / self.decoder_forwards if self.decoder_forwards else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens per forward pass of any kind: denoising steps, the prefill and every commit / verify pass
        (autoregressive decoding: one pass per token). Comparable across decoding modes."""
        passes = self.decoder_forwards + self.commit_forwards
        return self.counted_tokens / passes if passes else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_forward"] = self.tokens_per_forward
        d["tokens_per_pass"] = self.tokens_per_pass
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


@dataclass
class CommitAction:
    keep: int  # how many of the new tokens to keep
    finish_reason: str | None = "stop"  # None: continue generating after the kept tokens
    append: tuple[int, ...] = ()  # forced tokens committed after the kept ones (e.g. closing a thought)


# A hook a caller may attach to a request, called with each committed canvas's new token ids. It
# returns None to accept them, or a CommitAction to cut them and/or finish (e.g. a stop string).
CommitHook = Callable[[Sequence[int]], "CommitAction | None"]


class Constraint(Protocol):
    """Which tokens a request may emit (structured output), over token ids: kept in step with what the request
    emits. The engine calls it from its own thread only."""

    def masks(self, draft: Sequence[int]) -> list[torch.Tensor]:
        """Allowed-token masks ([vocab] bool): after the tokens emitted so far, then after each draft token in
        turn; ends with the mask at the first draft token it does not allow, or after the whole draft
        (len(draft) + 1 masks). Leaves the state as it was."""

    def consume(self, tokens: Sequence[int]) -> None:
        """The request emitted these tokens."""


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats
    seed: int


@dataclass
class RequestState:
    """Everything the engine keeps for one request between steps."""

    id: str
    prompt: list[int]
    params: ResolvedParams
    draws: Draws
    hook: CommitHook | None
    draft: bool  # emit a DraftEvent per denoising step
    stats: RequestStats
    t_start: float
    images: list | None = None  # preprocessed images / video frames for the prompt's soft tokens
    cache: KVCache | None = None
    to_encode: list[int] = field(default_factory=list)  # prompt, then each committed canvas
    canvas_index: int = 0
    step: int = 0
    canvas: torch.Tensor | None = None
    soft: torch.Tensor | None = None
    history: list[torch.Tensor] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    slot: int = -1  # its row in a fixed-shape step (the static runner only)
    # speculative and autoregressive decoding (the causal verifier):
    pinned: list[int] = field(default_factory=list)  # emitted, not yet in the cache: the next canvas starts with them
    last_hidden: torch.Tensor | None = None  # [D] the encoder's hidden state at the last cached token
    verifying: bool = False  # `to_encode` is a drafted canvas to verify (not yet emitted)
    constraint: Constraint | None = None  # structured output: the grammar the verifier applies
    prefix: object | None = None  # its place in the prefix cache's block chain (`engine.prefix`), when one is on

    @property
    def mode(self) -> str:
        return self.params.decoding

    @property
    def needs_hidden(self) -> bool:
        """Whether this request's encoder passes must return their hidden states (the verifier reads them)."""
        return self.params.decoding != "diffusion"

    @property
    def wants_soft(self) -> bool:
        """Whether this step's soft embedding will be read (a next step of this canvas may follow)."""
        return self.step + 1 < self.params.max_denoising_steps
