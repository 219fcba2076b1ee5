"""The generation engine: requests that each run the released sampler, batched step by step.

Each engine `step()`:
  1. drops cancelled requests (their caches are freed);
  2. admits waiting requests up to `max_batch` and runs the encoder over every prompt waiting to be
     prefilled and every canvas waiting to be committed;
  3. runs one denoising step of every denoising request's canvas, then each request's own sampler update
     (its temperature, bound, thresholds, draws). A request whose canvas converged (or hit its step cap)
     commits the argmax canvas, cut after its first stop id and at `max_tokens`, and either finishes or
     starts its next canvas.

How the passes run is the step runner's (`engine.runners`: eager, compiled, static), chosen once when the
engine is built. Requests finish independently: one that finishes leaves at once and a waiting one joins
at the next step. Draws are keyed by (seed, canvas, step), so a request's random numbers do not depend on
its batch; with the eager runner's `batch_invariant=True` (the CPU default) its tokens are exactly those it
gets alone. Everything is reported as a stream of events (`CommitEvent`, and `DraftEvent` when asked).
The engine speaks token ids only.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from ..config import GenerationConfig
from ..model import DiffusionGemmaText
from ..sampling.draws import Draws
from .canvas import advance, commit_canvas, cut_at_stop, emit, start_canvas, step_temperature
from .params import RequestError, SamplingParams
from .prefix import PrefixCache
from .request import CommitEvent, CommitHook, Completion, Constraint, Event, RequestState, RequestStats
from .runners import EagerRunner, make_runner
from .timings import Timings
from .verify import next_token, verify


class Engine:
    def __init__(self, model: DiffusionGemmaText, generation_config: GenerationConfig, canvas_length: int,
                 max_batch: int = 8, vocab_chunk: int = 8192, max_context: int | None = None,
                 batch_invariant: bool | None = None, vision=None, soft_token_ids: Sequence[int] = (),
                 runner: str = "eager", prefix_cache: int = 0, prefix_block: int = 16):
        """runner: how the passes run (`engine.runners`): "eager" (the default), "compiled" (the denoising
        step and the commit as two `torch.compile` graphs: the first step compiles, tens of seconds, later
        ones skip per-op dispatch) or "static" (all active requests in one fixed-shape step, captured as a
        CUDA graph on a GPU; its context is bounded, `max_context` default 8,192).

        prefix_cache: bytes for the prefix cache (`engine.prefix`; 0, the default, turns it off): prompts that
        begin with tokens already committed reuse their keys and values, in blocks of `prefix_block` tokens."""
        self.model = model
        self.gen = generation_config
        self.canvas_length = canvas_length
        self.max_batch = max_batch
        self.vocab_size = model.config.vocab_size
        self.vision = vision
        self.timings = Timings(model.device)  # where the time goes (decoder, vocabulary, sampler, commit)
        self.runner: EagerRunner = make_runner(runner, model, canvas_length, self.timings, max_batch=max_batch,
                                               max_context=max_context, vocab_chunk=vocab_chunk,
                                               batch_invariant=batch_invariant, vision=vision,
                                               soft_token_ids=tuple(soft_token_ids))
        self.max_context = self.runner.max_context
        self.prefix = PrefixCache(model.cache_config, prefix_cache, prefix_block, model.dtype) if prefix_cache else None
        self._waiting: deque[RequestState] = deque()
        # Tensor-parallel serving (`generation.lockstep`): rank 0 holds new requests here until every rank has
        # been told of them, so that all ranks admit the same requests at the same step.
        self.hold_new = False
        self._held: dict[str, RequestState] = {}
        self._active: list[RequestState] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._cancel: set[str] = set()

    @classmethod
    def from_checkpoint(cls, checkpoint, **kw) -> Engine:
        """An engine for a loaded checkpoint; with its vision tower, its soft tokens (image, and video when
        the tokenizer has one) mark where vision vectors go."""
        if checkpoint.vision is not None:
            kw.setdefault("vision", checkpoint.vision)
            kw.setdefault("soft_token_ids", checkpoint.soft_token_ids)
        return cls(checkpoint.model, checkpoint.generation_config, checkpoint.config.canvas_length, **kw)

    # -- requests ------------------------------------------------------------------------------
    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None,
            hook: CommitHook | None = None, images: Sequence | None = None, draft: bool = False,
            constraint: Constraint | None = None) -> str:
        """Queue a request; returns its id. Raises RequestError naming a bad parameter.

        images: preprocessed images (and video frames), in the order of the prompt's soft-token runs.
        draft: emit a DraftEvent at every denoising step of this request.
        constraint: the tokens it may emit (structured output), applied by the causal verifier: a constrained
        request runs speculatively when it asked for diffusion (its stats say which mode ran)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise RequestError("prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        resolved = params.resolve(self.gen)
        if constraint is not None and resolved.decoding == "diffusion":
            resolved = replace(params, decoding="speculative").resolve(self.gen, resolved.seed)
        if resolved.initial_canvas is not None:
            ic = resolved.initial_canvas
            if len(ic) != self.canvas_length or max(ic) >= self.vocab_size:
                raise RequestError(f"initial_canvas must be {self.canvas_length} token ids below {self.vocab_size}",
                                   "initial_canvas")
        need = len(prompt) + resolved.max_tokens + self.canvas_length
        if need > self.max_context:
            raise RequestError(f"prompt ({len(prompt)} tokens) plus max_tokens ({resolved.max_tokens}) exceeds the "
                               f"context of {self.max_context} tokens", "max_tokens")
        if images:
            if self.vision is None:
                raise RequestError("this model has no vision tower: images are not supported")
            soft = sum(1 for t in prompt if t in self.runner.soft_token_ids)
            need = sum(im.num_soft_tokens for im in images)
            if soft != need:
                raise RequestError(f"the prompt has {soft} image soft tokens but the images need {need}")
        rid = request_id or f"req-{next(self._ids)}"
        req = RequestState(rid, prompt, resolved, Draws(resolved.seed, self.model.device), hook, bool(draft),
                           RequestStats(prompt_tokens=len(prompt), decoding=resolved.decoding), time.perf_counter(),
                           images=list(images) if images else None, to_encode=list(prompt), constraint=constraint)
        with self._lock:
            if self.hold_new:
                self._held[rid] = req
            else:
                self._waiting.append(req)
        return rid

    def release(self, request_ids: Sequence[str]) -> None:
        """Held requests (`hold_new`) join the queue, in this order."""
        with self._lock:
            self._waiting.extend(self._held.pop(rid) for rid in request_ids if rid in self._held)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancel.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._active or self._held)

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def prefix_stats(self) -> dict | None:
        """The prefix cache's size and use (None when it is off); readable from any thread."""
        return self.prefix.stats() if self.prefix is not None else None

    def cache_bytes(self) -> int:
        """Bytes held by the active requests' KV caches (read from any thread: an approximate snapshot)."""
        return sum(r.cache.nbytes() for r in list(self._active) if r.cache is not None)

    # -- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()  # no autograd bookkeeping on any op of the step
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._drop_cancelled(events)
        self._admit()
        self._encode_pending(events)
        self._denoise(events)
        return events

    def stream(self) -> Iterator[Event]:
        """Run steps until no request is left, yielding every event."""
        while self.has_work():
            yield from self.step()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 hooks: Sequence[CommitHook | None] | None = None) -> list[Completion]:
        """Generate for several prompts (batched, each finishing on its own); returns completions in order."""
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add(p, sp, hook=(hooks[i] if hooks else None)) for i, (p, sp) in enumerate(zip(prompts, plist))]
        reqs = {r.id: r for r in self._waiting if r.id in ids}
        done: dict[str, Completion] = {}
        for ev in self.stream():
            if isinstance(ev, CommitEvent) and ev.finish_reason is not None and ev.request_id in reqs:
                r = reqs[ev.request_id]
                done[r.id] = Completion(r.id, r.prompt, list(r.generated), ev.finish_reason, r.stats, r.params.seed)
        return [done[i] for i in ids]

    def warm_up(self) -> float:
        """Run one throw-away request through a prefill, two denoising steps and a commit, so that whatever is
        built on first use (the compiled runner's graphs, allocator pools) is built now; returns the seconds it
        took. Call it while the engine is idle (a server does, before it accepts requests)."""
        t0 = time.perf_counter()
        prompt = [t % self.vocab_size for t in range(2, 10)]  # any valid ids: only the shapes matter
        self.generate([prompt], SamplingParams(max_tokens=2 * self.canvas_length, max_denoising_steps=2, seed=0,
                                               stop_token_ids=()))
        return time.perf_counter() - t0

    def _drop_cancelled(self, events: list[Event]) -> None:
        with self._lock:
            if not self._cancel:
                return
            cancel, self._cancel = self._cancel, set()
            waiting = [r for r in self._waiting if r.id in cancel]
            self._waiting = deque(r for r in self._waiting if r.id not in cancel)
        for r in waiting + [r for r in self._active if r.id in cancel]:
            self._finish(r, "cancelled", [], events)

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and len(self._active) < self.max_batch:
                req = self._waiting.popleft()
                self.runner.admit(req)
                if self.prefix is not None:
                    self.prefix.attach(req, self.runner.soft_token_ids)
                self._active.append(req)

    def _encode_pending(self, events: list[Event]) -> None:
        """Encoder passes: new prompts (prefill), finished canvases (commit, or verify when speculative) and
        autoregressive tokens."""
        for group in self.runner.encode_groups([r for r in self._active if r.to_encode]):
            t0 = time.perf_counter()
            hidden = self.runner.encode(group)
            dt = time.perf_counter() - t0
            for i, r in enumerate(group):
                if r.stats.commit_forwards == 0:
                    r.stats.prefill_s = dt
                r.stats.commit_forwards += 1
                encoded, r.to_encode = r.to_encode, []
                if r.mode == "autoregressive":
                    self._next_token(r, hidden[i][-1], events)
                elif r.verifying:
                    self._verify(r, encoded, hidden[i], events)
                else:
                    if hidden is not None:
                        r.last_hidden = hidden[i][-1]
                    start_canvas(r, self.canvas_length, self.vocab_size)
                if self.prefix is not None:
                    self.prefix.store(r, encoded)

    def _denoise(self, events: list[Event]) -> None:
        ready = [r for r in self._active if r.canvas is not None and not r.to_encode]
        for group in self.runner.denoise_groups(ready):
            with self.timings("sampler"):  # the step's draws (counted as sampler work)
                temps = [step_temperature(r) for r in group]
                temp_rows = torch.tensor(temps, dtype=torch.float32, device=self.model.device).repeat_interleave(
                    self.canvas_length)
                uniforms = torch.cat([r.draws.uniforms(r.canvas_index, r.step, self.canvas_length) for r in group])
            results = self.runner.denoise(group, temps, temp_rows, uniforms)
            with self.timings("sampler"):
                for r, t, out in zip(group, temps, results):
                    draft, done = advance(r, t, out, self.vocab_size)
                    if draft is not None:
                        events.append(draft)
                    if done and r.mode == "speculative":  # the verifier reads it at its commit, next step
                        r.stats.steps_per_canvas.append(r.step)
                        r.to_encode, r.verifying = r.canvas.tolist(), True
                        r.canvas = r.soft = None
                    elif done:
                        self._commit(r, events)

    def _commit(self, r: RequestState, events: list[Event]) -> None:
        canvas_no = r.canvas_index
        new, reason = commit_canvas(r, r.canvas, self.gen.pad_token_id)
        self._emitted(r, new, reason, canvas_no, events)
        if reason is None:
            r.to_encode = new  # committed by the encoder at the next step, then the next canvas starts

    def _emitted(self, r: RequestState, new: list[int], reason: str | None, canvas_no: int,
                 events: list[Event]) -> None:
        if r.constraint is not None and new:
            r.constraint.consume(new)
        if reason is not None:
            self._finish(r, reason, new, events, canvas_no)
        else:
            events.append(CommitEvent(r.id, canvas_no, new, None, r.stats))

    def _next_token(self, r: RequestState, hidden: torch.Tensor, events: list[Event]) -> None:
        """Autoregressive decoding: the verifier's next token is emitted, and encoded at the next step."""
        with self.timings("verify"):
            token = next_token(self.model, r, hidden, (r.canvas_index, 0), self.runner.vocab_chunk)
        new, reason = cut_at_stop([token], r.params.stop_token_ids)
        kept, append, reason = emit(r, new, reason, self.gen.pad_token_id)
        out = new[:kept] + list(append)
        if reason is None and not out:  # a hook kept nothing and forced nothing: nothing left to continue from
            reason = "stop"
        canvas_no, r.canvas_index = r.canvas_index, r.canvas_index + 1
        self._emitted(r, out, reason, canvas_no, events)
        if reason is None:
            r.to_encode = out

    def _verify(self, r: RequestState, canvas: list[int], hidden: torch.Tensor, events: list[Event]) -> None:
        """Speculative decoding: the drafted canvas was just committed; keep the prefix the verifier agrees
        with, emit it with the verifier's next token, take the rest back out of the cache, and start the next
        canvas with that token pinned."""
        P = len(r.pinned)
        with self.timings("verify"):
            k, token = verify(self.model, r, canvas, hidden, self.runner.vocab_chunk)
        new, reason = cut_at_stop(canvas[P:k] + [token], r.params.stop_token_ids)
        r.stats.accepted_per_canvas.append(min(k - P, len(new)))  # up to a stop id: what was kept of the draft
        kept, append, reason = emit(r, new, reason, self.gen.pad_token_id)
        canvas_no, r.canvas_index, r.verifying = r.canvas_index, r.canvas_index + 1, False
        self._emitted(r, new[:kept] + list(append), reason, canvas_no, events)
        if reason is not None:
            return
        cached = P + min(kept, k - P)  # the pinned tokens and the accepted ones kept
        r.cache.truncate(len(canvas) - cached)
        self.runner.refresh(r)
        if cached:
            r.last_hidden = hidden[cached - 1]
        r.pinned = ([token] if kept > k - P else []) + list(append)
        start_canvas(r, self.canvas_length, self.vocab_size)

    def _finish(self, r: RequestState, reason: str, new: list[int], events: list[Event],
                canvas_no: int | None = None) -> None:
        r.stats.total_s = time.perf_counter() - r.t_start
        self.runner.release(r)
        if r in self._active:
            self._active.remove(r)
        events.append(CommitEvent(r.id, r.canvas_index if canvas_no is None else canvas_no, new, reason, r.stats))
