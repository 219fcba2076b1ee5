"""One request's canvas under the released sampler: how it starts, how one step's outputs update it, and
how new tokens are committed (cut after the first stop id, at `max_tokens`, and where the request's
commit hook says). Pure per-request decisions; the forwards that produce a step's outputs are a runner's.

Pinned tokens (speculative decoding: the verifier's correction, or tokens a hook forced) stand at the
start of the next canvas: already emitted, not yet in the cache, never re-noised, and taking none of the
acceptance bound (their entropy counts as 0).
"""

from __future__ import annotations

import time

import torch

from ..sampling.draws import INIT, RENOISE
from ..sampling.sampler import entropy_bound_accept, finalize_canvas, renoise, stable_and_confident, temperature
from .request import CommitAction, DraftEvent, RequestState
from .runners import StepResult


def start_canvas(r: RequestState, canvas_length: int, vocab_size: int) -> None:
    """The request's next canvas: its initial canvas if it gave one (first canvas only), else uniform noise;
    its pinned tokens first."""
    if r.canvas_index == 0 and r.params.initial_canvas is not None:
        r.canvas = torch.tensor(r.params.initial_canvas, device=r.draws.device)
    else:
        r.canvas = r.draws.tokens(r.canvas_index, 0, INIT, canvas_length, vocab_size)
    if r.pinned:
        r.canvas[:len(r.pinned)] = torch.tensor(r.pinned, device=r.canvas.device)
    r.step, r.soft, r.history = 0, None, []


def step_temperature(r: RequestState) -> float:
    p = r.params
    return temperature(r.step, p.max_denoising_steps, p.t_min, p.t_max, p.schedule_steps)


def _pin(out: StepResult, pinned: list[int]) -> StepResult:
    pin = torch.tensor(pinned, device=out.argmax.device)
    argmax, sample, entropy = out.argmax.clone(), out.sample.clone(), out.entropy.clone()
    argmax[:len(pinned)] = sample[:len(pinned)] = pin
    entropy[:len(pinned)] = 0.0
    return StepResult(argmax, entropy, sample, out.soft)


def advance(r: RequestState, temp: float, out: StepResult, vocab_size: int) -> tuple[DraftEvent | None, bool]:
    """Apply one step's outputs: accept by the entropy bound, re-noise the rest, decide whether the canvas is
    done. Returns (the step's draft event if the request asked for drafts, whether the canvas is finished)."""
    p = r.params
    if r.pinned:
        out = _pin(out, r.pinned)
    accepted = entropy_bound_accept(out.entropy, p.entropy_bound)
    converged = stable_and_confident(out.argmax, r.history, p.stability_threshold, float(out.entropy.mean()),
                                     p.confidence_threshold)
    r.history = (r.history + [out.argmax])[-max(p.stability_threshold, 1):]
    r.step += 1
    r.stats.decoder_forwards += 1
    done = converged or r.step >= p.max_denoising_steps
    draft = DraftEvent(r.id, r.canvas_index, r.step - 1, temp, out.argmax, accepted, out.entropy, done,
                       len(r.generated)) if r.draft else None
    if not done:  # the draws are keyed by (canvas, step): skipping a finished canvas's re-noising changes nothing
        noise = r.draws.tokens(r.canvas_index, r.step - 1, RENOISE, out.argmax.shape[0], vocab_size)
        r.canvas, r.soft = renoise(out.sample, accepted, noise), out.soft
    else:
        r.canvas = out.argmax  # the finished canvas (its pinned tokens in place)
    return draft, done


def cut_at_stop(tokens: list[int], stop_ids: tuple[int, ...]) -> tuple[list[int], str | None]:
    """Tokens up to and including the first stop id (reason "stop"), or all of them (None)."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i + 1], "stop"
    return tokens, None


def emit(r: RequestState, new: list[int], reason: str | None, pad_id: int) -> tuple[int, tuple[int, ...], str | None]:
    """Commit `new` tokens to the request's output (`reason` "stop" when they end at a stop id): cut at
    `max_tokens`, let the hook cut them or append forced tokens, count them. Returns (how many of `new` were
    kept, the forced tokens appended after them, the finish reason or None to go on)."""
    p = r.params
    room = p.max_tokens - len(r.generated)
    if len(new) > room:
        new, reason = new[:room], "length"
    append: tuple[int, ...] = ()
    if r.hook is not None and new:
        action: CommitAction | None = r.hook(new)
        if action is not None:
            new = new[: action.keep]
            append = tuple(action.append)[: max(room - len(new), 0)]
            reason = action.finish_reason if action.finish_reason is not None else (
                reason if reason == "length" else None)
    out = new + list(append)
    r.generated.extend(out)
    r.stats.completion_tokens = len(r.generated)
    r.stats.counted_tokens += sum(1 for t in out if t != pad_id)
    if r.stats.ttft_s is None and out:
        r.stats.ttft_s = time.perf_counter() - r.t_start
    if reason is None and len(r.generated) >= p.max_tokens:
        reason = "length"
    return len(new), append, reason


def commit_canvas(r: RequestState, canvas: torch.Tensor, pad_id: int) -> tuple[list[int], str | None]:
    """The released sampler's commit of a finished canvas: everything after its first stop id padded, the
    rest emitted. Returns the new tokens and the finish reason (None: the request goes on)."""
    r.stats.steps_per_canvas.append(r.step)
    stop_ids = torch.tensor(r.params.stop_token_ids or [-1], device=canvas.device)
    finalized, stop_at = finalize_canvas(canvas, stop_ids, pad_id)
    new = finalized[: stop_at + 1].tolist() if stop_at is not None else finalized.tolist()
    kept, append, reason = emit(r, new, "stop" if stop_at is not None else None, pad_id)
    r.canvas_index += 1
    r.canvas = r.soft = None
    return new[:kept] + list(append), reason
