"""Weight-only quantized matrices: one `QuantMatrix` per weight [N, K] (a Linear's, or one expert's), and the
modules built from them (`QuantLinear` for nn.Linear, `QuantEmbedding` for the tied embedding / LM head).

Kernels, chosen by measurement on the CPU (`python -m diffusiongemma.bench.quant_kernels`):
- int8 per channel: signed codes [N, K]; `torch._weight_int8pack_mm` for a few rows (memory-bound: it reads 1
  byte per weight), and for many rows the codes cast to the activation dtype in row tiles and one dense matmul
  (compute-bound: the dense kernel, AMX or AVX512-BF16, is far faster than the int8 one at a 256-row canvas).
- int4 per group: torch's tinygemm layout (`_convert_weight_to_int4pack_for_cpu`, its `_weight_int4pack_mm_for_cpu`)
  on any number of rows: an expert sees ~16 rows of a canvas, where it is the fastest thing that reads 4 bits.
  On CUDA `_weight_int4pack_mm` (bf16 activations) with its own layout.
- FP8: e4m3 values and their scales; on CUDA `torch._scaled_mm` with the activations quantized per row (what
  FP8 runtimes do); elsewhere the values cast to the activation dtype in row tiles (no CPU kernel reads FP8
  weights with high-precision activations).
Every matrix also has `dequantize()` and `forward_reference` (dequantize, then `F.linear`): the obviously-correct
path the tests hold each kernel to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codec import (
    FP8_MAX,
    WeightScheme,
    dequantize_fp8,
    dequantize_int,
    pack_int32,
    quantize_fp8,
    quantize_int,
    unpack_int32,
)

# rows at or below which the int8 kernel runs instead of cast-and-matmul (bench.quant_kernels on the CPU)
INT8_KERNEL_ROWS = 16
TILE_ELEMENTS = 1 << 21  # a tile of cast weights: 4 MiB in bf16, within a core's L2 + L3 share


class QuantMatrix:
    """A quantized weight [N, K] in the layout its kernel reads. Not a module: `QuantLinear` and `QuantExperts`
    register its tensors as their buffers (`tensors()`), so `.to()`, state dicts and memory accounting see them."""

    def __init__(self, scheme: WeightScheme, shape: tuple[int, int], dtype: torch.dtype, layout: str | None = None,
                 **tensors: torch.Tensor):
        self.scheme, self.shape, self.dtype = scheme, tuple(shape), dtype
        self.t = tensors
        # tinygemm's packed layout differs between the CPU and CUDA kernels: the device type it was packed for
        self.layout = layout or (tensors["packed"].device.type if "packed" in tensors else None)

    # -- construction from the stored encodings ------------------------------------------------------
    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme, dtype: torch.dtype,
                   zero: torch.Tensor | None = None, kernel: bool = True) -> QuantMatrix:
        """Signed integer codes int8 [N, K], scales [N, G], optional zero points [N, G] (w = (q - zero) * scale).
        kernel=False keeps 4-bit codes as plain nibbles (an embedding's rows) instead of tinygemm's layout."""
        n, k = q.shape
        if scale.ndim != 2 or scale.shape[0] != n or k % scale.shape[1]:
            raise ValueError(f"scales of shape {list(scale.shape)} do not fit a weight of shape [{n}, {k}]")
        extra = {"zero": zero.to(dtype)} if zero is not None else {}  # the loader drops all-zero zero points
        if scheme.bits == 8:
            return cls(scheme, (n, k), dtype, q=q.contiguous(), scale=scale.to(dtype), **extra)
        g = k // scale.shape[1]
        if not kernel or g not in (32, 64, 128, 256) or n % 16:
            # plain nibbles (two codes a byte, low first): what an embedding's row gathers read, and any shape
            # tinygemm does not take (groups of 32-256 columns, a multiple of 16 rows)
            nib = pack_int32(q, 4).view(torch.uint8).reshape(n, -1)[:, :(k + 1) // 2].contiguous()
            return cls(scheme, (n, k), dtype, nib=nib, scale=scale.to(dtype), **extra)
        # tinygemm: w = (u - 8) * scale + zero_f with u = q + 8 unsigned, so zero_f = -zero * scale
        zf = torch.zeros_like(scale, dtype=torch.float32) if zero is None else -zero.float() * scale.float()
        sz = torch.stack([scale.float(), zf], -1).transpose(0, 1).contiguous()  # [G, N, 2]
        u = (q.to(torch.int32) + 8).contiguous()
        if q.device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        return cls(scheme, (n, k), dtype, packed=packed, sz=sz.to(dtype))

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scale: torch.Tensor, shape, scheme: WeightScheme, dtype: torch.dtype,
                    zero: torch.Tensor | None = None, kernel: bool = True) -> QuantMatrix:
        """The compressed-tensors encoding: int32 words, scales [N, G], the unpacked shape [N, K]."""
        n, k = (int(v) for v in shape)
        return cls.from_codes(unpack_int32(packed, scheme.bits, k), scale, scheme, dtype, zero, kernel)

    @classmethod
    def from_fp8(cls, values: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme,
                 dtype: torch.dtype) -> QuantMatrix:
        n, k = values.shape
        if scheme.block is not None:
            bn, bk = scheme.block
            want = (-(-n // bn), -(-k // bk))
        else:
            want = (n, 1) if scale.numel() != 1 else tuple(scale.shape)
        if tuple(scale.shape) not in (want, (n,)) and scale.numel() != 1:
            raise ValueError(f"scales of shape {list(scale.shape)} do not fit an FP8 weight of shape [{n}, {k}]"
                             + (f" in {scheme.block[0]}x{scheme.block[1]} blocks" if scheme.block else ""))
        return cls(scheme, (n, k), dtype, values=values.contiguous(), scale=scale.float().contiguous())

    @classmethod
    def quantize(cls, w: torch.Tensor, scheme: WeightScheme, dtype: torch.dtype, kernel: bool = True) -> QuantMatrix:
        if scheme.kind == "float":
            return cls.from_fp8(*quantize_fp8(w, scheme.block), scheme, dtype)
        return cls.from_codes(*quantize_int(w, scheme), scheme, dtype, kernel=kernel)

    # -- arithmetic ----------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.t

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> torch.Tensor:
        """The weight [N, K] (or its `rows`) in `dtype` (default: the activation dtype)."""
        dtype = dtype or self.dtype
        t = self.t
        rows = rows or slice(None)
        if "values" in t:
            if self.scheme.block is None:
                scale = t["scale"] if t["scale"].numel() == 1 else t["scale"].reshape(-1, 1)[rows]
                return dequantize_fp8(t["values"][rows], scale, None, dtype)
            return dequantize_fp8(t["values"], t["scale"], self.scheme.block, dtype)[rows]
        if "q" in t or "nib" in t:
            return dequantize_int(self.codes(rows), t["scale"][rows], t["zero"][rows] if "zero" in t else None, dtype)
        # tinygemm's layout: the kernel applied to the identity gives W^T exactly (one product per output, fp32)
        eye = torch.eye(self.shape[1], dtype=torch.float32, device=t["packed"].device)
        w = self._int4_mm(eye, t["sz"].float()).t()
        return w[rows].to(dtype)

    def codes(self, rows) -> torch.Tensor:
        """Signed codes int8 [rows, K] of a plain layout (`rows` a slice or an index tensor)."""
        if "q" in self.t:
            return self.t["q"][rows]
        b = self.t["nib"][rows]
        return (torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)[..., :self.shape[1]].to(torch.int8) - 8)

    def _int4_mm(self, x: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.layout:
            raise RuntimeError(f"int4 weights packed for {self.layout} cannot run on {x.device.type} (the packed "
                               f"layouts differ): load the checkpoint with device={x.device.type!r} instead of moving it")
        g = self.shape[1] // sz.shape[0]
        if x.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.t["packed"], g, sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.t["packed"], g, sz)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W^T -> [M, N] in x's dtype, by the kernel for this layout and M."""
        t, m = self.t, x.shape[0]
        if m == 0:
            return x.new_zeros(0, self.shape[0])
        if x.requires_grad and torch.is_grad_enabled():  # training adapters over a frozen quantized base: the packed
            return F.linear(x, self.dequantize(x.dtype))  # kernels have no backward; this one gives dL/dx
        if "packed" in t:
            if x.device.type == "cuda" and x.dtype != torch.bfloat16:
                return self._int4_mm(x.to(torch.bfloat16), t["sz"].to(torch.bfloat16)).to(x.dtype)
            return self._int4_mm(x.contiguous(), t["sz"] if t["sz"].dtype == x.dtype else t["sz"].to(x.dtype))
        if "q" in t and self.scheme.bits == 8 and "zero" not in t and m <= INT8_KERNEL_ROWS \
                and t["scale"].shape[1] == 1 and x.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), t["q"], t["scale"][:, 0].to(x.dtype))
        if "values" in t and x.device.type == "cuda" and self.scheme.block is None and _scaled_mm_ok(x):
            return _fp8_scaled_mm(x, t["values"], t["scale"])
        return self._tiled(x)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """Cast-and-matmul in tiles of output rows. One scale per output channel (int8, FP8 per channel) is applied
        to the product instead of the weight: one cast pass over the codes, no scaled copy."""
        n, k = self.shape
        t = self.t
        per_channel = ("q" in t and t["scale"].shape[1] == 1 and "zero" not in t) or \
            ("values" in t and self.scheme.block is None)
        step = max(16, TILE_ELEMENTS // k)
        out = x.new_empty(x.shape[0], n) if step < n else None
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            if per_channel:
                codes = t["q"] if "q" in t else t["values"]
                scale = t["scale"].reshape(-1)
                y = F.linear(x, codes[rows].to(x.dtype)) * (scale if scale.numel() == 1 else scale[rows]).to(x.dtype)
            else:
                y = F.linear(x, self.dequantize(x.dtype, rows))
            if out is None:
                return y
            out[:, rows] = y
        return out

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.t.values())


def _scaled_mm_ok(x: torch.Tensor) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(x.device) >= (8, 9)


def _fp8_scaled_mm(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8-FP8 on a GPU: activations quantized per row, weights per channel, fp32 accumulation."""
    xs = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    xq = (x.float() / xs).to(torch.float8_e4m3fn)
    ws = scale.float().reshape(1, -1) if scale.numel() > 1 else scale.float().reshape(1, 1)
    return torch._scaled_mm(xq, values.t(), scale_a=xs, scale_b=ws.expand(1, values.shape[0]).contiguous(),
                            out_dtype=x.dtype)


class QuantLinear(nn.Module):
    """nn.Linear without bias, its weight a `QuantMatrix`."""

    def __init__(self, matrix: QuantMatrix):
        super().__init__()
        self.out_features, self.in_features = matrix.shape
        self.scheme = matrix.scheme
        self.matrix = matrix
        for name, t in matrix.tensors().items():
            self.register_buffer(name, t)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.matrix.t = {k: getattr(self, k) for k in self.matrix.t}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.matrix.matmul(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix.dequantize(torch.float32).to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


class QuantRows:
    """The tied embedding's weight as the vocabulary pass reads it: `w[a:b]` (a chunk) and `w[ids]` (rows) give
    dequantized rows in the activation dtype, so the LM head and the self-conditioning product cast each chunk once
    and reuse it for both; any other torch call on it sees the whole dequantized matrix (the slow reference paths)."""

    def __init__(self, matrix: QuantMatrix):
        self.matrix = matrix

    shape = property(lambda self: torch.Size(self.matrix.shape))
    dtype = property(lambda self: self.matrix.dtype)
    device = property(lambda self: next(iter(self.matrix.t.values())).device)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            return self.matrix.dequantize(rows=index)
        t = self.matrix.t
        if "q" not in t and "nib" not in t:
            return self.matrix.dequantize()[index]
        flat = index.reshape(-1)
        rows = dequantize_int(self.matrix.codes(flat), t["scale"][flat], t["zero"][flat] if "zero" in t else None,
                              self.matrix.dtype)
        return rows.reshape(*index.shape, -1)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def plain(a):
            return a.matrix.dequantize() if isinstance(a, QuantRows) else a
        return func(*[plain(a) for a in args], **{k: plain(v) for k, v in (kwargs or {}).items()})


class QuantEmbedding(nn.Module):
    """nn.Embedding whose table is quantized (plain codes, so rows and chunks dequantize cheaply)."""

    def __init__(self, matrix: QuantMatrix):
        super().__init__()
        if "packed" in matrix.t:
            raise ValueError("an embedding keeps plain integer codes or FP8 values (kernel=False)")
        self.num_embeddings, self.embedding_dim = matrix.shape
        self.scheme = matrix.scheme
        self.matrix = matrix
        for name, t in matrix.tensors().items():
            self.register_buffer(name, t)

    _apply = QuantLinear._apply

    @property
    def weight(self) -> QuantRows:
        return QuantRows(self.matrix)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]
