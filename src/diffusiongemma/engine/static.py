"""A denoising step with static shapes, so that a GPU can capture it once as a CUDA graph and replay it.

The eager runner (`engine.runners.EagerRunner`) concatenates each request's cache with its canvas keys, so
shapes change at every commit and every step launches a few hundred kernels from Python; for a small
batch on a GPU that launch overhead, not memory bandwidth, sets the speed. `StaticStep` instead keeps,
for `slots` requests, every layer's committed keys/values in fixed buffers
[slots, kv_heads, capacity + canvas, head_dim] (the canvas's own keys are written into the tail at each
step) with a validity mask, and runs the decoder forward plus the fused vocabulary pass from fixed
input buffers (canvas ids, soft embedding, positions, temperatures, uniforms) into fixed outputs
(argmax, entropy, sample, next soft embedding). Nothing in the step reads a value back to the host,
so on CUDA it is captured once (`torch.cuda.CUDAGraph`) and each step is one replay; on CPU the same
code runs eagerly (tested against the dynamic path).

A slot's buffers are refilled from its `KVCache` after each commit: one copy of the cache per canvas,
while each of the canvas's ~16 steps reads all of it, so the copy adds a few percent of traffic.
Sliding-window layers hold the last window-1 keys; keys are stored after RoPE, so their order in the
buffer does not matter to attention. The first step's missing soft embedding is a zero buffer, which
self-conditioning turns into exactly the same input as "no soft embedding" (RMS(0) = 0, no biases).

What it does not do: per-request decisions (acceptance bound, stopping, commit) stay in the engine,
they need the step's outputs; the encoder (prefill and commit) keeps dynamic shapes.
"""

from __future__ import annotations

import torch

from ..cache import KVCache
from ..model import DiffusionGemmaText
from ..model.attention import StaticDecoderPass
from ..sampling.vocab import vocab_pass


class StaticStep:
    def __init__(self, model: DiffusionGemmaText, slots: int, canvas_length: int, capacity: int,
                 vocab_chunk: int = 8192, graph: bool | None = None):
        """capacity: the most committed tokens a slot may hold (prompt plus generated canvases).
        graph: capture a CUDA graph (default: when the model is on CUDA)."""
        cfg = model.config
        self.model, self.slots, self.canvas_length, self.vocab_chunk = model, slots, canvas_length, vocab_chunk
        self.capacity = capacity
        dev, dt = model.device, model.dtype
        self.graph_enabled = dev.type == "cuda" if graph is None else graph
        n = cfg.num_hidden_layers
        caps = [min(capacity, cfg.sliding_window - 1) if cfg.is_sliding(i) else capacity for i in range(n)]
        self._cap = {("sliding_attention" if cfg.is_sliding(i) else "full_attention"): c for i, c in enumerate(caps)}
        self.k = [torch.zeros(slots, cfg.layer_kv_heads(i), caps[i] + canvas_length, cfg.layer_head_dim(i),
                              dtype=dt, device=dev) for i in range(n)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.masks = {}
        for t, c in self._cap.items():
            m = torch.zeros(slots, 1, 1, c + canvas_length, dtype=torch.bool, device=dev)
            m[..., c:] = True
            self.masks[t] = m
        rows = slots * canvas_length
        # inputs
        self.canvas = torch.zeros(slots, canvas_length, dtype=torch.long, device=dev)
        self.soft = torch.zeros(rows, cfg.hidden_size, dtype=dt, device=dev)
        self.positions = torch.zeros(slots, canvas_length, dtype=torch.long, device=dev)
        self.temps = torch.ones(rows, dtype=torch.float32, device=dev)
        self.uniforms = torch.full((rows,), 0.5, dtype=torch.float32, device=dev)
        # outputs
        self.argmax = torch.zeros(rows, dtype=torch.long, device=dev)
        self.entropy = torch.zeros(rows, dtype=torch.float32, device=dev)
        self.sample = torch.zeros(rows, dtype=torch.long, device=dev)
        self.next_soft = torch.zeros_like(self.soft)
        self._mode = StaticDecoderPass(self.k, self.v, self.masks, slots, canvas_length)
        self._graph = None

    # -- slots -----------------------------------------------------------------------------------
    def load(self, slot: int, cache: KVCache) -> None:
        """Copy a slot's committed keys/values (after a prefill or commit) into the static buffers."""
        if cache.length > self.capacity:
            raise ValueError(f"{cache.length} committed tokens exceed the static capacity of {self.capacity}")
        for i in range(len(self.k)):
            k, v = cache.layer(i)
            t = k.shape[1]
            self.k[i][slot, :, :t] = k
            self.v[i][slot, :, :t] = v
        for t, c in self._cap.items():
            self.masks[t][slot, ..., :c] = False
            self.masks[t][slot, ..., :min(cache.length, c)] = True

    def clear(self, slot: int) -> None:
        for t, c in self._cap.items():
            self.masks[t][slot, ..., :c] = False

    def set_inputs(self, slot: int, canvas: torch.Tensor, soft: torch.Tensor | None, first_position: int,
                   temperature: float, uniforms: torch.Tensor) -> None:
        L = self.canvas_length
        rows = slice(slot * L, (slot + 1) * L)
        self.canvas[slot] = canvas
        if soft is None:
            self.soft[rows] = 0
        else:
            self.soft[rows] = soft
        self.positions[slot] = torch.arange(first_position, first_position + L, device=self.canvas.device)
        self.temps[rows] = temperature
        self.uniforms[rows] = uniforms

    def rows(self, slot: int) -> slice:
        return slice(slot * self.canvas_length, (slot + 1) * self.canvas_length)

    # -- the step ----------------------------------------------------------------------------------
    def _forward(self) -> None:
        m = self.model
        x = m.self_conditioning(m.embed(self.canvas.view(-1)), self.soft)
        hidden = m.forward_tokens(x, self.positions.view(-1), self._mode)
        res = vocab_pass(hidden, m.embed_tokens.weight, m.config.final_logit_softcapping, self.temps, self.uniforms,
                         True, m.embed_scale(), chunk=self.vocab_chunk)
        self.argmax.copy_(res.argmax)
        self.entropy.copy_(res.entropy)
        self.sample.copy_(res.sample)
        self.next_soft.copy_(res.soft)

    @torch.inference_mode()
    def run(self) -> None:
        """One denoising step of every slot (results in argmax/entropy/sample/next_soft)."""
        if not self.graph_enabled:
            self._forward()
            return
        if self._graph is None:
            self._capture()
        self._graph.replay()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (allocator, kernels' lazy init)
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._forward()
