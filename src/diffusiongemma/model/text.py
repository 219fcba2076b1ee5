"""The DiffusionGemma text model: one weight stack, run as a causal encoder or a bidirectional decoder.

- `encode`: embeds tokens (or takes given embeddings, e.g. with image vectors placed), runs the stack
  causally and commits keys/values to each sequence's cache. Used for the prompt and for every
  finished canvas.
- `decode`: embeds a canvas, adds the self-conditioning signal, runs the stack bidirectionally over
  [cache ; canvas] without writing the cache, returns the final-normed hidden states.
- `logits` / `soft_embedding`: the full-vocabulary head and self-conditioning embedding, the slow
  obviously-correct path; the engine uses the fused vocabulary pass in `sampling.vocab` instead.

Tokens are packed across sequences ([N] ids, [N, D] activations); `lengths` says how many belong to
each cache. The module names match the checkpoint keys under `model.decoder.` (see `loader`).
This file knows nothing of sampling, tokenisation or scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from ..cache import KVCache, continuing_positions
from ..config import TextConfig
from ..parallel import SINGLE
from ..sampling.head import lm_head
from .attention import Attention, DecoderPass, EncoderPass
from .layers import Experts, GeGLU, RMSNorm, RotaryEmbedding, Router


class TextLayer(nn.Module):
    """Attention, then the dense GeGLU MLP in parallel with the top-k MoE, then `layer_scalar`. Under tensor
    parallelism the dense MLP's and the MoE's partial outputs are summed over the ranks in one all-reduce."""

    tp = SINGLE

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = config.layer_types[layer]
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.mlp = GeGLU(d, config.intermediate_size)
        self.post_feedforward_layernorm_1 = RMSNorm(d, eps)
        self.router = Router(config)
        self.pre_feedforward_layernorm_2 = RMSNorm(d, eps)
        self.experts = Experts(config)
        self.post_feedforward_layernorm_2 = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)
        # The checkpoint stores one scalar per mode (bit-identical in the release); keep both.
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, rope, mode) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope[self.layer_type], mode))
        dense = self.mlp(self.pre_feedforward_layernorm(x))
        weights, index = self.router(x)  # the router reads the un-normed residual
        moe = self.experts(self.pre_feedforward_layernorm_2(x), index, weights)
        if self.tp.active:  # both partial sums in one collective, in the activation dtype (as Megatron, vLLM)
            dense, moe = self.tp.all_reduce(torch.cat([dense, moe.to(x.dtype)]), "mlp").split(x.shape[0])
        dense = self.post_feedforward_layernorm_1(dense)
        moe = self.post_feedforward_layernorm_2(moe)
        x = x + self.post_feedforward_layernorm(dense + moe)
        return (x * getattr(self, mode.layer_scalar)).to(x.dtype)

    def store_only(self, x: torch.Tensor, rope, mode) -> None:
        """The part of `forward` a commit needs from the last layer: its keys/values, stored by `mode`."""
        k, v = self.self_attn.keys_values(self.input_layernorm(x), rope[self.layer_type])
        mode.store(self.self_attn.layer, k, v)


class SelfConditioning(GeGLU):
    """post_norm(canvas_embeddings + GeGLU(pre_norm(soft_embedding))); post_norm has no weight. Under tensor
    parallelism the GeGLU is split like the dense MLP: one all-reduce of [canvas, hidden] per step."""

    tp = SINGLE

    def __init__(self, config: TextConfig):
        super().__init__(config.hidden_size, config.intermediate_size)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        if soft is None:  # first step: the signal is exactly zero (RMS(0) = 0, no biases)
            return self.post_norm(embeds)
        signal = super().forward(self.pre_norm(soft))
        if self.tp.active:
            signal = self.tp.all_reduce(signal, "self_conditioning")
        return self.post_norm(embeds + signal)


class DiffusionGemmaText(nn.Module):
    """The stack. `tp`: the tensor-parallel group this rank belongs to (`model.shard` sets it, with the vocabulary
    rows [vocab_start, vocab_start + V/N) of the tied embedding and `cache_config`, the rank's KV-cache shapes)."""

    tp = SINGLE
    vocab_start = 0

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.cache_config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TextLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.rotary = RotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, spare: int = 0) -> KVCache:
        """An empty cache for one sequence (`spare`: how many committed tokens `truncate` may take back)."""
        return KVCache(self.cache_config, self.dtype, self.device, spare)

    # -- embeddings ------------------------------------------------------------------------------
    def embed_scale(self) -> torch.Tensor:
        """sqrt(hidden) rounded to the weight dtype (bf16: 53.0 for 2816), as the reference does."""
        return torch.tensor(self.config.embed_scale, dtype=torch.float32).to(self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.active:
            return self.embed_tokens(ids) * self.embed_scale()
        local = ids - self.vocab_start  # vocabulary-parallel: each id's row lives on one rank, the others add 0
        held = (local >= 0) & (local < self.embed_tokens.num_embeddings)
        rows = self.embed_tokens(torch.where(held, local, torch.zeros_like(local))) * held[:, None]
        return self.tp.all_reduce(rows, "embedding") * self.embed_scale()

    @property
    def head_weight(self):
        """The tied LM head's weight as the vocabulary functions (`sampling.vocab`) take it: the embedding, or
        under tensor parallelism this rank's `VocabShard`."""
        if not self.tp.active:
            return self.embed_tokens.weight
        from ..sampling.vocab import VocabShard

        return VocabShard(self.embed_tokens.weight, self.vocab_start, self.tp)

    # -- the two modes ---------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor | None, caches: Sequence[KVCache],
               lengths: Sequence[int] | None = None, positions: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None, block_ids: torch.Tensor | None = None,
               hidden: bool = True) -> torch.Tensor | None:
        """Causal pass that commits the tokens to `caches`; returns final-normed hidden [N, D].

        input_ids [N] (or inputs_embeds [N, D]) packed over the sequences; `lengths` per cache (default:
        one sequence); `positions` default to continuing each cache; `block_ids` [N] mark runs of image
        tokens that attend to each other bidirectionally (-1 for text).
        hidden=False: commit only and return None. Nothing reads a commit's hidden states (the decoder starts
        from the canvas), so the last layer computes its keys/values and stops there: no attention, MLP,
        MoE or final norm; the caches are exactly the same.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        lengths, positions = self._layout(caches, lengths, positions, x.shape[0])
        mode = EncoderPass(caches, lengths, positions, self.config.sliding_window, block_ids)
        x = self.forward_tokens(x, positions, mode, hidden=hidden)
        mode.finish()
        return x

    def decode(self, canvas_ids: torch.Tensor, caches: Sequence[KVCache], soft_embeds: torch.Tensor | None = None,
               lengths: Sequence[int] | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional pass over canvases reading `caches`; returns final-normed hidden [N, D].

        soft_embeds [N, D]: the previous step's soft embedding (already scaled), or None on the first step.
        """
        x = self.self_conditioning(self.embed(canvas_ids), soft_embeds)
        lengths, positions = self._layout(caches, lengths, positions, x.shape[0])
        return self.forward_tokens(x, positions, DecoderPass(caches, lengths))

    def _layout(self, caches, lengths, positions, n):
        if lengths is None:
            if len(caches) != 1:
                raise ValueError("lengths are required when several caches share a forward")
            lengths = [n]
        if sum(lengths) != n:
            raise ValueError(f"lengths sum to {sum(lengths)} but {n} tokens were given")
        if positions is None:
            positions = continuing_positions(caches, lengths, self.device)
        return lengths, positions

    def forward_tokens(self, x: torch.Tensor, positions: torch.Tensor, mode, checkpoint: bool = False,
                       hidden: bool = True) -> torch.Tensor | None:
        """Run the stack over packed token embeddings x [N, D] at `positions`, attending as `mode` says
        (an EncoderPass/DecoderPass over caches, or a Batch*Pass for training). Returns the final norm
        (hidden=False, an EncoderPass only: the last layer just stores its keys/values; returns None)."""
        rope = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            if not hidden and i == len(self.layers) - 1:
                layer.store_only(x, rope, mode)
                return None
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mode, use_reentrant=False)
            else:
                x = layer(x, rope, mode)
        return self.norm(x)

    # -- the vocabulary head (slow, full-logits reference path) ----------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head in the weight dtype, then fp32 softcap: cap * tanh(logits / cap) (all of the vocabulary:
        under tensor parallelism each rank's columns are gathered)."""
        z = lm_head(hidden, self.embed_tokens.weight, self.config.final_logit_softcapping)
        if not self.tp.active:
            return z
        return torch.cat(list(self.tp.all_gather(z, "vocabulary").unbind(0)), dim=-1)

    def soft_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits) in fp32, cast to the weight dtype, times the embedding matrix and scale."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(self.dtype)
        if self.tp.active:
            n = self.embed_tokens.num_embeddings
            out = self.tp.all_reduce(probs[..., self.vocab_start:self.vocab_start + n] @ self.embed_tokens.weight,
                                     "vocabulary")
            return out * self.embed_scale()
        return (probs @ self.embed_tokens.weight) * self.embed_scale()
