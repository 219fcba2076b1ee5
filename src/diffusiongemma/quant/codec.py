"""Weight-only quantization arithmetic and the compressed-tensors storage encodings: pure tensor functions.

Integers (`pack-quantized`): codes q in [-2^(b-1), 2^(b-1) - 1], one scale per output channel or per group of
`group_size` input columns, w = (q - zero) * scale (zero = 0 when symmetric, the default). On disk the codes
are offset to unsigned (q + 2^(b-1)) and packed densely into int32 words along the input dimension, element i
of a row at bits [i*b, (i+1)*b) of the row's word stream (little-endian), with the unpacked shape beside them
(`weight_shape`). 4- and 8-bit codes never straddle a byte, so packing and unpacking are byte views.

FP8 (`float-quantized`): e4m3 values with a per-tensor, per-channel or per-block scale; `weight_scale_inv`
(block-FP8 releases) is the same multiplier under another name: w = fp8 * scale.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class WeightScheme:
    """How one weight is quantized: `int` codes of `bits` bits or `float` (FP8 e4m3); a scale per output channel
    (group_size None), per group of input columns, or per [bn, bk] block (`block`, FP8 only)."""

    kind: str  # "int" | "float"
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    block: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        if self.kind == "float":
            return "fp8" + (f"-block{self.block[0]}x{self.block[1]}" if self.block else "")
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "-channel")


INT8 = WeightScheme("int", 8)
FP8 = WeightScheme("float", 8)


def int4(group_size: int = 128) -> WeightScheme:
    return WeightScheme("int", 4, group_size)


def _groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[..., N, K] -> [..., N, G, g] (one group per channel when group_size is None)."""
    k = w.shape[-1]
    g = group_size or k
    if k % g:
        raise ValueError(f"group size {g} does not divide the input dimension {k}")
    return w.reshape(*w.shape[:-1], k // g, g)


def quantize_int(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: codes int8 [..., N, K] and scales fp32 [..., N, G] (G = 1 per channel).
    The scale maps the group's largest magnitude to 2^(b-1) - 1, so nothing is clipped."""
    qmax = 2 ** (scheme.bits - 1) - 1
    grouped = _groups(w.float(), scheme.group_size)
    scale = grouped.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    q = torch.round(grouped / scale).clamp_(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(w.shape), scale.squeeze(-1)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = (q - zero) * scale, the scale (and zero) broadcast over each group of q's last dimension.

    Computed in `dtype` directly: a code (at most 8 bits, and q - zero at most 9) times a scale in `dtype` is
    rounded once either way, so this equals computing in fp32 and casting, at a third of the memory traffic."""
    k, groups = q.shape[-1], scale.shape[-1]
    if k % groups:
        raise ValueError(f"{groups} scale groups do not divide the input dimension {k}")
    grouped = q.reshape(*q.shape[:-1], groups, k // groups).to(dtype)
    if zero is not None:
        grouped = grouped - zero.to(dtype)[..., None]
    return (grouped * scale.to(dtype)[..., None]).reshape(q.shape)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and fp32 scales: per output channel [N, 1], or per [bn, bk] block [ceil(N/bn), ceil(K/bk)]."""
    wf = w.float()
    if block is None:
        scale = wf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
        return (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    bn, bk = block
    n, k = wf.shape
    padded = torch.nn.functional.pad(wf, (0, -k % bk, 0, -n % bn))
    tiles = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = tiles.abs().amax((1, 3)).clamp_min(1e-12) / FP8_MAX
    values = (wf / expand_blocks(scale, (n, k), block)).clamp(-FP8_MAX, FP8_MAX)
    return values.to(torch.float8_e4m3fn), scale


def expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """A per-block scale [ceil(N/bn), ceil(K/bk)] repeated to the weight's shape [N, K]."""
    n, k = shape
    return scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s = scale.float()
    if block is not None:
        s = expand_blocks(s, tuple(values.shape), block)
    elif s.ndim == 1 and s.numel() == values.shape[0]:
        s = s[:, None]
    return (values.float() * s).to(dtype)


# -- the compressed-tensors int32 packing ----------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"{bits}-bit integer codes are not supported (4 and 8 are)")
    if sys.byteorder != "little":
        raise RuntimeError("packed integer weights are read on little-endian hosts only")


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes int8 [..., K] -> int32 words [..., ceil(K * bits / 32)] (compressed-tensors' dense packing)."""
    _check_bits(bits)
    # offset binary: q + 2^(b-1) as an unsigned byte is q's two's-complement byte with the top bit of the field
    # flipped (no widening: a release-sized tensor is packed in place of its own size)
    u = q.contiguous().view(torch.uint8) ^ 0x80 if bits == 8 else (q.contiguous().view(torch.uint8) + 8) & 0xF
    per_word = 32 // bits
    u = torch.nn.functional.pad(u, (0, -u.shape[-1] % per_word))
    if bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return u.contiguous().view(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 words [..., W] -> signed codes int8 [..., k]."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, not {str(packed.dtype).removeprefix('torch.')}")
    if packed.shape[-1] != math.ceil(k * bits / 32):
        raise ValueError(f"{packed.shape[-1]} int32 words cannot hold {k} {bits}-bit codes")
    b = packed.contiguous().view(torch.uint8)
    if bits == 8:
        return (b[..., :k] ^ 0x80).view(torch.int8)
    return (torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)[..., :k].contiguous().view(torch.int8) - 8)
