"""Prefix caching: a request whose prompt begins with tokens some earlier request already committed (the next
turn of a chat, a shared system prompt, a tool loop that appends a result) copies their keys and values instead
of encoding them again.

Committed tokens are kept in blocks of `block_size` tokens, each holding every layer's keys and values for its
tokens at their positions (a sequence starts at position 0, so block b always covers positions [bB, (b+1)B)).
A block is named by a digest of its parent's digest, its token ids and the digests of the images whose soft
tokens it holds (an image's soft tokens share one id; the image is part of the key), so a name stands for the
whole prefix up to its end (block-granular hashing, as vLLM's automatic prefix caching).

- Sliding-window layers: a block keeps those layers' keys/values too, whatever the window, recorded as the
  encoder stored them (`KVCache.record`), so a cached prefix always holds what the window needs at its end.
- Images: a match never ends inside an image's soft tokens (they attend to each other both ways, so the
  image is encoded whole, with the request's remaining images).
- The last prompt token is always encoded (the verifier of speculative decoding reads its hidden state).
- Memory is bounded (`capacity_bytes`); a full cache evicts its least recently used leaf blocks (a block whose
  longer prefixes are all gone), and it never fails a request: a block it cannot place is simply not kept.

A request's cache gets copies of the blocks (nothing is shared with the block store), so eviction never
touches an active request. The engine calls `attach` when a request is admitted and `store` after each of its
encoder passes; all calls come from the engine's thread (`stats()` may be read from any).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..config import TextConfig
from .request import RequestState


def block_bytes(config: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: keys and values of `block_size` tokens on every layer."""
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(2 * config.layer_kv_heads(i) * block_size * config.layer_head_dim(i) * size
               for i in range(config.num_hidden_layers))


@dataclass
class PrefixStats:
    block_size: int
    capacity_bytes: int
    bytes: int = 0
    blocks: int = 0
    queries: int = 0  # requests looked up
    hits: int = 0  # requests that reused at least one block
    prompt_tokens: int = 0  # prompt tokens of the requests looked up
    reused_tokens: int = 0  # prompt tokens copied from the cache instead of encoded
    evictions: int = 0

    def as_dict(self) -> dict:
        d = dict(vars(self))
        d["hit_rate"] = self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return d


@dataclass
class _Block:
    parent: bytes | None
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [kv_heads, block_size, head_dim] each
    nbytes: int
    children: int = 0


@dataclass
class _Track:
    """A request's place in the block chain: the digests of its blocks so far, and the images of its prompt."""

    images: list[tuple[int, int, bytes]]  # (first token, end, digest) of each image's soft tokens
    digests: list[bytes] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # committed, recorded, not yet in a block


def image_digest(image) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for t in (image.pixel_values, image.positions):
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def image_spans(prompt: list[int], images: list, soft_token_ids: tuple[int, ...]) -> list[tuple[int, int, bytes]]:
    """Where each image's soft tokens lie in the prompt (images take the soft tokens in order)."""
    soft = set(soft_token_ids)
    where = [i for i, t in enumerate(prompt) if t in soft]
    spans, k = [], 0
    for im in images:
        n = im.num_soft_tokens
        spans.append((where[k], where[k + n - 1] + 1, image_digest(im)))
        k += n
    return spans


class PrefixCache:
    def __init__(self, config: TextConfig, capacity_bytes: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"the prefix cache block size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.block_bytes = block_bytes(config, block_size, dtype)
        if capacity_bytes < self.block_bytes:
            raise ValueError(f"a prefix cache of {capacity_bytes} bytes cannot hold one block: a block of "
                             f"{block_size} tokens takes {self.block_bytes} bytes for this model (give at least that, "
                             f"or 0 to turn prefix caching off)")
        self.config = config
        self.window = config.sliding_window
        self._sliding = [config.is_sliding(i) for i in range(config.num_hidden_layers)]
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._stats = PrefixStats(block_size, capacity_bytes)

    def stats(self) -> dict:
        return self._stats.as_dict()

    # -- naming blocks ----------------------------------------------------------------------------------
    def _digest(self, parent: bytes | None, ids: list[int], start: int, images) -> bytes:
        h = hashlib.blake2b(parent or b"root", digest_size=16)
        h.update(array("q", ids).tobytes())
        end = start + len(ids)
        for a, b, d in images:
            if a < end and b > start:  # the image has soft tokens in this block
                h.update(d)
        return h.digest()

    def _chain(self, ids: list[int], images, parent: bytes | None = None, start: int = 0) -> list[bytes]:
        out, B = [], self.block_size
        for s in range(0, len(ids) - len(ids) % B, B):
            parent = self._digest(parent, ids[s:s + B], start + s, images)
            out.append(parent)
        return out

    # -- a request arrives: reuse what is cached -------------------------------------------------------
    def attach(self, r: RequestState, soft_token_ids: tuple[int, ...] = ()) -> None:
        """Copy the longest cached prefix of r's prompt into its (empty) cache, leave the rest to encode, and start
        recording what it commits."""
        prompt, B = r.prompt, self.block_size
        images = image_spans(prompt, r.images, soft_token_ids) if r.images else []
        digests = self._chain(prompt[:(len(prompt) - 1) // B * B], images)
        n = 0
        while n < len(digests) and digests[n] in self._blocks:
            n += 1
        cut = n * B
        for a, b, _ in images:  # never end inside an image's soft tokens
            if a < cut < b:
                cut = a // B * B
        n = cut // B
        st = self._stats
        st.queries += 1
        st.prompt_tokens += len(prompt)
        if n:
            blocks = [self._blocks[d] for d in digests[:n]]
            for d in digests[:n]:
                self._blocks.move_to_end(d)
            self._load(r, blocks)
            r.to_encode = prompt[cut:]
            if r.images:
                r.images = [im for im, (a, _, _) in zip(r.images, images) if a >= cut] or None
            st.hits += 1
            st.reused_tokens += cut
        r.stats.cached_tokens = cut
        r.prefix = _Track(images, digests[:n])
        r.cache.record()

    def _load(self, r: RequestState, blocks: list[_Block]) -> None:
        cache, B = r.cache, self.block_size
        total = len(blocks) * B
        keep = self.window - 1 + cache.spare  # what a sliding layer stores
        first_sliding = max(total - keep, 0) // B
        for i, sliding in enumerate(self._sliding):
            part = blocks[first_sliding:] if sliding else blocks
            cache.append(i, torch.cat([b.kv[i][0] for b in part], 1), torch.cat([b.kv[i][1] for b in part], 1))
        cache.advance(torch.arange(total, device=cache.device))

    # -- a request committed tokens: keep them --------------------------------------------------------
    def store(self, r: RequestState, encoded: list[int]) -> None:
        """After an encoder pass of r (and the verifier's take-back, if any): its full blocks go into the cache."""
        track, cache = r.prefix, r.cache
        if track is None or cache is None or not cache.recording:  # off, or the request already left
            return
        pending = (track.pending + list(encoded))[:cache.recorded]  # what the cache holds past the last block
        B = self.block_size
        full = len(pending) // B * B
        track.pending = pending[full:]
        if not full:
            return
        kv = cache.take_recorded(full)
        start = len(track.digests) * B
        digests = self._chain(pending[:full], track.images, track.digests[-1] if track.digests else None, start)
        for j, d in enumerate(digests):
            parent = track.digests[-1] if track.digests else None
            track.digests.append(d)
            self._insert(d, parent, [(k[:, j * B:(j + 1) * B], v[:, j * B:(j + 1) * B]) for k, v in kv])

    def _insert(self, digest: bytes, parent: bytes | None, kv) -> None:
        if digest in self._blocks:
            self._blocks.move_to_end(digest)
            return
        if parent is not None and parent not in self._blocks:
            return  # its prefix was evicted: the block could never be reached
        st = self._stats
        while st.bytes + self.block_bytes > st.capacity_bytes:
            if not self._evict_one(protect=parent):
                return  # nothing can go (the cache holds only this chain): keep what is there
        block = _Block(parent, [(k.clone(), v.clone()) for k, v in kv], self.block_bytes)
        self._blocks[digest] = block
        if parent is not None:
            self._blocks[parent].children += 1
        st.bytes += block.nbytes
        st.blocks += 1

    def _evict_one(self, protect: bytes | None) -> bool:
        for d, b in self._blocks.items():
            if b.children == 0 and d != protect:
                del self._blocks[d]
                if b.parent is not None and b.parent in self._blocks:
                    self._blocks[b.parent].children -= 1
                st = self._stats
                st.bytes -= b.nbytes
                st.blocks -= 1
                st.evictions += 1
                return True
        return False
