"""Writing quantized checkpoints in the compressed-tensors format, one tensor at a time.

`quantize_checkpoint(src, dst, recipe)` reads a full-precision checkpoint memory-mapped and writes each tensor
quantized (or copied) into size-limited shards with a `model.safetensors.index.json`, so neither the source
nor the result is ever whole in memory. `write_random_quantized` writes a random checkpoint of a named size
directly in the quantized format (integer codes drawn uniformly, scales giving the reference initialisation's
standard deviation), which is how the release shape is benchmarked on a machine that could not hold it in bf16.

Router, norms, layer scalars and the vision tower stay in full precision.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import GenerationConfig, ModelConfig
from ..quant.codec import FP8, INT8, WeightScheme, int4, pack_int32, quantize_fp8, quantize_int
from .keys import TEXT_PREFIX, shared_key

SCHEMES = ("int8", "int4", "fp8", "mixed")
TARGETS = {
    "experts": r"re:.*experts\.\d+\.(gate|up|down)_proj$",
    "linear": r"re:.*(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|self_conditioning\.(gate|up|down)_proj)$",
    "embedding": r"re:.*embed_tokens$",
}
LINEAR = re.compile(TARGETS["linear"][3:])
SHARD_BYTES = 2 << 30
COMPANIONS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class Recipe:
    """Which scheme each kind of weight gets (None: full precision)."""

    experts: WeightScheme | None
    linear: WeightScheme | None
    embedding: WeightScheme | None

    @classmethod
    def named(cls, scheme: str, group_size: int = 128, embedding: str | None = None) -> Recipe:
        """int8 (per channel), int4 (groups of `group_size`), fp8 (per channel), or mixed: experts int4, attention,
        dense and self-conditioning MLPs int8, embedding int8 (see the README's measurements). `embedding`:
        keep|int8|int4|fp8 overrides the embedding's scheme."""
        g4 = int4(group_size)
        table = {"int8": (INT8, INT8, INT8), "int4": (g4, g4, g4), "fp8": (FP8, FP8, FP8), "mixed": (g4, INT8, INT8)}
        if scheme not in table:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        experts, linear, emb = table[scheme]
        if embedding is not None:
            choices = {"keep": None, "int8": INT8, "int4": g4, "fp8": FP8}
            if embedding not in choices:
                raise ValueError(f"unknown embedding scheme {embedding!r}; choose one of {', '.join(choices)}")
            emb = choices[embedding]
        return cls(experts, linear, emb)

    def for_key(self, key: str) -> tuple[str, WeightScheme | None]:
        """(kind, scheme) of a source checkpoint tensor."""
        name = key.removesuffix(".weight")
        if key == TEXT_PREFIX + "embed_tokens.weight":
            return "embedding", self.embedding
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return "experts", self.experts
        if key.endswith(".weight") and LINEAR.match(name):
            return "linear", self.linear
        return "other", None

    def quantization_config(self) -> dict:
        """The compressed-tensors `quantization_config`: one config group per distinct scheme."""
        by_scheme: dict[WeightScheme, list[str]] = {}
        for kind in ("experts", "linear", "embedding"):
            s = getattr(self, kind)
            if s is not None:
                by_scheme.setdefault(s, []).append(TARGETS[kind])
        groups, formats = {}, set()
        for i, (s, targets) in enumerate(by_scheme.items()):
            fmt = "float-quantized" if s.kind == "float" else "pack-quantized"
            formats.add(fmt)
            groups[f"group_{i}"] = {
                "targets": targets, "format": fmt, "input_activations": None, "output_activations": None,
                "weights": {"num_bits": s.bits, "type": s.kind, "symmetric": True, "dynamic": False,
                            "strategy": "group" if s.group_size else "channel", "group_size": s.group_size,
                            "block_structure": None, "actorder": None, "observer": "minmax"},
            }
        return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
                "quantization_status": "compressed", "config_groups": groups, "ignore": [r"re:.*router\.proj$"],
                "kv_cache_scheme": None, "global_compression_ratio": None}


def auto_group_size(in_dims) -> int:
    """The largest of 128, 64, 32 dividing every quantized weight's input dimension (the release's experts are
    704 wide: 64; the shipped model's 96: 32)."""
    dims = set(in_dims)
    for g in (128, 64, 32, 16, 8):
        if all(d % g == 0 for d in dims):
            return g
    raise ValueError(f"no group size of 8 or more divides the input dimensions {sorted(dims)}")


def config_in_dims(config: ModelConfig) -> set[int]:
    """Input dimensions of the weights a recipe quantizes (for `auto_group_size`)."""
    from .weights import build_text_model

    model = build_text_model(config)
    dims = {model.embed_tokens.weight.shape[1]}
    for key, t in model.state_dict().items():
        if Recipe.named("int8").for_key(TEXT_PREFIX + key)[1] is not None:
            dims.add(t.shape[-1])
    return dims


def encode(name: str, w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized weight [N, K] of module `name`."""
    _check_group(name, w.shape[-1], scheme)
    if scheme.kind == "float":
        values, scale = quantize_fp8(w, scheme.block)
        return {f"{name}.weight": values, f"{name}.weight_scale": scale.to(scale_dtype)}
    q, scale = quantize_int(w, scheme)
    return encode_codes(name, q, scale.to(scale_dtype), scheme)


def _check_group(name: str, k: int, scheme: WeightScheme) -> None:
    if scheme.group_size and k % scheme.group_size:
        divisors = [g for g in (256, 128, 64, 32, 16, 8) if k % g == 0]
        raise ValueError(f"group size {scheme.group_size} does not divide {k}, the input dimension of "
                         f"{name}; choose one that does (--group-size {divisors[0] if divisors else 'N'})")


def encode_codes(name: str, q: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    return {f"{name}.weight_packed": pack_int32(q, scheme.bits), f"{name}.weight_scale": scale.contiguous(),
            f"{name}.weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}


class ShardWriter:
    """Tensors written in shards of about `limit` bytes, then the index (one `model.safetensors` if one shard)."""

    def __init__(self, path: Path, limit: int = SHARD_BYTES):
        self.path, self.limit = path, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.shards, self.total = 0, [], 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.pending[k] = v.contiguous()
            self.size += v.numel() * v.element_size()
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            name = f"model-{len(self.shards) + 1:05d}.safetensors"
            save_file(self.pending, str(self.path / name), metadata={"format": "pt"})
            self.shards.append((name, list(self.pending)))
            self.total += self.size
            self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            (self.path / self.shards[0][0]).rename(self.path / "model.safetensors")
            return
        weight_map = {k: name for name, keys in self.shards for k in keys}
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def _prepare(dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for old in [*dst.glob("model*.safetensors"), dst / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)


def _write_config(dst: Path, config: ModelConfig, recipe: Recipe, dtype: str) -> None:
    cfg = config.to_dict()
    cfg["dtype"] = dtype
    cfg["quantization_config"] = recipe.quantization_config()
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def quantize_checkpoint(src: str | Path, dst: str | Path, recipe: Recipe, dtype: str = "bfloat16",
                        progress=None) -> Path:
    """Quantize checkpoint directory `src` into `dst` (everything beside the weights copied)."""
    from .weights import CheckpointError, WeightFiles

    src, dst = Path(src), Path(dst)
    config = ModelConfig.from_file(src / "config.json")
    if config.quantization is not None:
        raise CheckpointError(f"{src} is already quantized; quantize a full-precision checkpoint")
    files = WeightFiles(src)
    if src.resolve() == dst.resolve():
        raise CheckpointError("the destination must differ from the source")
    _prepare(dst)
    for name in COMPANIONS:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    scale_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    out = ShardWriter(dst)
    keys = sorted(files.files)
    for i, key in enumerate(keys):
        kind, scheme = recipe.for_key(key)
        shared = shared_key(key, files.files)
        if shared is not None and recipe.for_key(shared)[1] is not None:
            continue  # a stored copy of a weight that is now quantized (an untied LM head, an encoder copy): dropped
        t = files.tensor(key)
        if scheme is None:
            out.add({key: t})
        elif kind == "experts":
            base = key.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if key.endswith("gate_up_proj"):
                    gate, up = t[e].chunk(2, dim=0)
                    out.add(encode(f"{base}.{e}.gate_proj", gate, scheme, scale_dtype))
                    out.add(encode(f"{base}.{e}.up_proj", up, scheme, scale_dtype))
                else:
                    out.add(encode(f"{base}.{e}.down_proj", t[e], scheme, scale_dtype))
        else:
            out.add(encode(key.removesuffix(".weight"), t, scheme, scale_dtype))
        if progress is not None:
            progress(i + 1, len(keys))
    out.close()
    _write_config(dst, config, recipe, dtype)
    return dst


def write_random_quantized(dst: str | Path, config: ModelConfig, recipe: Recipe, seed: int = 0,
                           std: float = 0.02, dtype: str = "bfloat16") -> Path:
    """A random checkpoint of `config` written directly in `recipe`'s format, tensor by tensor (the codes of
    quantized weights drawn uniformly, their scales set so the weights have standard deviation `std` with a random
    sign per group: zero mean; other matrices N(0, std), norms and scales 1)."""
    from .keys import text_key_map
    from .weights import build_text_model

    dst = Path(dst)
    _prepare(dst)
    g = torch.Generator().manual_seed(seed)
    wdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model = build_text_model(config)  # meta: names and shapes only
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = ShardWriter(dst, limit=SHARD_BYTES // 4)
    for key, name in sorted(text_key_map(shapes).items()):
        shape = shapes[name]
        kind, scheme = recipe.for_key(key)
        if scheme is None:
            t = (torch.randn(shape, generator=g) * std).to(wdtype) if len(shape) >= 2 else torch.ones(shape, dtype=wdtype)
            out.add({key: t})
            continue
        if kind == "experts":
            base = key.rsplit(".", 1)[0]
            e, n, k = shape
            parts = ("gate_proj", "up_proj") if key.endswith("gate_up_proj") else ("down_proj",)
            for j in range(e):
                for part in parts:
                    rows = n // len(parts)
                    out.add(_random_encoded(f"{base}.{j}.{part}", (rows, k), scheme, std, g, wdtype))
        else:
            out.add(_random_encoded(key.removesuffix(".weight"), shape, scheme, std, g, wdtype))
    out.close()
    _write_config(dst, config, recipe, dtype)
    gen = GenerationConfig(eos_token_id=(1, 106, 50), pad_token_id=0)
    (dst / "generation_config.json").write_text(json.dumps(gen.to_dict(), indent=2) + "\n")
    return dst


def _random_encoded(name: str, shape, scheme: WeightScheme, std: float, g, wdtype) -> dict[str, torch.Tensor]:
    n, k = shape
    if scheme.kind == "float":
        return encode(name, torch.randn(shape, generator=g) * std, scheme, wdtype)
    _check_group(name, k, scheme)
    levels = 2 ** scheme.bits
    q = (torch.randint(0, levels, (n, k), generator=g, dtype=torch.int16) - levels // 2).to(torch.int8)
    code_std = ((levels**2 - 1) / 12) ** 0.5
    groups = k // scheme.group_size if scheme.group_size else 1
    sign = torch.randint(0, 2, (n, groups), generator=g).float() * 2 - 1
    scale = (sign * (std / code_std)).to(wdtype)
    return encode_codes(name, q, scale, scheme)
