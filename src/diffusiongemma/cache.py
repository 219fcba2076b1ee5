"""The KV cache of one sequence: committed tokens' keys and values, per layer.

Life cycle (block diffusion):
  1. created empty for a request;
  2. the encoder *commits* the prompt (prefill) by appending every layer's keys/values;
  3. each denoising step of the decoder *reads* it (and sees its own canvas keys without writing them);
  4. the finished canvas is committed by the encoder, and so on; `free()` releases the memory.

Keys are stored after k-norm and RoPE, values after the weightless v-norm, [kv_heads, T, head_dim]
per layer. Sliding-window layers show only the last `sliding_window - 1` tokens, all that a later
query can see (as the reference's dynamic cache does); full-attention layers keep everything.
Storage grows by doubling, so a commit copies only the new tokens.

`truncate(n)` takes the last n committed tokens back out (speculative decoding commits a whole canvas
and keeps only its verified prefix). So that a sliding layer still holds its whole window afterwards, a
cache made with `spare=S` keeps S tokens more than it shows on those layers; n may not exceed S.

`record()` makes the cache also keep every committed token's keys and values on every layer, untrimmed by
the window, until `take_recorded(n)` hands the first n of them over (the engine's prefix cache stores them
in blocks: a later prompt that starts with these tokens needs them on its sliding layers too, even where this
sequence's window has since moved past them).
"""

from __future__ import annotations

import torch

from .config import TextConfig


class KVCache:
    def __init__(self, config: TextConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 spare: int = 0):
        """spare: how many of the last committed tokens `truncate` may take back."""
        self.config = config
        self.dtype, self.device = dtype, torch.device(device)
        self.window = config.sliding_window
        self.spare = spare
        n = config.num_hidden_layers
        self._sliding = [config.is_sliding(i) for i in range(n)]
        self._shape = [(config.layer_kv_heads(i), config.layer_head_dim(i)) for i in range(n)]
        self._k: list[torch.Tensor | None] = [None] * n
        self._v: list[torch.Tensor | None] = [None] * n
        self._len = [0] * n  # stored tokens per layer (<= window - 1 + spare on sliding layers)
        self._positions = torch.empty(0, dtype=torch.long, device=self.device)  # all committed positions
        self.length = 0  # committed tokens
        self._log: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # recorded chunks per layer

    # -- reading -------------------------------------------------------------------------------
    def _shown(self, i: int) -> int:
        """The first stored row a query may see (past the spare rows of a sliding layer)."""
        return max(self._len[i] - (self.window - 1), 0) if self._sliding[i] else 0

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer i a query may see, [kv_heads, T_i, head_dim] each (views, do not modify)."""
        if self._k[i] is None:
            h, d = self._shape[i]
            empty = torch.empty(h, 0, d, dtype=self.dtype, device=self.device)
            return empty, empty
        a, n = self._shown(i), self._len[i]
        return self._k[i][:, a:n], self._v[i][:, a:n]

    def positions(self, i: int) -> torch.Tensor:
        """Absolute positions of the tokens `layer(i)` returns."""
        return self._positions[self._positions.shape[0] - self._len[i] + self._shown(i):]

    @property
    def next_position(self) -> int:
        return int(self._positions[-1]) + 1 if self.length else 0

    def nbytes(self) -> int:
        """Bytes allocated (storage grows by doubling, so up to twice what is stored)."""
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None)

    def stored_bytes(self) -> int:
        """Bytes of the keys and values stored (every layer's kept tokens)."""
        size = torch.empty(0, dtype=self.dtype).element_size()
        return sum(2 * n * h * d * size for n, (h, d) in zip(self._len, self._shape))

    # -- writing (encoder only) ----------------------------------------------------------------
    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new tokens' keys/values ([kv_heads, T, head_dim]) to layer i.

        Storage always has at least one spare row past the stored tokens, so `stored < buffer size` holds at
        every step (a compiled step (`KVView`) then sees one relation between the two, and compiles once)."""
        if self._log is not None:
            self._log[i].append((k, v))
        t = k.shape[1]
        n = self._len[i]
        keep = (self.window - 1 + self.spare) if self._sliding[i] else None
        if keep is not None and n + t > keep:
            # Sliding layer past its window: keep the last window-1 (+ spare) tokens (old tail + new).
            old_k, old_v = (self._k[i][:, :n], self._v[i][:, :n]) if n else (k[:, :0], v[:, :0])
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

    def truncate(self, n: int) -> None:
        """Take the last n committed tokens back out of every layer (at most `spare`, and at most all)."""
        if n < 0 or n > self.length or n > self.spare:
            raise ValueError(f"cannot take back {n} of {self.length} tokens (spare {self.spare})")
        if n == 0:
            return
        for i in range(len(self._len)):
            self._len[i] -= min(n, self._len[i])
        self._positions = self._positions[:self._positions.shape[0] - n]
        self.length -= n
        if self._log is not None:
            for i, chunks in enumerate(self._log):
                k, v = self._joined(i, chunks)
                keep = max(k.shape[1] - n, 0)
                self._log[i] = [(k[:, :keep], v[:, :keep])] if keep else []

    def free(self) -> None:
        n = len(self._k)
        self._k, self._v, self._len = [None] * n, [None] * n, [0] * n
        self._positions = self._positions[:0]
        self.length = 0
        self._log = None

    # -- recording (for the prefix cache) -----------------------------------------------------------
    def record(self) -> None:
        """From now on keep every appended token's keys/values on every layer until `take_recorded` takes them."""
        self._log = [[] for _ in self._k]

    @property
    def recording(self) -> bool:
        return self._log is not None

    @property
    def recorded(self) -> int:
        """How many committed tokens are recorded and not yet taken."""
        return sum(k.shape[1] for k, _ in self._log[0]) if self._log else 0

    def _joined(self, i: int, chunks) -> tuple[torch.Tensor, torch.Tensor]:
        if not chunks:
            h, d = self._shape[i]
            empty = torch.empty(h, 0, d, dtype=self.dtype, device=self.device)
            return empty, empty
        if len(chunks) == 1:
            return chunks[0]
        return torch.cat([k for k, _ in chunks], 1), torch.cat([v for _, v in chunks], 1)

    def take_recorded(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n recorded tokens' keys and values, per layer ([kv_heads, n, head_dim] each); the rest
        stay recorded."""
        if self._log is None or n > self.recorded:
            raise ValueError(f"cannot take {n} recorded tokens of {self.recorded}")
        out = []
        for i, chunks in enumerate(self._log):
            k, v = self._joined(i, chunks)
            out.append((k[:, :n], v[:, :n]))
            self._log[i] = [(k[:, n:], v[:, n:])] if k.shape[1] > n else []
        return out


def continuing_positions(caches, lengths, device) -> torch.Tensor:
    """Absolute positions of `lengths[i]` new tokens continuing each cache, packed: [sum(lengths)]."""
    return torch.cat([torch.arange(c.next_position, c.next_position + n, device=device)
                      for c, n in zip(caches, lengths)])


class KVView:
    """Read-only keys/values of one sequence as plain tensors, per layer, with `KVCache`'s reading interface
    (`layer`, `positions`): what a compiled step takes as its inputs instead of the cache object (whose
    Python bookkeeping a compiler would otherwise guard on). It holds each layer's whole storage buffer, the
    first row a query may see and the number of rows it may see, so its inputs stay contiguous whatever the
    buffer's spare room (a view's strides would change with the room and force a recompile)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int],
                 all_positions: torch.Tensor | None = None, starts: list[int] | None = None):
        self.keys, self.values, self.lengths, self.all_positions = keys, values, lengths, all_positions
        self.starts = starts if starts is not None else [0] * len(keys)

    @classmethod
    def of(cls, cache: KVCache) -> KVView:
        keys, values, lengths, starts = [], [], [], []
        for i in range(len(cache._k)):
            if cache._k[i] is None:
                k, v = cache.layer(i)
            else:
                k, v = cache._k[i], cache._v[i]
            keys.append(k)
            values.append(v)
            starts.append(cache._shown(i))
            lengths.append(cache._len[i] - starts[-1])
        return cls(keys, values, lengths, cache._positions, starts)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, n = self.starts[i], self.lengths[i]  # narrow (not a slice): no branch on sizes for a compiler to guard on
        return self.keys[i].narrow(1, a, n), self.values[i].narrow(1, a, n)

    def positions(self, i: int) -> torch.Tensor:
        n = self.lengths[i]
        return self.all_positions.narrow(0, self.all_positions.shape[0] - n, n)
