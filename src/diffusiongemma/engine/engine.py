"""The generation engine: requests that each run the released sampler, batched step by step.

Each engine `step()`:
  1. drops cancelled requests (their caches are freed);
  2. runs one packed encoder pass over every prompt waiting to be prefilled and every canvas waiting
     to be committed (admitting new requests up to `max_batch`);
  3. runs one packed decoder pass over the canvases of all denoising requests, then the fused
     vocabulary pass, then each request's own sampler update (its temperature, bound, thresholds,
     draws). A request whose canvas converged (or hit its step cap) commits the argmax canvas, cut
     after its first stop id and at `max_tokens`, and either finishes or starts its next canvas.

Requests finish independently: one that finishes leaves at once and a waiting one joins at the next
step. Draws are keyed by (seed, canvas, step), so a request's random numbers do not depend on its
batch. Bitwise, a library GEMM's rows depend on how many rows it multiplies, and the sampler's
thresholds (acceptance bound, stop criterion) turn a last-bit difference into a different token now
and then; so with `batch_invariant=True` (the default on CPU, where 256-row GEMMs already run at
full speed) each request's forwards run with its own shapes inside the shared step, and its tokens
are exactly those it gets alone. With `batch_invariant=False` (the default on GPU, where packing B
canvases costs about as much as one) all canvases share one packed forward.
Everything is reported as a stream of events (`CommitEvent`, and `DraftEvent` when asked).
The engine speaks token ids only.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..config import GenerationConfig
from ..model import DiffusionGemmaText
from ..sampling.draws import INIT, RENOISE, Draws
from ..sampling.sampler import entropy_bound_accept, finalize_canvas, stable_and_confident, temperature
from ..sampling.vocab import vocab_pass
from .request import (
    CommitAction,
    CommitEvent,
    CommitHook,
    DraftEvent,
    Event,
    RequestError,
    RequestStats,
    ResolvedParams,
    SamplingParams,
)


class Timings:
    """Accumulated wall time and call counts per phase; synchronises the device around each phase
    only when `enabled` (the benchmark turns it on), so normal runs pay nothing."""

    def __init__(self, device: torch.device, enabled: bool = False):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
        self.calls[phase] = self.calls.get(phase, 0) + 1

    def ms_per_call(self, phase: str) -> float:
        return 1000 * self.seconds.get(phase, 0.0) / max(self.calls.get(phase, 0), 1)


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats
    seed: int


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: ResolvedParams
    draws: Draws
    hook: CommitHook | None
    stats: RequestStats
    t_start: float
    cache: KVCache | None = None
    to_encode: list[int] = field(default_factory=list)  # prompt, then each committed canvas
    canvas_index: int = 0
    step: int = 0
    canvas: torch.Tensor | None = None
    soft: torch.Tensor | None = None
    history: list[torch.Tensor] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    images: list | None = None  # preprocessed images / video frames for the prompt's soft tokens
    slot: int = -1  # its row in the static step (static engines only)


class Engine:
    def __init__(self, model: DiffusionGemmaText, generation_config: GenerationConfig, canvas_length: int,
                 max_batch: int = 8, vocab_chunk: int = 8192, max_context: int | None = None,
                 batch_invariant: bool | None = None, vision=None, soft_token_ids: Sequence[int] = (),
                 static: bool = False, compile: bool = False):
        """static: run every denoising step of all active requests as one fixed-shape step (`StaticStep`),
        captured as a CUDA graph on a GPU; needs a bounded `max_context` (default 8,192 then).
        compile: run each denoising step (decoder forward and vocabulary pass) as one `torch.compile`d graph
        (`CompiledStep`): the first step compiles (tens of seconds), later ones skip per-op dispatch."""
        self.model = model
        self.gen = generation_config
        self.canvas_length = canvas_length
        self.max_batch = max_batch
        self.vocab_chunk = vocab_chunk
        self.vocab_size = model.config.vocab_size
        self.max_context = max_context or (min(8192, model.config.max_position_embeddings) if static
                                            else model.config.max_position_embeddings)
        self.batch_invariant = model.device.type == "cpu" if batch_invariant is None else batch_invariant
        self.vision, self.soft_token_ids = vision, tuple(soft_token_ids)  # image input (optional)
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._cancel: set[str] = set()
        self.timings = Timings(model.device)  # where the time goes (decoder, vocabulary, sampler, commit)
        self._static = None
        if static:
            from .static import StaticStep

            self._static = StaticStep(model, max_batch, canvas_length, self.max_context - canvas_length, vocab_chunk)
            self._free_slots = list(range(max_batch))
        if static and compile:
            raise ValueError("compile and static are two different step paths: choose one")
        self._compiled = None
        if compile:
            from .compiled import CompiledStep

            self._compiled = CompiledStep(model, vocab_chunk)

    @classmethod
    def from_checkpoint(cls, checkpoint, extra_soft_ids: Sequence[int] = (), **kw) -> Engine:
        """An engine for a loaded checkpoint; with its vision tower, the image token (and any
        `extra_soft_ids`, e.g. the video token) mark where vision vectors go."""
        if checkpoint.vision is not None:
            kw.setdefault("vision", checkpoint.vision)
            kw.setdefault("soft_token_ids", (checkpoint.config.image_token_id, *extra_soft_ids))
        return cls(checkpoint.model, checkpoint.generation_config, checkpoint.config.canvas_length, **kw)

    # -- requests ------------------------------------------------------------------------------
    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None,
            hook: CommitHook | None = None, images: Sequence | None = None) -> str:
        """Queue a request; returns its id. Raises RequestError naming a bad parameter.

        images: preprocessed images (and video frames), in the order of the prompt's soft-token runs."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise RequestError("prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        resolved = params.resolve(self.gen, seed)
        if resolved.initial_canvas is not None:
            ic = resolved.initial_canvas
            if len(ic) != self.canvas_length or max(ic) >= self.vocab_size:
                raise RequestError(f"initial_canvas must be {self.canvas_length} token ids below {self.vocab_size}")
        need = len(prompt) + resolved.max_tokens + self.canvas_length
        if need > self.max_context:
            raise RequestError(f"prompt ({len(prompt)} tokens) plus max_tokens ({resolved.max_tokens}) exceeds the "
                               f"context of {self.max_context} tokens")
        if images:
            if self.vision is None:
                raise RequestError("this model has no vision tower: images are not supported")
            soft = sum(1 for t in prompt if t in self.soft_token_ids)
            need = sum(im.num_soft_tokens for im in images)
            if soft != need:
                raise RequestError(f"the prompt has {soft} image soft tokens but the images need {need}")
        rid = request_id or f"req-{next(self._ids)}"
        req = _Request(rid, prompt, resolved, Draws(resolved.seed, self.model.device), hook,
                       RequestStats(prompt_tokens=len(prompt)), time.perf_counter(), to_encode=list(prompt),
                       images=list(images) if images else None)
        with self._lock:
            self._waiting.append(req)
        return rid

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancel.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._active)

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()  # no autograd bookkeeping on any op of the step
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._drop_cancelled(events)
        self._admit()
        self._encode_pending()
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
        built on first use (the compiled graphs of `compile=True`, allocator pools) is built now; returns the
        seconds it took. Call it while the engine is idle (a server does, before it accepts requests)."""
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
                req.cache = self.model.new_cache()
                if self._static is not None:
                    req.slot = self._free_slots.pop(0)
                self._active.append(req)

    def _groups(self, batch: list[_Request]) -> list[list[_Request]]:
        return [[r] for r in batch] if self.batch_invariant else [batch] if batch else []

    def _encode_pending(self) -> None:
        """Encoder passes: new prompts (prefill) and finished canvases (commit)."""
        pending = [r for r in self._active if r.to_encode]
        with_images = [[r] for r in pending if r.images]  # prompts with images go alone (their embeddings differ)
        for group in self._groups([r for r in pending if not r.images]) + with_images:
            self._encode_group(group)

    def _encode_group(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        ids = torch.tensor([t for r in batch for t in r.to_encode], device=self.model.device)
        prefill = all(r.stats.commit_forwards == 0 for r in batch)
        with self.timings("prefill" if prefill else "commit"):
            if batch[0].images:
                from ..vision.placement import embed_prompt

                embeds, blocks = embed_prompt(self.model, self.vision, ids, batch[0].images, self.soft_token_ids)
                self.model.encode(None, [batch[0].cache], inputs_embeds=embeds, block_ids=blocks, hidden=False)
                batch[0].images = None  # consumed by the prefill
            elif self._compiled is not None and all(r.stats.commit_forwards for r in batch):
                # commits only (each continues its cache): one compiled graph; prefills stay eager
                self._compiled.commit(ids, [r.cache for r in batch], [len(r.to_encode) for r in batch])
            else:
                self.model.encode(ids, [r.cache for r in batch], lengths=[len(r.to_encode) for r in batch], hidden=False)
        dt = time.perf_counter() - t0
        for r in batch:
            if r.stats.commit_forwards == 0:
                r.stats.prefill_s = dt
            r.stats.commit_forwards += 1
            r.to_encode = []
            if self._static is not None:
                self._static.load(r.slot, r.cache)
            self._new_canvas(r)

    def _new_canvas(self, r: _Request) -> None:
        L = self.canvas_length
        if r.canvas_index == 0 and r.params.initial_canvas is not None:
            r.canvas = torch.tensor(r.params.initial_canvas, device=self.model.device)
        else:
            r.canvas = r.draws.tokens(r.canvas_index, 0, INIT, L, self.vocab_size)
        r.step, r.soft, r.history = 0, None, []

    def _denoise(self, events: list[Event]) -> None:
        ready = [r for r in self._active if r.canvas is not None and not r.to_encode]
        if self._static is not None:
            if ready:
                self._denoise_static(ready, events)
            return
        for group in self._groups(ready):
            self._denoise_group(group, events)

    def _denoise_static(self, batch: list[_Request], events: list[Event]) -> None:
        """Every slot steps in one fixed-shape forward; slots not denoising now compute and are ignored."""
        st = self._static
        temps = [self._temperature(r) for r in batch]
        for r, t in zip(batch, temps):
            st.set_inputs(r.slot, r.canvas, r.soft, r.cache.next_position, t,
                          r.draws.uniforms(r.canvas_index, r.step, self.canvas_length))
        with self.timings("decoder"):  # decoder forward and vocabulary pass are one step (one graph) here
            st.run()
        with self.timings("sampler"):
            for r, t in zip(batch, temps):
                rows = st.rows(r.slot)
                soft = st.next_soft[rows].clone() if r.step + 1 < r.params.max_denoising_steps else None
                self._update(r, t, st.argmax[rows].clone(), st.entropy[rows].clone(), st.sample[rows].clone(),
                             soft, events)

    def _denoise_group(self, batch: list[_Request], events: list[Event]) -> None:
        L, model = self.canvas_length, self.model
        canvases = torch.cat([r.canvas for r in batch])
        soft = None
        if any(r.soft is not None for r in batch):
            zeros = torch.zeros(L, model.config.hidden_size, dtype=model.dtype, device=model.device)
            soft = torch.cat([r.soft if r.soft is not None else zeros for r in batch])
        with self.timings("sampler"):  # the step's draws (counted as sampler work)
            temps = [self._temperature(r) for r in batch]
            temp_rows = torch.tensor(temps, dtype=torch.float32, device=model.device).repeat_interleave(L)
            uniforms = torch.cat([r.draws.uniforms(r.canvas_index, r.step, L) for r in batch])
        if self._compiled is not None:
            with self.timings("decoder"):  # decoder forward and vocabulary pass are one compiled graph here
                res = self._compiled(canvases, soft, [r.cache for r in batch], [L] * len(batch), temp_rows, uniforms)
        else:
            with self.timings("decoder"):
                hidden = model.decode(canvases, [r.cache for r in batch], soft, lengths=[L] * len(batch))
            with self.timings("vocabulary"):
                want_soft = any(r.step + 1 < r.params.max_denoising_steps for r in batch)
                res = vocab_pass(hidden, model.embed_tokens.weight, model.config.final_logit_softcapping, temp_rows,
                                 uniforms, want_soft, model.embed_scale(), chunk=self.vocab_chunk)

        with self.timings("sampler"):
            for i, r in enumerate(batch):
                rows = slice(i * L, (i + 1) * L)
                self._update(r, temps[i], res.argmax[rows], res.entropy[rows], res.sample[rows],
                             res.soft[rows] if res.soft is not None else None, events)

    def _temperature(self, r: _Request) -> float:
        p = r.params
        return temperature(r.step, p.max_denoising_steps, p.t_min, p.t_max, p.schedule_steps)

    def _update(self, r: _Request, temp: float, argmax, entropy, sample, soft, events: list[Event]) -> None:
        p = r.params
        accepted = entropy_bound_accept(entropy, p.entropy_bound)
        noise = r.draws.tokens(r.canvas_index, r.step, RENOISE, self.canvas_length, self.vocab_size)
        next_canvas = torch.where(accepted, sample, noise)
        done = stable_and_confident(argmax, r.history, p.stability_threshold, float(entropy.mean()),
                                    p.confidence_threshold)
        r.history = (r.history + [argmax])[-max(p.stability_threshold, 1):]
        r.step += 1
        r.stats.decoder_forwards += 1
        if p.draft:
            events.append(DraftEvent(r.id, r.canvas_index, r.step - 1, temp, argmax, accepted, entropy,
                                      done or r.step >= p.max_denoising_steps, len(r.generated)))
        if done or r.step >= p.max_denoising_steps:
            self._commit_canvas(r, argmax, events)
        else:
            r.canvas, r.soft = next_canvas, soft

    def _commit_canvas(self, r: _Request, argmax: torch.Tensor, events: list[Event]) -> None:
        p = r.params
        r.stats.steps_per_canvas.append(r.step)
        stop_ids = torch.tensor(p.stop_token_ids or [-1], device=argmax.device)
        canvas, stop_at = finalize_canvas(argmax, stop_ids, self.gen.pad_token_id)
        new = canvas[: stop_at + 1].tolist() if stop_at is not None else canvas.tolist()
        reason = "stop" if stop_at is not None else None
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
        new = new + list(append)
        r.generated.extend(new)
        r.stats.completion_tokens = len(r.generated)
        r.stats.counted_tokens += sum(1 for t in new if t != self.gen.pad_token_id)
        if r.stats.ttft_s is None and new:
            r.stats.ttft_s = time.perf_counter() - r.t_start
        if reason is None and len(r.generated) >= p.max_tokens:
            reason = "length"
        canvas_no = r.canvas_index
        r.canvas_index += 1
        r.canvas = r.soft = None
        if reason is not None:
            self._finish(r, reason, new, events, canvas_no)
        else:
            r.to_encode = new  # committed by the encoder at the next step, then the next canvas starts
            events.append(CommitEvent(r.id, canvas_no, new, None, r.stats))

    def _finish(self, r: _Request, reason: str, new: list[int], events: list[Event], canvas_no: int | None = None):
        r.stats.total_s = time.perf_counter() - r.t_start
        if r.cache is not None:
            r.cache.free()
        if self._static is not None and r.slot >= 0:
            self._static.clear(r.slot)
            self._free_slots.append(r.slot)
            r.slot = -1
        if r in self._active:
            self._active.remove(r)
        events.append(CommitEvent(r.id, r.canvas_index if canvas_no is None else canvas_no, new, reason, r.stats))
