"""Self-attention of the text stack and the two ways a forward pass attends.

One attention module serves both modes; the mode is an argument, an object that knows the
sequences in the packed batch and their caches:

- `EncoderPass` (prompt prefill, canvas commit): causal, sliding layers limited to the window
  (key k visible to query q iff 0 <= pos_q - pos_k < window), optional bidirectional runs of image
  tokens, and it *writes* the new keys/values into each sequence's cache.
- `DecoderPass` (a denoising step): every canvas query sees every cached key of that layer (the last
  window-1 on sliding layers, the same window for all canvas queries, as the reference's sdpa path)
  plus every canvas key; the cache is read, never written.
- `StaticDecoderPass`: the same attention over fixed-shape key buffers with a validity mask
  (`engine.static`, for CUDA graphs); `Batch*Pass`: the training passes over padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..config import TextConfig
from ..parallel import SINGLE
from .layers import RMSNorm, apply_rope, may_reorder_sums, rms


class Attention(nn.Module):
    """q/k norms, weightless v norm, V = raw K on global layers (no v_proj), scale 1.0, GQA. Under tensor
    parallelism (`model.shard`) a rank holds some heads; its o_proj output is summed over the ranks."""

    tp = SINGLE

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.layer_type = config.layer_types[layer]
        self.heads = config.num_attention_heads
        self.kv_heads = config.layer_kv_heads(layer)
        self.head_dim = config.layer_head_dim(layer)
        self.eps = config.rms_norm_eps
        d, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False) if config.layer_has_v_proj(layer) else None
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mode) -> torch.Tensor:
        n = x.shape[0]
        cos, sin = rope
        q = apply_rope(self.q_norm(self.q_proj(x).view(n, self.heads, self.head_dim)), cos, sin)
        k, v = self.keys_values(x, rope)
        out = mode.attend(self.layer, self.layer_type, q, k, v)  # [N, H, d]
        out = self.o_proj(out.reshape(n, self.heads * self.head_dim))
        return self.tp.all_reduce(out, "attention") if self.tp.active else out

    def keys_values(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (k-norm, RoPE) and values (weightless v-norm; raw keys on K = V layers), [N, Hkv, d] each."""
        n = x.shape[0]
        k_raw = self.k_proj(x).view(n, self.kv_heads, self.head_dim)
        v_raw = self.v_proj(x).view(n, self.kv_heads, self.head_dim) if self.v_proj is not None else k_raw
        return apply_rope(self.k_norm(k_raw), *rope), rms(v_raw, self.eps).type_as(v_raw)


_CAUSAL = "causal"  # marker: plain causal attention over exactly the new tokens


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | str | None) -> torch.Tensor:
    """q [Lq, H, d], k/v [Hkv, T, d] -> [Lq, H, d]."""
    causal = isinstance(mask, str)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=None if causal or mask is None else mask[None, None],
        is_causal=causal,
        scale=1.0, enable_gqa=k.shape[0] != q.shape[1],
    )
    return out[0].transpose(0, 1)


def _heads_first(b: int, n: int, *ts: torch.Tensor):
    """Packed rows [b*n, H, d] -> [b, H, n, d] views, one per tensor."""
    return (t.view(b, n, *t.shape[1:]).transpose(1, 2) for t in ts)


def _batched_sdpa(q, k, v, mask) -> torch.Tensor:
    """q [b, H, n, d], k/v [b, Hkv, T, d], boolean mask -> packed rows [b*n, H, d]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=k.shape[1] != q.shape[1])
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b * n, h, d)


class _Pass:
    def __init__(self, caches: Sequence[KVCache], lengths: Sequence[int]):
        if len(caches) != len(lengths):
            raise ValueError(f"{len(caches)} caches for {len(lengths)} sequences")
        self.caches, self.lengths = list(caches), list(lengths)
        self.starts = [0]
        for n in self.lengths[:-1]:
            self.starts.append(self.starts[-1] + n)

    def _split(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t[self.starts[i]:self.starts[i] + self.lengths[i]]


class EncoderPass(_Pass):
    """Causal pass that commits its tokens to the caches."""

    layer_scalar = "encoder_layer_scalar"

    def __init__(self, caches, lengths, positions: torch.Tensor, window: int,
                 block_ids: torch.Tensor | None = None):
        super().__init__(caches, lengths)
        self.positions, self.window = positions, window
        self.block_ids = block_ids
        self._masks: dict[tuple[int, str], torch.Tensor | str] = {}

    def _mask(self, i: int, layer: int, layer_type: str) -> torch.Tensor | str:
        key = (i, layer_type)
        if key not in self._masks:
            cache = self.caches[i]
            pq = self._split(self.positions, i)
            past = cache.positions(layer)
            if past.numel() == 0 and self.block_ids is None and (
                    layer_type != "sliding_attention" or pq.shape[0] <= self.window):
                # Plain causal: let SDPA use its causal kernel, as the reference does (same numerics).
                self._masks[key] = _CAUSAL
                return _CAUSAL
            pk = torch.cat([past, pq])
            delta = pq[:, None] - pk[None, :]
            allowed = delta >= 0
            if layer_type == "sliding_attention":
                allowed &= delta < self.window
            if self.block_ids is not None:
                bq = self._split(self.block_ids, i)
                bk = torch.cat([torch.full((pk.shape[0] - pq.shape[0],), -1, dtype=bq.dtype, device=bq.device), bq])
                allowed |= (bq[:, None] == bk[None, :]) & (bq[:, None] >= 0)
            self._masks[key] = allowed
        return self._masks[key]

    def attend(self, layer: int, layer_type: str, q, k, v) -> torch.Tensor:
        outs = []
        for i, cache in enumerate(self.caches):
            qi, ki, vi = (self._split(t, i) for t in (q, k, v))
            past_k, past_v = cache.layer(layer)
            mask = self._mask(i, layer, layer_type)
            keys = torch.cat([past_k, ki.transpose(0, 1)], dim=1)
            values = torch.cat([past_v, vi.transpose(0, 1)], dim=1)
            outs.append(_sdpa(qi, keys, values, mask))
        self.store(layer, k, v)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def store(self, layer: int, k, v) -> None:
        """Commit the new tokens' keys/values [N, Hkv, d] of one layer to each sequence's cache."""
        for i, cache in enumerate(self.caches):
            cache.append(layer, self._split(k, i).transpose(0, 1), self._split(v, i).transpose(0, 1))

    def finish(self) -> None:
        for i, cache in enumerate(self.caches):
            cache.advance(self._split(self.positions, i))


class DecoderPass(_Pass):
    """Bidirectional pass over canvases that reads the caches and never writes them.

    Several sequences attend either one by one, or, in reduced-precision inference (`may_reorder_sums`)
    when the work is small (many short sequences: a dispatch-bound step, where one call beats B calls), in
    one call over all their keys laid end to end with a block mask (each canvas sees its own cache and its
    own canvas). `pack` forces either way.
    """

    layer_scalar = "layer_scalar"
    PACK_LIMIT = 1 << 18  # at most this many (query, key) pairs in one packed call

    def __init__(self, caches: Sequence[KVCache], lengths: Sequence[int], pack: bool | None = None):
        super().__init__(caches, lengths)
        self.pack = pack
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}  # by cached lengths (sliding and full layers)

    def attend(self, layer: int, layer_type: str, q, k, v) -> torch.Tensor:
        past = [cache.layer(layer) for cache in self.caches]
        pack = self.pack
        if pack is None:
            pairs = q.shape[0] * (q.shape[0] + sum(pk.shape[1] for pk, _ in past))
            pack = len(past) > 1 and pairs <= self.PACK_LIMIT and may_reorder_sums(q)
        if pack:
            return self._attend_packed(past, q, k, v)
        outs = []
        for i, (past_k, past_v) in enumerate(past):
            qi, ki, vi = (self._split(t, i) for t in (q, k, v))
            keys = torch.cat([past_k, ki.transpose(0, 1)], dim=1)
            values = torch.cat([past_v, vi.transpose(0, 1)], dim=1)
            outs.append(_sdpa(qi, keys, values, None))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attend_packed(self, past, q, k, v) -> torch.Tensor:
        """Keys [cache_0 .. cache_B-1, canvas keys of all sequences]; mask by sequence."""
        keys = torch.cat([pk for pk, _ in past] + [k.transpose(0, 1)], dim=1)
        values = torch.cat([pv for _, pv in past] + [v.transpose(0, 1)], dim=1)
        cached = tuple(pk.shape[1] for pk, _ in past)
        mask = self._masks.get(cached)
        if mask is None:
            seq = torch.arange(len(past), device=q.device)
            q_seq = seq.repeat_interleave(torch.tensor(self.lengths, device=q.device))
            k_seq = torch.cat([seq.repeat_interleave(torch.tensor(cached, device=q.device)), q_seq])
            mask = self._masks[cached] = q_seq[:, None] == k_seq[None, :]
        return _sdpa(q, keys, values, mask)

    def finish(self) -> None:
        pass


class BatchEncoderPass:
    """Causal pass over a right-padded batch [B, S] that keeps each layer's keys/values (with their
    gradients) instead of writing caches: the training encoder. `valid` [B, S] marks real tokens."""

    layer_scalar = "encoder_layer_scalar"

    def __init__(self, valid: torch.Tensor, window: int, block_ids: torch.Tensor | None = None):
        self.b, self.s = valid.shape
        idx = torch.arange(self.s, device=valid.device)
        delta = idx[:, None] - idx[None, :]
        causal = (delta >= 0)[None] & valid[:, None, :]
        full, sliding = causal, causal & (delta < window)[None]
        if block_ids is not None:  # runs of image tokens attend to each other bidirectionally (both layer types)
            block = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
            full, sliding = full | block, sliding | block
        self.masks = {"full_attention": full[:, None], "sliding_attention": sliding[:, None]}
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer: int, layer_type: str, q, k, v) -> torch.Tensor:
        q, k, v = _heads_first(self.b, self.s, q, k, v)  # [B, H, S, d]
        self.kv[layer] = (k, v)
        return _batched_sdpa(q, k, v, self.masks[layer_type])

    def finish(self) -> None:
        pass


class BatchDecoderPass:
    """Bidirectional pass over canvases [R, L] reading a BatchEncoderPass's keys/values: canvas row r
    reads encoder row `rows[r]` (several canvases may share one encoder row), sees its first
    `context[r]` tokens (the last window-1 of them on sliding layers, as at inference) and its whole
    canvas. The training decoder."""

    layer_scalar = "layer_scalar"

    def __init__(self, encoder: BatchEncoderPass, context: torch.Tensor, canvas_length: int, window: int,
                 rows: torch.Tensor | None = None):
        self.enc, self.b, self.l = encoder, context.shape[0], canvas_length
        self.rows = None if rows is None or torch.equal(rows, torch.arange(encoder.b, device=rows.device)) else rows
        idx = torch.arange(encoder.s, device=context.device)
        full = idx[None, :] < context[:, None]  # [B, S]
        sliding = full & (idx[None, :] >= (context - (window - 1))[:, None])
        ones = torch.ones(self.b, canvas_length, dtype=torch.bool, device=context.device)
        self.masks = {t: torch.cat([m, ones], 1)[:, None, None, :] for t, m in
                      (("full_attention", full), ("sliding_attention", sliding))}

    def attend(self, layer: int, layer_type: str, q, k, v) -> torch.Tensor:
        q, k, v = _heads_first(self.b, self.l, q, k, v)
        ek, ev = self.enc.kv[layer]
        if self.rows is not None:
            ek, ev = ek[self.rows], ev[self.rows]
        return _batched_sdpa(q, torch.cat([ek, k], 2), torch.cat([ev, v], 2), self.masks[layer_type])

    def finish(self) -> None:
        pass


class StaticDecoderPass:
    """Bidirectional pass over `slots` canvases of `canvas_length` with fixed shapes (for CUDA graphs):
    per layer, keys/values live in fixed buffers [slots, Hkv, capacity + canvas_length, d] whose tail
    takes this step's canvas keys in place; `masks[layer_type]` [slots, 1, 1, capacity + canvas_length]
    marks the valid cached keys (and the whole canvas). The buffers are owned and filled by the caller."""

    layer_scalar = "layer_scalar"

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], masks: dict[str, torch.Tensor],
                 slots: int, canvas_length: int):
        self.k, self.v, self.masks, self.slots, self.l = k, v, masks, slots, canvas_length

    def attend(self, layer: int, layer_type: str, q, k, v) -> torch.Tensor:
        q, k, v = _heads_first(self.slots, self.l, q, k, v)
        kb, vb = self.k[layer], self.v[layer]
        kb[:, :, -self.l:] = k  # no concatenation: fixed addresses
        vb[:, :, -self.l:] = v
        return _batched_sdpa(q, kb, vb, self.masks[layer_type])

    def finish(self) -> None:
        pass
