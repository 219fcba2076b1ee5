"""The KV cache of one sequence: committed tokens' keys and values, per layer.

Life cycle (block diffusion):
  1. created empty for a request;
  2. the encoder *commits* the prompt (prefill) by appending every layer's keys/values;
  3. each denoising step of the decoder *reads* it (and sees its own canvas keys without writing them);
  4. the finished canvas is committed by the encoder, and so on; `free()` releases the memory.

Keys are stored after k-norm and RoPE, values after the weightless v-norm, [kv_heads, T, head_dim]
per layer. Sliding-window layers keep only the last `sliding_window - 1` tokens, all that a later
query can see (as the reference's dynamic cache does); full-attention layers keep everything.
Storage grows by doubling, so a commit copies only the new tokens.
"""

from __future__ import annotations

import torch

from .config import TextConfig


class KVCache:
    def __init__(self, config: TextConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.config = config
        self.dtype, self.device = dtype, torch.device(device)
        self.window = config.sliding_window
        n = config.num_hidden_layers
        self._sliding = [config.is_sliding(i) for i in range(n)]
        self._shape = [(config.layer_kv_heads(i), config.layer_head_dim(i)) for i in range(n)]
        self._k: list[torch.Tensor | None] = [None] * n
        self._v: list[torch.Tensor | None] = [None] * n
        self._len = [0] * n  # stored tokens per layer (<= window - 1 on sliding layers)
        self._positions = torch.empty(0, dtype=torch.long, device=self.device)  # all committed positions
        self.length = 0  # committed tokens

    # -- reading -------------------------------------------------------------------------------
    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys and values of layer i, [kv_heads, T_i, head_dim] each (views, do not modify)."""
        if self._k[i] is None:
            h, d = self._shape[i]
            empty = torch.empty(h, 0, d, dtype=self.dtype, device=self.device)
            return empty, empty
        n = self._len[i]
        return self._k[i][:, :n], self._v[i][:, :n]

    def positions(self, i: int) -> torch.Tensor:
        """Absolute positions of the tokens stored for layer i."""
        return self._positions[self._positions.shape[0] - self._len[i]:]

    @property
    def next_position(self) -> int:
        return int(self._positions[-1]) + 1 if self.length else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None)

    # -- writing (encoder only) ----------------------------------------------------------------
    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new tokens' keys/values ([kv_heads, T, head_dim]) to layer i.

        Storage always has at least one spare row past the stored tokens, so `stored < buffer size` holds at
        every step (a compiled step (`KVView`) then sees one relation between the two, and compiles once)."""
        t = k.shape[1]
        n = self._len[i]
        keep = (self.window - 1) if self._sliding[i] else None
        if keep is not None and n + t > keep:
            # Sliding layer past its window: keep the last window-1 tokens (old tail + new).
            old_k, old_v = self.layer(i)
            k = torch.cat([old_k, k], dim=1)[:, k.shape[1] + n - keep:]
            v = torch.cat([old_v, v], dim=1)[:, v.shape[1] + n - keep:]
            n, t = 0, keep
        buf_k, buf_v = self._k[i], self._v[i]
        if buf_k is None or n + t >= buf_k.shape[1]:
            cap = max(n + t + 1, 2 * (buf_k.shape[1] if buf_k is not None else 0), 16)
            if keep is not None:
                cap = min(cap, keep + 1)
            h, d = self._shape[i]
            new_k = torch.empty(h, cap, d, dtype=self.dtype, device=self.device)
            new_v = torch.empty(h, cap, d, dtype=self.dtype, device=self.device)
            if n:
                new_k[:, :n], new_v[:, :n] = buf_k[:, :n], buf_v[:, :n]
            self._k[i], self._v[i] = buf_k, buf_v = new_k, new_v
        buf_k[:, n:n + t] = k
        buf_v[:, n:n + t] = v
        self._len[i] = n + t

    def advance(self, positions: torch.Tensor) -> None:
        """Record the positions of the tokens just appended to every layer."""
        self._positions = torch.cat([self._positions, positions.to(self.device, torch.long)])
        self.length += positions.shape[0]

    def free(self) -> None:
        n = len(self._k)
        self._k, self._v, self._len = [None] * n, [None] * n, [0] * n
        self._positions = self._positions[:0]
        self.length = 0


def continuing_positions(caches, lengths, device) -> torch.Tensor:
    """Absolute positions of `lengths[i]` new tokens continuing each cache, packed: [sum(lengths)]."""
    return torch.cat([torch.arange(c.next_position, c.next_position + n, device=device)
                      for c, n in zip(caches, lengths)])


class KVView:
    """Read-only keys/values of one sequence as plain tensors, per layer, with `KVCache`'s reading interface
    (`layer`, `positions`): what a compiled step takes as its inputs instead of the cache object (whose
    Python bookkeeping a compiler would otherwise guard on). It holds each layer's whole storage buffer and
    the number of tokens stored in it, so its inputs stay contiguous whatever the buffer's spare room (a
    view's strides would change with the room and force a recompile)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int],
                 all_positions: torch.Tensor | None = None):
        self.keys, self.values, self.lengths, self.all_positions = keys, values, lengths, all_positions

    @classmethod
    def of(cls, cache: KVCache) -> KVView:
        keys, values, lengths = [], [], []
        for i in range(len(cache._k)):
            if cache._k[i] is None:
                k, v = cache.layer(i)
            else:
                k, v = cache._k[i], cache._v[i]
            keys.append(k)
            values.append(v)
            lengths.append(cache._len[i])
        return cls(keys, values, lengths, cache._positions)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.lengths[i]  # narrow (not a slice): no branch on n == size for a compiler to guard on
        return self.keys[i].narrow(1, 0, n), self.values[i].narrow(1, 0, n)

    def positions(self, i: int) -> torch.Tensor:
        n = self.lengths[i]
        return self.all_positions.narrow(0, self.all_positions.shape[0] - n, n)
