"""The Gemma 4 vision tower and its projection into the language model (transformers 5.23.0 naming).

Patches -> `2 (p - 0.5)` -> linear patch embedding + learned 2-D position table (x row + y row, zero for
padding) -> encoder layers (q/k norms, weightless v norm, 2-D axial RoPE: the first half of each head
rotates with x, the second with y; GeGLU; four norms; bidirectional over real patches) -> average of
each pooling x pooling cell -> times sqrt(hidden) in fp32 -> standardise ((h - bias) * scale) ->
`embed_vision`: weightless RMSNorm then a linear map to the text width. The result replaces the
image placeholder embeddings (it is not multiplied by the text embedding scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..model.layers import RMSNorm, gelu_tanh, rms


class _Linear(nn.Module):
    """`ClippableLinear` without clipping: the checkpoint keys carry a `.linear.` level."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.linear(x)


def axial_inv_freq(c: VisionConfig) -> torch.Tensor:
    """head_dim / 4 frequencies, shared by the x and y axes."""
    spatial = c.head_dim // 2
    return 1.0 / (c.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, P, H, d]; cos/sin [B, P, d] laid out as (x, x, y, y) quarters; each half rotates on its own."""
    half = x.shape[-1] // 2
    out = []
    for i in range(2):
        part = slice(i * half, (i + 1) * half)
        c, s = cos[..., part].unsqueeze(2), sin[..., part].unsqueeze(2)
        out.append(x[..., part] * c + _rotate_half(x[..., part]) * s)
    return torch.cat(out, dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = c.rms_norm_eps
        self.q_proj = _Linear(c.hidden_size, c.num_attention_heads * c.head_dim)
        self.k_proj = _Linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.v_proj = _Linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.o_proj = _Linear(c.num_attention_heads * c.head_dim, c.hidden_size)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        b, p, _ = x.shape
        q = axial_rope(self.q_norm(self.q_proj(x).view(b, p, self.heads, self.head_dim)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).view(b, p, self.kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(b, p, self.kv_heads, self.head_dim)
        v = rms(v, self.eps).type_as(v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             scale=1.0, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, p, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.gate_proj = _Linear(c.hidden_size, c.intermediate_size)
        self.up_proj = _Linear(c.hidden_size, c.intermediate_size)
        self.down_proj = _Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        d, eps = c.hidden_size, c.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = VisionAttention(c)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.mlp = VisionMLP(c)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * c.patch_size**2, c.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, c.position_embedding_size, c.hidden_size))

    def forward(self, pixels, positions, padding):
        x = self.input_proj((2 * (pixels - 0.5)).to(self.input_proj.weight.dtype))
        pos = positions.clamp(min=0)
        table = self.position_embedding_table
        emb = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])
        return x + torch.where(padding.unsqueeze(-1), 0.0, emb)


class _Encoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_hidden_layers))


class VisionTower(nn.Module):
    """`model.encoder.vision_tower` of the checkpoint."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embedder = PatchEmbedder(c)
        self.encoder = _Encoder(c)
        if c.standardize:
            self.register_buffer("std_bias", torch.zeros(c.hidden_size))
            self.register_buffer("std_scale", torch.ones(c.hidden_size))
        self.register_buffer("inv_freq", axial_inv_freq(c), persistent=False)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """pixels [B, P, 3 p^2], positions [B, P, 2] -> per image its soft tokens [n_i, hidden]."""
        k = self.config.pooling_kernel_size
        out_len = pixels.shape[-2] // (k * k)
        padding = (positions == -1).all(dim=-1)
        x = self.patch_embedder(pixels, positions, padding)
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, P, 2, d/4]
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat([cos[..., 0, :], cos[..., 0, :], cos[..., 1, :], cos[..., 1, :]], -1).to(x.dtype)
        sin = torch.cat([sin[..., 0, :], sin[..., 0, :], sin[..., 1, :], sin[..., 1, :]], -1).to(x.dtype)
        mask = (~padding)[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, mask)
        x = x.masked_fill(padding.unsqueeze(-1), 0.0)
        pooled, valid = self._pool(x, positions, out_len, k)
        pooled = pooled.float() * self.config.hidden_size**0.5
        if self.config.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        pooled = pooled.to(x.dtype)
        return [pooled[i][valid[i]] for i in range(pooled.shape[0])]

    @staticmethod
    def _pool(x, positions, length, k):
        """Average each k x k cell of patches (cells in row-major order); mark cells that got patches."""
        if x.shape[1] == length:
            return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        pos = positions.clamp(min=0)
        max_x = pos[..., 0].max(dim=-1, keepdim=True)[0] + 1
        cell = torch.div(pos, k, rounding_mode="floor")
        idx = cell[..., 0] + (max_x // k) * cell[..., 1]
        weights = F.one_hot(idx.long(), length).float() / (k * k)  # [B, P, length]
        pooled = weights.transpose(1, 2) @ x.float()
        valid = ~(weights == 0).all(dim=1)
        return pooled.to(x.dtype), valid


class VisionEmbedder(nn.Module):
    """`model.encoder.embed_vision`: weightless RMSNorm, then a linear map into the text width."""

    def __init__(self, c: VisionConfig, text_hidden: int):
        super().__init__()
        self.eps = c.rms_norm_eps
        self.embedding_projection = nn.Linear(c.hidden_size, text_hidden, bias=False)

    def forward(self, x):
        return self.embedding_projection(rms(x, self.eps).type_as(x))


class Vision(nn.Module):
    """The tower and its projection, loaded from `model.encoder.{vision_tower,embed_vision}.*`."""

    def __init__(self, c: VisionConfig, text_hidden: int):
        super().__init__()
        self.vision_tower = VisionTower(c)
        self.embed_vision = VisionEmbedder(c, text_hidden)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        return [self.embed_vision(t) for t in self.vision_tower(pixels, positions)]
