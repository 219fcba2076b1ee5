"""Reading and writing the weights of a checkpoint directory (`model.safetensors`, or shards listed by
`model.safetensors.index.json`).

The model is built on the meta device and each tensor is read from the memory-mapped file, cast and
assigned one at a time, so loading needs about the weights' size in memory. Every tensor the model
expects must be there with its shape; a stored duplicate of a shared weight (`lm_head.weight`, an encoder
copy) must equal it; vision-tower tensors are checked against the vision config and read only when the
tower is wanted. Errors name the file, key and shapes involved.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import GenerationConfig, ModelConfig
from ..model import DiffusionGemmaText
from ..model.layers import RotaryEmbedding
from ..model.shard import read_slice, shard_text_model, slices
from ..parallel import SINGLE, TensorParallel
from .host import preferred_dtype
from .keys import VISION_PREFIXES, VISION_ROOT, shared_key, text_key_map, vision_shapes

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, inconsistent with its config, or not readable."""


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype not in (None, "auto") else (config.dtype or "float32")
    if name == "host":  # whichever of float32 and bfloat16 this CPU multiplies faster (`loader.host`)
        if config.quantization is None:
            return preferred_dtype()
        name = config.dtype or "bfloat16"  # quantized: the activation dtype its packed kernels were written for
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES) | {'auto', 'host'})}")
    return DTYPES[name]


def build_text_model(config: ModelConfig, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "meta") -> DiffusionGemmaText:
    """Build the text model (on the meta device by default: no memory until weights are assigned)."""
    with torch.device(device):
        model = DiffusionGemmaText(config.text)
    return model.to(dtype) if str(device) != "meta" else model


def _more(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")


class WeightFiles:
    """The tensors of a checkpoint directory: key -> file (from the shard index or the single file), memory-mapped.
    At most `open_files` shards stay open: a tensor read from one maps its file, and the pages a load has read
    stay resident while the mapping lives, so a release-sized quantized load keeps only the shards it is reading
    mapped (each module's tensors are contiguous in the sorted shards)."""

    def __init__(self, path: Path, open_files: int = 2):
        self.path = path
        self.open_files = open_files
        self._handles: OrderedDict[Path, object] = OrderedDict()
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {k: path / f for k, f in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e})") from None
            for f in set(self.files.values()):
                if not f.is_file():
                    raise CheckpointError(f"{index} lists {f.name}, which does not exist")
        else:
            single = path / "model.safetensors"
            if not single.is_file():
                raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
            self.files = {k: single for k in self._handle(single).keys()}

    def _handle(self, f: Path):
        if f in self._handles:
            self._handles.move_to_end(f)
            return self._handles[f]
        try:
            h = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None
        self._handles[f] = h
        while len(self._handles) > self.open_files:
            self._handles.popitem(last=False)
        return h

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[key]).get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        return self._handle(self.files[key]).get_tensor(key)

    def part(self, key: str, rule) -> torch.Tensor:
        """The slice `rule` (`model.shard.slices`) of a stored tensor, read without the rest of it."""
        if rule is None:
            return self.tensor(key)
        return read_slice(self._handle(self.files[key]).get_slice(key), self.shape(key), rule)

    def vision_keys(self) -> list[str]:
        return sorted(k for k in self.files if k.startswith(VISION_PREFIXES))


def check_vision(files: WeightFiles, config: ModelConfig) -> list[str]:
    """The checkpoint's vision-tower keys, checked against `vision_config` (names and shapes)."""
    keys = files.vision_keys()
    if not keys:
        return keys
    if config.vision is None:
        raise CheckpointError(f"{files.path}: tensor {keys[0]} belongs to a vision tower but config.json has no "
                              "vision_config")
    expected = vision_shapes(config.vision, config.text.hidden_size)
    for k in keys:
        if k not in expected:
            raise CheckpointError(f"{files.path}: unexpected vision tensor {k} for this vision_config")
        if files.shape(k) != expected[k]:
            raise CheckpointError(f"{files.path}: tensor {k} has shape {list(files.shape(k))}, "
                                  f"expected {list(expected[k])}")
    missing = sorted(set(expected) - set(keys))
    if missing:
        raise CheckpointError(f"{files.path}: missing vision tensor(s) {_more(missing)}")
    return keys


def read_text_model(files: WeightFiles, config: ModelConfig, dtype: torch.dtype,
                    device: str | torch.device, tp: TensorParallel = SINGLE) -> DiffusionGemmaText:
    """The text model with every weight read, checked and assigned (in eval mode, no gradients). With a
    `quantization_config`, the quantized modules are built from their stored encodings (`loader.quantized`).
    With a tensor-parallel group, only this rank's slice of each sharded tensor is read (`model.shard`)."""
    model = build_text_model(config)
    full_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rules = {}
    if tp.active:
        if config.quantization is not None:
            raise CheckpointError(f"{files.path}: tensor parallelism over quantized weights is not supported yet; "
                                  "load the bfloat16 checkpoint, or run one process")
        shard_text_model(model, tp)  # checks the shapes divide, before any weight is read
        rules = {k: slices(k, config.text, tp) for k in full_shapes}
    replaced, consumed = set(), set()
    if config.quantization is not None:
        from ..quant.config import QuantConfigError, QuantPlan
        from .quantized import consumed_keys, replace_quantized

        try:
            plan = QuantPlan.parse(config.quantization)
        except QuantConfigError as e:
            raise CheckpointError(f"{files.path / 'config.json'}: {e}") from None
        replaced = replace_quantized(model, files, plan, dtype, device)
        consumed = consumed_keys(files, replaced)
    quant_prefixes = tuple(name + "." for name in replaced)
    quant_state = {k: v for k, v in model.state_dict().items() if k.startswith(quant_prefixes)}
    state_shapes = {k: full_shapes.get(k, tuple(v.shape)) for k, v in model.state_dict().items()
                    if k not in quant_state}
    key_map = text_key_map(state_shapes)
    expected = {k: state_shapes[m] for k, m in key_map.items()}
    missing = sorted(k for k in expected if k not in files.files)
    if missing:
        raise CheckpointError(f"{files.path}: missing tensor(s) {_more(missing)}")
    duplicates, unexpected = [], []
    for k in files.files:
        if k in expected or k in consumed or k.startswith(VISION_PREFIXES):
            continue
        shared = shared_key(k, expected)
        (duplicates.append((k, shared)) if shared else unexpected.append(k))
    if unexpected:
        raise CheckpointError(f"{files.path}: unexpected tensor(s) {_more(sorted(unexpected))}")
    state = {}
    for k, name in key_map.items():
        if files.shape(k) != expected[k]:
            raise CheckpointError(f"{files.path}: tensor {k} has shape {list(files.shape(k))}, "
                                  f"expected {list(expected[k])}")
        src = files.part(k, rules.get(name))
        t = src.to(device=device, dtype=dtype)
        # beside quantized weights, the few full-precision tensors are copied out of the file: a tensor that maps
        # its file keeps every page the load read from it resident
        state[name] = t.clone() if replaced and t.data_ptr() == src.data_ptr() else t
    state.update(quant_state)
    for k, shared in duplicates:
        if shared not in expected:
            raise CheckpointError(f"{files.path}: tensor {k} duplicates {shared}, which is stored quantized")
        stored = files.part(k, rules.get(key_map[shared])) if files.shape(k) == expected[shared] else None
        if stored is None or not torch.equal(stored.to(dtype), state[key_map[shared]]):
            raise CheckpointError(f"{files.path}: tensor {k} differs from {shared}; encoder and decoder (and the LM "
                                  "head) must share their weights")
    model.load_state_dict(state, assign=True, strict=True)
    with torch.device(device):
        model.rotary = RotaryEmbedding(config.text)  # non-persistent buffers, rebuilt off the meta device
    return model.eval().requires_grad_(False)


def read_vision(files: WeightFiles, keys: list[str], config: ModelConfig, dtype: torch.dtype,
                device: str | torch.device) -> torch.nn.Module:
    """The vision tower and its projection (`vision.tower.Vision`), from checked keys."""
    from ..vision.tower import Vision, axial_inv_freq

    with torch.device("meta"):
        tower = Vision(config.vision, config.text.hidden_size)
    state = {k.removeprefix(VISION_ROOT): files.tensor(k).to(device=device, dtype=dtype) for k in keys}
    tower.load_state_dict(state, assign=True, strict=True)
    tower.vision_tower.register_buffer("inv_freq", axial_inv_freq(config.vision).to(device), persistent=False)
    return tower.eval().requires_grad_(False)


def save(model: DiffusionGemmaText, config: ModelConfig, generation_config: GenerationConfig, path: str | Path,
         extra_tensors: dict[str, torch.Tensor] | None = None, vision=None) -> None:
    """Write the release layout: config.json, generation_config.json, model.safetensors (with the vision
    tower under model.encoder.* when given)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation_config.to_dict(), indent=2) + "\n")
    state = model.state_dict()
    tensors = {k: state[m].detach().contiguous().cpu() for k, m in text_key_map(state).items()}
    if vision is not None:
        tensors.update({VISION_ROOT + k: v.detach().contiguous().cpu() for k, v in vision.state_dict().items()
                        if ".lora_" not in k})
    tensors.update(extra_tensors or {})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
