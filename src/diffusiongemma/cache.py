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
        """Append new tokens' keys/values ([kv_heads, T, head_dim]) to layer i."""
        t = k.shape[1]
        n = self._len[i]
        keep = (self.window - 1) if self._sliding[i] else None
        if keep is not None and n + t > keep:
            # Sliding layer past its window: keep the last window-1 tokens (old tail + new).
            old_k, old_v = self.layer(i)
            k = torch.cat([old_k, k], dim=1)[:, -keep:] if keep > 0 else k[:, :0]
            v = torch.cat([old_v, v], dim=1)[:, -keep:] if keep > 0 else v[:, :0]
            self._k[i], self._v[i], self._len[i] = k.contiguous(), v.contiguous(), k.shape[1]
            return
        buf_k, buf_v = self._k[i], self._v[i]
        if buf_k is None or n + t > buf_k.shape[1]:
            cap = max(n + t, 2 * (buf_k.shape[1] if buf_k is not None else 0), 16)
            if keep is not None:
                cap = min(cap, keep)
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
