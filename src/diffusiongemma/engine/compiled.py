"""The engine's denoising step and canvas commit compiled with `torch.compile` (inductor): the CPU answer to
per-op dispatch cost.

A small model's denoising step on a CPU is bound by how many operators Python dispatches, not by
arithmetic: the shipped model's decoder forward runs ~740 aten ops over a 16-token canvas, ~9 us each.
`CompiledStep` compiles the decoder forward *and* the vocabulary pass of one group of requests into one
graph of fused C++ kernels, and the commit (the encoder pass over a finished canvas) into another. The
caches go in as plain tensors (`KVView`) with dynamic sizes, cache lengths are not assumed equal to each
other (no duck sizing), and a cache always has a spare row past its tokens, so one graph serves every
cache length (no recompile in a run past the sliding window: `TORCH_LOGS=recompiles`).

Opt-in (`Engine(runner="compiled")`, `--compile` on the command line): the first step and the first commit
compile (30-45 s on two cores, in every process: inductor's on-disk cache does not serve frozen graphs),
and the numerics are not the reference's op-by-op ones: inductor keeps fused intermediates in fp32
instead of rounding each op's output to bf16, so a bf16 step's entropies move by ~1e-2 and a close call
may go the other way. fp32 stays within 1e-4 of the eager step and gives the eager engine's tokens (tests).
If compilation fails (no C++ compiler, an unsupported op) the engine warns once and runs the same code
eagerly from then on. Measured and tested on CPU only (no GPU has been lent to this project); on a GPU the
static step with its CUDA graph (`engine.static`) is the intended path.

The first step of a canvas has no soft embedding; it gets zeros, which self-conditioning turns into
exactly the input it gives for "none" (RMS(0) = 0, no biases), so both cases share one graph. A group of
several requests in one forward (`batch_invariant=False`) compiles once per group size; the CPU default runs
one request per forward, so one graph each for the step and the commit. The prompt prefill stays eager (one
per request, with shapes and images of its own). Ids must be valid (the engine checks them on `add`): a
compiled embedding lookup aborts on an out-of-range id instead of raising.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.fx.experimental._config

from ..cache import KVCache, KVView, continuing_positions
from ..model import DiffusionGemmaText
from ..sampling.vocab import VocabResult, vocab_pass

log = logging.getLogger(__name__)
# inductor settings of these two graphs only (not global): parameters folded in as constants with the
# matrices pre-packed for oneDNN (the weights of an inference engine do not change), and a C++ wrapper that
# calls the kernels without going back to Python between them
OPTIONS = {"freezing": True, "cpp_wrapper": True}


class _Recorder(KVView):
    """A `KVView` that collects what an encoder pass stores (per layer, in order) instead of writing a cache."""

    def __init__(self, *args):
        super().__init__(*args)
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.new_keys.append(k)
        self.new_values.append(v)

    def advance(self, positions: torch.Tensor) -> None:
        pass


class CompiledStep:
    """The compiled denoising step (`__call__`) and canvas commit (`commit`) of a model."""

    def __init__(self, model: DiffusionGemmaText, vocab_chunk: int = 8192):
        self.model, self.vocab_chunk = model, vocab_chunk
        self.layers = model.config.num_hidden_layers
        self._step_graph = torch.compile(self._step, dynamic=True, options=OPTIONS)
        self._commit_graph = torch.compile(self._commit, dynamic=True, options=OPTIONS)
        self.failed: str | None = None  # why compilation was given up, if it was

    # -- what is compiled (plain tensors and ints in, tensors out) ---------------------------------------
    def _views(self, cls, lengths, keys, values, stored, starts, all_positions=None):
        n = self.layers
        return [cls(keys[i * n:(i + 1) * n], values[i * n:(i + 1) * n], stored[i * n:(i + 1) * n],
                    all_positions[i] if all_positions else None, starts[i * n:(i + 1) * n])
                for i in range(len(lengths))]

    def _step(self, canvases, soft, positions, lengths: tuple[int, ...], keys: list[torch.Tensor],
              values: list[torch.Tensor], stored: list[int], starts: list[int], temps,
              uniforms) -> tuple[torch.Tensor, ...]:
        m = self.model
        views = self._views(KVView, lengths, keys, values, stored, starts)
        hidden = m.decode(canvases, views, soft, lengths=list(lengths), positions=positions)
        r = vocab_pass(hidden, m.embed_tokens.weight, m.config.final_logit_softcapping, temps, uniforms, True,
                       m.embed_scale(), chunk=self.vocab_chunk)
        return r.argmax, r.entropy, r.sample, r.soft

    def _commit(self, ids, positions, lengths: tuple[int, ...], keys, values, stored, starts, all_positions):
        views = self._views(_Recorder, lengths, keys, values, stored, starts, all_positions)
        self.model.encode(ids, views, lengths=list(lengths), positions=positions, hidden=False)
        return [k for v in views for k in v.new_keys], [x for v in views for x in v.new_values]

    # -- calling it ------------------------------------------------------------------------------------
    def _run(self, graph, eager, args):
        if self.failed is None:
            try:
                with torch.fx.experimental._config.patch(use_duck_shape=False):  # cache lengths are independent
                    return graph(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the same code, eagerly
                self.failed = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                log.warning("torch.compile of the engine step failed (%s); running it eagerly", self.failed)
        return eager(*args)

    def _inputs(self, caches: Sequence[KVCache], lengths: Sequence[int]):
        positions = continuing_positions(caches, lengths, self.model.device)
        views = [KVView.of(c) for c in caches]
        return (positions, tuple(lengths), [k for v in views for k in v.keys], [x for v in views for x in v.values],
                [t for v in views for t in v.lengths], [a for v in views for a in v.starts]), views

    def __call__(self, canvases: torch.Tensor, soft: torch.Tensor | None, caches: Sequence[KVCache],
                 lengths: Sequence[int], temps: torch.Tensor, uniforms: torch.Tensor) -> VocabResult:
        """One denoising step of a group: canvases [N] packed over `caches`, soft [N, D] or None (first step)."""
        m = self.model
        if soft is None:
            soft = torch.zeros(canvases.shape[0], m.config.hidden_size, dtype=m.dtype, device=m.device)
        inputs, _ = self._inputs(caches, lengths)
        return VocabResult(*self._run(self._step_graph, self._step, (canvases, soft, *inputs, temps, uniforms)))

    def commit(self, ids: torch.Tensor, caches: Sequence[KVCache], lengths: Sequence[int]) -> None:
        """Commit tokens ([N] packed over `caches`, each continuing its cache) as `model.encode(hidden=False)`."""
        inputs, views = self._inputs(caches, lengths)
        new_k, new_v = self._run(self._commit_graph, self._commit, (ids, *inputs, [v.all_positions for v in views]))
        n, start = self.layers, 0
        for s, (cache, k) in enumerate(zip(caches, lengths)):
            for layer in range(n):
                cache.append(layer, new_k[s * n + layer], new_v[s * n + layer])
            cache.advance(inputs[0][start:start + k])
            start += k
