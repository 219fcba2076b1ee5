"""Reading quantized weights into the text model: each quantized Linear, the embedding and each layer's experts
are replaced by `quant` modules built from their stored encodings (see `quant.config` for the standards read).

Quantized experts are stored one Linear per expert, as compressed-tensors writes mixture-of-experts models:
`...layers.{i}.experts.{e}.{gate,up,down}_proj.*` (gate and up are joined into this model's one [2I, D] matrix).
The text weights are stored once (under `model.decoder.`) and shared by encoder and decoder, so they are
quantized once. Errors name the tensor, its shape and what was expected.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..model.layers import Experts
from ..quant.codec import WeightScheme, unpack_int32
from ..quant.config import Group, QuantPlan
from ..quant.experts import QuantExperts
from ..quant.linear import QuantEmbedding, QuantLinear, QuantMatrix
from .keys import TEXT_PREFIX

QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_scale_inv",
                  "weight_global_scale")


def _error(files, msg: str):
    from .weights import CheckpointError

    return CheckpointError(f"{files.path}: {msg}")


def _shape_str(files, key: str) -> str:
    return f"{key} {list(files.shape(key))}"


class Stored(NamedTuple):
    """One quantized weight as stored: integer codes int8 [N, K] or FP8 values, scales, zero points (integers only,
    or None), and the scale tensor's key (for errors)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    key: str


def read_raw(files, ck: str, group: Group, shape: tuple[int, int]):
    """The stored encoding of quantized weight `ck` (a module name), checked against `shape` [N, K]: integer codes
    with scales [N, G] and zero points, or FP8 values with their scales."""
    n, k = shape
    scheme, fmt = group.scheme, group.format
    keys = files.files

    def need(suffix: str) -> str:
        key = f"{ck}.{suffix}"
        if key not in keys:
            have = [s for s in ("weight", *QUANT_SUFFIXES) if f"{ck}.{s}" in keys]
            raise _error(files, f"missing tensor {key} ({group.name} of quantization_config stores {fmt} weights; "
                                f"{ck} has {', '.join(have) or 'no tensors'})")
        return key

    if scheme.kind == "float":
        vkey = need("weight")
        values = files.tensor(vkey)
        if values.dtype != torch.float8_e4m3fn or tuple(values.shape) != shape:
            raise _error(files, f"tensor {_shape_str(files, vkey)} ({str(values.dtype).removeprefix('torch.')}) "
                                f"should be float8_e4m3fn {list(shape)}")
        skey = f"{ck}.weight_scale_inv" if f"{ck}.weight_scale_inv" in keys else need("weight_scale")
        scale = files.tensor(skey).float()
        if scheme.block is None and scale.numel() != 1:
            scale = scale.reshape(-1, 1) if scale.numel() == n else scale
        return Stored(values, scale, None, skey)

    skey = need("weight_scale")
    scale = files.tensor(skey)
    if fmt == "pack-quantized":
        pkey, shkey = need("weight_packed"), need("weight_shape")
        stored = [int(v) for v in files.tensor(shkey).reshape(-1).tolist()]
        if stored != [n, k]:
            raise _error(files, f"tensor {shkey} says {stored}, expected {[n, k]}")
        packed = files.tensor(pkey)
        try:
            q = unpack_int32(packed, scheme.bits, k)
        except ValueError as e:
            raise _error(files, f"tensor {_shape_str(files, pkey)}: {e}") from None
        if q.shape[0] != n:
            raise _error(files, f"tensor {_shape_str(files, pkey)} has {q.shape[0]} rows, expected {n}")
    else:  # int-quantized / naive-quantized: one int8 code per weight
        pkey = need("weight")
        q = files.tensor(pkey)
        if q.dtype != torch.int8 or tuple(q.shape) != shape:
            raise _error(files, f"tensor {_shape_str(files, pkey)} should be int8 {list(shape)}")
    scale = _as_groups(files, skey, scale, n, k, scheme)
    zero = None
    zkey = f"{ck}.weight_zero_point"
    if zkey in keys:
        z = files.tensor(zkey)
        if fmt == "pack-quantized" and z.dtype == torch.int32:
            try:
                z = unpack_int32(z.t().contiguous(), scheme.bits, n).t()
            except ValueError as e:
                raise _error(files, f"tensor {_shape_str(files, zkey)}: {e}") from None
        zero = _as_groups(files, zkey, z, n, k, scheme)
        if not bool(zero.ne(0).any()):
            zero = None
    return Stored(q, scale, zero, skey)


def _as_groups(files, key: str, s: torch.Tensor, n: int, k: int, scheme: WeightScheme) -> torch.Tensor:
    groups = k // scheme.group_size if scheme.group_size else 1
    if scheme.group_size and k % scheme.group_size:
        raise _error(files, f"group size {scheme.group_size} does not divide {k}, the input dimension of {key}")
    if s.numel() == 1 and not scheme.group_size:
        return s.reshape(1, 1).expand(n, 1).clone()
    if s.numel() != n * groups:
        raise _error(files, f"tensor {key} has shape {list(s.shape)}, expected {[n, groups]} "
                            f"({scheme.name} over a weight of shape {[n, k]})")
    return s.reshape(n, groups)


def _matrix(files, raws, scheme: WeightScheme, dtype, device, kernel: bool) -> QuantMatrix:
    """One QuantMatrix from one or more stored parts stacked along the output dimension (gate then up)."""
    try:
        if scheme.kind == "float":
            values = torch.cat([r.codes for r in raws]).to(device)
            if scheme.block is not None and len(raws) > 1:
                bn = scheme.block[0]
                if any(r.codes.shape[0] % bn for r in raws):
                    raise ValueError(f"parts of {[r.codes.shape[0] for r in raws]} rows do not align to {bn}-row blocks")
            scale = torch.cat([r.scale for r in raws]).to(device)
            return QuantMatrix.from_fp8(values, scale, scheme, dtype)
        q = torch.cat([r.codes for r in raws]).to(device)
        scale = torch.cat([r.scale for r in raws]).to(device)
        zeros = [r.zero for r in raws]
        zero = None
        if any(z is not None for z in zeros):
            zero = torch.cat([z if z is not None else torch.zeros_like(r.scale) for z, r in zip(zeros, raws)]).to(device)
        return QuantMatrix.from_codes(q, scale, scheme, dtype, zero, kernel=kernel)
    except ValueError as e:
        raise _error(files, f"tensor {', '.join(r.key for r in raws)}: {e}") from None


def replace_quantized(model: nn.Module, files, plan: QuantPlan, dtype: torch.dtype,
                      device) -> set[str]:
    """Put quant modules in place of every quantized Linear, Embedding and Experts of `model` (on the meta device);
    returns the names of the replaced modules (their float parameters are no longer expected)."""
    replaced = set()
    for name, module in list(model.named_modules()):
        ck = TEXT_PREFIX + name
        if isinstance(module, (nn.Linear, nn.Embedding)):
            kind = "Linear" if isinstance(module, nn.Linear) else "Embedding"
            group = plan.scheme(ck, kind)
            if group is None or (plan.method == "fp8" and f"{ck}.weight_scale_inv" not in files.files):
                continue  # full precision (a block-FP8 release leaves some Linears so, without a scale)
            shape = tuple(module.weight.shape)
            raw = read_raw(files, ck, group, shape)
            matrix = _matrix(files, [raw], group.scheme, dtype, device, kernel=kind == "Linear")
            new = QuantLinear(matrix) if kind == "Linear" else QuantEmbedding(matrix)
        elif isinstance(module, Experts) and not isinstance(module, QuantExperts):
            e0 = f"{ck}.0"
            gate_g, down_g = plan.scheme(f"{e0}.gate_proj"), plan.scheme(f"{e0}.down_proj")
            if gate_g is None and down_g is None:
                continue
            if gate_g is None or down_g is None or plan.scheme(f"{e0}.up_proj") != gate_g:
                raise _error(files, f"{ck}: quantization_config quantizes some of the experts' projections but not all "
                                    "(gate, up and down must be quantized alike or not at all)")
            i, d = module.intermediate, module.gate_up_proj.shape[-1]
            gate_up, down = [], []
            for e in range(module.num_experts):
                p = f"{ck}.{e}"
                parts = [read_raw(files, f"{p}.gate_proj", gate_g, (i, d)), read_raw(files, f"{p}.up_proj", gate_g, (i, d))]
                gate_up.append(_matrix(files, parts, gate_g.scheme, dtype, device, kernel=True))
                down.append(_matrix(files, [read_raw(files, f"{p}.down_proj", down_g, (d, i))], down_g.scheme, dtype,
                                    device, kernel=True))
            new = QuantExperts(gate_up, down)
            del gate_up, down
            _trim()
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        replaced.add(name)
    _trim()
    return replaced


def _trim() -> None:
    """Give the allocator's free memory back to the system (glibc): a release-sized load frees gigabytes of
    per-expert temporaries in pieces the allocator would otherwise keep, counted in resident memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def consumed_keys(files, replaced: set[str]) -> set[str]:
    """The checkpoint keys read by `replace_quantized` (every tensor under a replaced module)."""
    prefixes = tuple(TEXT_PREFIX + name + "." for name in replaced)
    return {k for k in files.files if k.startswith(prefixes)}
