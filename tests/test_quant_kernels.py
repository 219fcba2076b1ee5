"""Quantized matrices: the compressed-tensors packing against the library's own, every kernel (each layout, every
row count it switches on) against a matmul with the codec's dequantized weight, on the CPU and on CUDA."""

from __future__ import annotations

import pytest
import torch

from diffusiongemma.quant.codec import (
    FP8,
    INT8,
    WeightScheme,
    dequantize_fp8,
    dequantize_int,
    int4,
    pack_int32,
    quantize_fp8,
    quantize_int,
    unpack_int32,
)
from diffusiongemma.quant.linear import QuantLinear, QuantMatrix


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors_packing(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    for shape in [(5, 37), (3, 64), (2, 4, 40)]:
        q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g, dtype=torch.int8)
        ours = pack_int32(q, bits)
        assert torch.equal(ours, pack_to_int32(q, bits))
        assert torch.equal(unpack_int32(ours, bits, shape[-1]), q)
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape)), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,kernel", [(INT8, True), (int4(32), True), (int4(64), True), (int4(32), False),
                                           (FP8, True), (WeightScheme("float", 8, block=(32, 32)), True)])
def test_every_kernel_equals_the_dequantized_reference(scheme, kernel, dtype):
    """Each layout's matmul, at every row count the kernels switch on, against x @ W^T with W dequantized from the
    codes by the codec (not by the module): the packed kernels read what was stored."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 192, generator=g) * 0.02
    if scheme.kind == "float":
        values, scale = quantize_fp8(w, scheme.block)
        want_w = dequantize_fp8(values, scale, scheme.block)
    else:
        q, scale = quantize_int(w, scheme)
        want_w = dequantize_int(q, scale)
    m = QuantMatrix.quantize(w, scheme, dtype, kernel=kernel)
    if scheme.bits == 4 and kernel:
        assert "packed" in m.t  # tinygemm's layout
    torch.testing.assert_close(m.dequantize(torch.float32), want_w, rtol=0, atol=0 if dtype == torch.float32 else
                               want_w.abs().max().item() / 64)
    for rows in (1, 4, 16, 17, 300):
        x = torch.randn(rows, 192, generator=g).to(dtype)
        want = x.float() @ want_w.t()
        got = m.matmul(x)
        assert got.dtype == dtype and got.shape == (rows, 96)
        bound = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got.float() - want).abs().max().item() <= bound * want.abs().max().item(), (rows, scheme.name)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [INT8, int4(128), FP8])
def test_gpu_kernels_equal_the_dequantized_reference(scheme):
    """On CUDA: tinygemm int4 (`_weight_int4pack_mm`), int8 cast-and-matmul, FP8 through `torch._scaled_mm` with
    the activations quantized per row (its bound is the activation rounding, ~2^-4 relative)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 1024, generator=g) * 0.02
    if scheme.kind == "float":
        want_w = dequantize_fp8(*quantize_fp8(w))
    else:
        want_w = dequantize_int(*quantize_int(w, scheme))
    m = QuantMatrix.quantize(w.cuda(), scheme, torch.bfloat16)
    for rows in (1, 16, 256):
        x = torch.randn(rows, 1024, generator=g).bfloat16()
        want = x.float() @ want_w.t()
        got = m.matmul(x.cuda()).float().cpu()
        bound = 0.08 if scheme.kind == "float" else 2e-2
        assert (got - want).abs().max().item() <= bound * want.abs().max().item(), (rows, scheme.name)


def test_int4_weights_packed_for_one_device_refuse_another():
    """tinygemm's CPU and CUDA layouts differ: a module moved across (here: marked as packed for CUDA) raises instead
    of computing garbage."""
    m = QuantLinear(QuantMatrix.quantize(torch.randn(64, 128) * 0.02, int4(32), torch.float32))
    x = torch.randn(3, 128)
    assert m(x).shape == (3, 64)
    m.matrix.layout = "cuda"
    with pytest.raises(RuntimeError, match="packed for cuda cannot run on cpu"):
        m(x)

