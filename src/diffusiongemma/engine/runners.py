"""Step runners: how the engine runs the model's passes for its requests. Chosen once, when the engine is
built (`Engine(runner="eager" | "static" | "compiled")`); the engine calls the same five methods on each.

- `EagerRunner`: the model's own `encode` / `decode` and the fused vocabulary pass, op by op. With
  `batch_invariant=True` (the CPU default) each request runs with its own shapes, so its tokens are those
  it gets alone; otherwise all requests of a step share one packed forward (the GPU default).
- `CompiledRunner`: the same passes as two `torch.compile`d graphs (`engine.compiled`): the denoising step
  (decoder forward and vocabulary pass) and the commit of a finished canvas; prefills stay eager.
- `StaticRunner`: every denoising step of all active requests as one fixed-shape step (`engine.static`),
  captured as a CUDA graph on a GPU; each request holds a slot of its buffers while it is active.

A runner computes; it decides nothing. The engine keeps the per-request sampler decisions (acceptance,
stopping, commit), the queue and the events.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import DiffusionGemmaText
from ..sampling.vocab import VocabResult, vocab_pass
from .request import RequestState
from .timings import Timings


@dataclass
class StepResult:
    """One request's outputs of one denoising step."""

    argmax: torch.Tensor  # [L] long
    entropy: torch.Tensor  # [L] fp32, of the temperature-scaled distribution
    sample: torch.Tensor  # [L] long
    soft: torch.Tensor | None  # [L, D] the next step's self-conditioning input (None: not needed)


class EagerRunner:
    name = "eager"

    def __init__(self, model: DiffusionGemmaText, canvas_length: int, timings: Timings, *, max_batch: int = 8,
                 max_context: int | None = None, vocab_chunk: int = 8192, batch_invariant: bool | None = None,
                 vision=None, soft_token_ids: tuple[int, ...] = ()):
        self.model, self.canvas_length, self.timings = model, canvas_length, timings
        self.vocab_chunk = vocab_chunk
        self.batch_invariant = model.device.type == "cpu" if batch_invariant is None else batch_invariant
        self.vision, self.soft_token_ids = vision, tuple(soft_token_ids)
        self.max_context = self.context_limit(model, max_context)

    @staticmethod
    def context_limit(model: DiffusionGemmaText, max_context: int | None) -> int:
        """The most tokens (prompt, generated and one canvas) a request may span."""
        return EagerRunner._checked(model, max_context) or model.config.max_position_embeddings

    @staticmethod
    def _checked(model: DiffusionGemmaText, max_context: int | None) -> int | None:
        limit = model.config.max_position_embeddings
        if max_context is not None and not (isinstance(max_context, int) and 0 < max_context <= limit):
            raise ValueError(f"max_context must be a positive integer at most the model's {limit} positions "
                             f"(max_position_embeddings), got {max_context!r}")
        return max_context

    # -- a request's life ----------------------------------------------------------------------------
    def admit(self, r: RequestState) -> None:
        """A request becomes active (it gets its cache; the static runner also gives it a slot). A speculative
        request's cache can take back a canvas (what the verifier rejects)."""
        r.cache = self.model.new_cache(spare=self.canvas_length if r.mode == "speculative" else 0)

    def release(self, r: RequestState) -> None:
        """A request leaves (finished or cancelled): its memory is freed."""
        if r.cache is not None:
            r.cache.free()

    def _groups(self, batch: list[RequestState]) -> list[list[RequestState]]:
        return [[r] for r in batch] if self.batch_invariant else [batch] if batch else []

    def refresh(self, r: RequestState) -> None:
        """The request's cache changed outside an encoder pass (the verifier took tokens back)."""

    # -- encoder passes: prefill and commit -------------------------------------------------------------
    def encode_groups(self, pending: list[RequestState]) -> list[list[RequestState]]:
        """Requests whose tokens share an encoder pass: prompts with images go alone (their embeddings differ),
        and requests whose hidden states the verifier reads apart from those that only commit."""
        text = [r for r in pending if not r.images]
        return (self._groups([r for r in text if not r.needs_hidden]) + self._groups([r for r in text if r.needs_hidden])
                + [[r] for r in pending if r.images])

    def encode(self, group: list[RequestState]) -> list[torch.Tensor] | None:
        """Commit each request's `to_encode` tokens to its cache; for requests that need them (the same for the
        whole group), their final hidden states, one [len(to_encode), D] tensor each."""
        ids = torch.tensor([t for r in group for t in r.to_encode], device=self.model.device)
        prefill = all(r.stats.commit_forwards == 0 for r in group)
        hidden = group[0].needs_hidden
        with self.timings("prefill" if prefill else "commit"):
            if group[0].images:
                from ..vision.placement import embed_prompt

                r = group[0]
                embeds, blocks = embed_prompt(self.model, self.vision, ids, r.images, self.soft_token_ids)
                out = self.model.encode(None, [r.cache], inputs_embeds=embeds, block_ids=blocks, hidden=hidden)
                r.images = None  # consumed by the prefill
            elif hidden:
                out = self.model.encode(ids, [r.cache for r in group], lengths=[len(r.to_encode) for r in group])
            else:
                out = self._commit(ids, group)
        if not hidden:
            return None
        return list(out.split([len(r.to_encode) for r in group]))

    def _commit(self, ids: torch.Tensor, group: list[RequestState]) -> None:
        self.model.encode(ids, [r.cache for r in group], lengths=[len(r.to_encode) for r in group], hidden=False)

    # -- decoder passes: one denoising step ------------------------------------------------------------
    def denoise_groups(self, ready: list[RequestState]) -> list[list[RequestState]]:
        return self._groups(ready)

    def denoise(self, group: list[RequestState], temps: list[float], temp_rows: torch.Tensor,
                uniforms: torch.Tensor) -> list[StepResult]:
        """One denoising step of each request's canvas: `temps` per request, `temp_rows` and `uniforms` per canvas
        position, the group's requests laid end to end."""
        L, model = self.canvas_length, self.model
        canvases = torch.cat([r.canvas for r in group])
        soft = None
        if any(r.soft is not None for r in group):
            zeros = torch.zeros(L, model.config.hidden_size, dtype=model.dtype, device=model.device)
            soft = torch.cat([r.soft if r.soft is not None else zeros for r in group])
        res = self._forward(canvases, soft, group, temp_rows, uniforms)
        out = []
        for i in range(len(group)):
            rows = slice(i * L, (i + 1) * L)
            out.append(StepResult(res.argmax[rows], res.entropy[rows], res.sample[rows],
                                  res.soft[rows] if res.soft is not None else None))
        return out

    def _forward(self, canvases, soft, group, temps, uniforms) -> VocabResult:
        m, L = self.model, self.canvas_length
        with self.timings("decoder"):
            hidden = m.decode(canvases, [r.cache for r in group], soft, lengths=[L] * len(group))
        with self.timings("vocabulary"):
            return vocab_pass(hidden, m.head_weight, m.config.final_logit_softcapping, temps, uniforms,
                              any(r.wants_soft for r in group), m.embed_scale(), chunk=self.vocab_chunk)


class CompiledRunner(EagerRunner):
    name = "compiled"

    def __init__(self, model: DiffusionGemmaText, canvas_length: int, timings: Timings, **kw):
        super().__init__(model, canvas_length, timings, **kw)
        from .compiled import CompiledStep

        self.compiled = CompiledStep(model, self.vocab_chunk)

    def _commit(self, ids, group):
        if all(r.stats.commit_forwards for r in group):  # commits only (each continues its cache): compiled
            self.compiled.commit(ids, [r.cache for r in group], [len(r.to_encode) for r in group])
        else:  # prefills stay eager (one per request, with shapes of their own)
            super()._commit(ids, group)

    def _forward(self, canvases, soft, group, temps, uniforms) -> VocabResult:
        with self.timings("decoder"):  # decoder forward and vocabulary pass are one compiled graph here
            return self.compiled(canvases, soft, [r.cache for r in group], [self.canvas_length] * len(group), temps,
                                 uniforms)


class StaticRunner(EagerRunner):
    name = "static"

    def __init__(self, model: DiffusionGemmaText, canvas_length: int, timings: Timings, *, max_batch: int = 8,
                 **kw):
        super().__init__(model, canvas_length, timings, max_batch=max_batch, **kw)
        from .static import StaticStep

        self.static = StaticStep(model, max_batch, canvas_length, self.max_context - canvas_length, self.vocab_chunk)
        self._free = list(range(max_batch))

    @staticmethod
    def context_limit(model: DiffusionGemmaText, max_context: int | None) -> int:
        # fixed buffers need a bound
        return EagerRunner._checked(model, max_context) or min(8192, model.config.max_position_embeddings)

    def admit(self, r: RequestState) -> None:
        super().admit(r)
        r.slot = self._free.pop(0)

    def release(self, r: RequestState) -> None:
        super().release(r)
        if r.slot >= 0:
            self.static.clear(r.slot)
            self._free.append(r.slot)
            r.slot = -1

    def encode(self, group: list[RequestState]) -> list[torch.Tensor] | None:
        out = super().encode(group)
        for r in group:
            self.static.load(r.slot, r.cache)
        return out

    def refresh(self, r: RequestState) -> None:
        self.static.load(r.slot, r.cache)

    def denoise_groups(self, ready: list[RequestState]) -> list[list[RequestState]]:
        return [ready] if ready else []  # every slot steps in one fixed-shape forward

    def denoise(self, group: list[RequestState], temps: list[float], temp_rows: torch.Tensor,
                uniforms: torch.Tensor) -> list[StepResult]:
        st, L = self.static, self.canvas_length
        for i, (r, t) in enumerate(zip(group, temps)):
            st.set_inputs(r.slot, r.canvas, r.soft, r.cache.next_position, t, uniforms[i * L:(i + 1) * L])
        with self.timings("decoder"):  # decoder forward and vocabulary pass are one step (one graph) here
            st.run()
        out = []
        for r in group:
            rows = st.rows(r.slot)
            out.append(StepResult(st.argmax[rows].clone(), st.entropy[rows].clone(), st.sample[rows].clone(),
                                  st.next_soft[rows].clone() if r.wants_soft else None))
        return out


RUNNERS = {cls.name: cls for cls in (EagerRunner, CompiledRunner, StaticRunner)}


def make_runner(name: str, model: DiffusionGemmaText, canvas_length: int, timings: Timings, **kw) -> EagerRunner:
    if name not in RUNNERS:
        raise ValueError(f"unknown step runner {name!r}; choose one of {', '.join(RUNNERS)}")
    if model.tp.active and name != "eager":
        raise ValueError(f"the {name} step runner does not run tensor-parallel yet; use the eager runner "
                         "(no --compile) with --tensor-parallel")
    return RUNNERS[name](model, canvas_length, timings, **kw)
