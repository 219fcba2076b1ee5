"""Load and save checkpoint directories in the release layout.

A directory holds `config.json`, optionally `generation_config.json`, and `model.safetensors` or
shards listed by `model.safetensors.index.json`. Text weights are stored once under
`model.decoder.*` and shared by encoder and decoder; the LM head is the embedding (a stored
`lm_head.weight` is accepted and must match it); `layer_scalar` is stored per mode
(`model.encoder.language_model.layers.i.layer_scalar`). Vision-tower tensors
(`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`) are checked against the config and
left on disk for text-only use.

The model is built on the meta device and each tensor is read from the memory-mapped file, cast and
assigned one at a time, so loading needs about the weights' size in memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, GenerationConfig, ModelConfig, VisionConfig
from .model import DiffusionGemmaText
from .model.layers import RotaryEmbedding

log = logging.getLogger(__name__)

TEXT_PREFIX = "model.decoder."
ENCODER_PREFIX = "model.encoder.language_model."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, inconsistent with its config, or not readable."""


@dataclass
class Checkpoint:
    """What `load` returns: the text model, its configs, and where it came from."""

    model: DiffusionGemmaText
    config: ModelConfig
    generation_config: GenerationConfig
    path: Path
    vision_keys: tuple[str, ...] = ()
    vision: torch.nn.Module | None = None  # the vision tower and projection, when loaded


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype not in (None, "auto") else (config.dtype or "float32")
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}")
    return DTYPES[name]


def text_key_map(model: DiffusionGemmaText) -> dict[str, str]:
    """checkpoint key -> model state-dict key, for every text tensor the model expects."""
    out = {}
    for name in model.state_dict():
        if ".lora_" in name:  # unmerged LoRA adapters are saved apart (training.lora)
            continue
        if name.endswith(".encoder_layer_scalar"):
            out[ENCODER_PREFIX + name.replace(".encoder_layer_scalar", ".layer_scalar")] = name
        else:
            out[TEXT_PREFIX + name] = name
    return out


def vision_shapes(v: VisionConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Expected vision-tower tensors of a Gemma 4 vision config (transformers' naming)."""
    p = "model.encoder.vision_tower."
    d, f, hd = v.hidden_size, v.intermediate_size, v.head_dim
    q_out, kv_out = v.num_attention_heads * hd, v.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        p + "patch_embedder.input_proj.weight": (d, 3 * v.patch_size**2),
        p + "patch_embedder.position_embedding_table": (2, v.position_embedding_size, d),
        "model.encoder.embed_vision.embedding_projection.weight": (text_hidden, d),
    }
    if v.standardize:
        shapes[p + "std_bias"] = (d,)
        shapes[p + "std_scale"] = (d,)
    for j in range(v.num_hidden_layers):
        lp = f"{p}encoder.layers.{j}."
        shapes.update({
            lp + "self_attn.q_proj.linear.weight": (q_out, d),
            lp + "self_attn.k_proj.linear.weight": (kv_out, d),
            lp + "self_attn.v_proj.linear.weight": (kv_out, d),
            lp + "self_attn.o_proj.linear.weight": (d, q_out),
            lp + "self_attn.q_norm.weight": (hd,),
            lp + "self_attn.k_norm.weight": (hd,),
            lp + "mlp.gate_proj.linear.weight": (f, d),
            lp + "mlp.up_proj.linear.weight": (f, d),
            lp + "mlp.down_proj.linear.weight": (d, f),
            **{lp + n + ".weight": (d,) for n in ("input_layernorm", "post_attention_layernorm",
                                                  "pre_feedforward_layernorm", "post_feedforward_layernorm")},
        })
    return shapes


def _weight_files(path: Path) -> dict[str, Path]:
    """key -> file, from the shard index or the single file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid shard index ({e})") from None
        files = {k: path / f for k, f in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index} lists {f.name}, which does not exist")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    return {k: single for k in _open(single).keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None


def build_text_model(config: ModelConfig, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "meta") -> DiffusionGemmaText:
    """Build the text model (on the meta device by default: no memory until weights are assigned)."""
    with torch.device(device):
        model = DiffusionGemmaText(config.text)
    return model.to(dtype) if str(device) != "meta" else model


def load(path: str | Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
         vision: bool = False) -> Checkpoint:
    """Load a checkpoint directory as published. Errors name the file, key and shapes involved.

    vision=True also loads the vision tower (an error if the checkpoint has none)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    config = ModelConfig.from_file(path / "config.json")
    gen_file = path / "generation_config.json"
    gen = GenerationConfig.from_file(gen_file) if gen_file.is_file() else GenerationConfig(
        eos_token_id=config.eos_token_id or config.text.eos_token_id, pad_token_id=config.text.pad_token_id)
    dtype = resolve_dtype(dtype, config)
    files = _weight_files(path)

    model = build_text_model(config)
    key_map = text_key_map(model)
    expected = {k: tuple(model.state_dict()[m].shape) for k, m in key_map.items()}
    vision_expected = vision_shapes(config.vision, config.text.hidden_size) if config.vision else {}

    missing = sorted(k for k in expected if k not in files)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    vision_keys, duplicates, unexpected = [], [], []
    for k in files:
        if k in expected:
            continue
        if k.startswith(VISION_PREFIXES):
            if not vision_expected:
                raise CheckpointError(f"{path}: tensor {k} belongs to a vision tower but config.json has no "
                                      "vision_config")
            vision_keys.append(k)
        elif k == "lm_head.weight":
            duplicates.append((k, TEXT_PREFIX + "embed_tokens.weight"))
        elif k.startswith(ENCODER_PREFIX) and TEXT_PREFIX + k[len(ENCODER_PREFIX):] in expected:
            duplicates.append((k, TEXT_PREFIX + k[len(ENCODER_PREFIX):]))  # an untied copy of a shared weight
        else:
            unexpected.append(k)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(sorted(unexpected)[:5])}{more}")
    for k in vision_keys:
        if k not in vision_expected:
            raise CheckpointError(f"{path}: unexpected vision tensor {k} for this vision_config")

    handles: dict[Path, object] = {}

    def handle(key):
        f = files[key]
        if f not in handles:
            handles[f] = _open(f)
        return handles[f]

    def shape_of(key):
        return tuple(handle(key).get_slice(key).get_shape())

    for k in vision_keys:
        if shape_of(k) != vision_expected[k]:
            raise CheckpointError(f"{path}: tensor {k} has shape {list(shape_of(k))}, "
                                  f"expected {list(vision_expected[k])}")
    missing_vision = sorted(set(vision_expected) - set(vision_keys)) if vision_keys else []
    if missing_vision:
        raise CheckpointError(f"{path}: missing vision tensor(s) {', '.join(missing_vision[:5])}")

    state = {}
    for k, name in key_map.items():
        if shape_of(k) != expected[k]:
            raise CheckpointError(f"{path}: tensor {k} has shape {list(shape_of(k))}, expected {list(expected[k])}")
        state[name] = handle(k).get_tensor(k).to(device=device, dtype=dtype)
    for k, shared in duplicates:
        if shape_of(k) != expected[shared] or not torch.equal(handle(k).get_tensor(k).to(dtype),
                                                                state[key_map[shared]]):
            raise CheckpointError(f"{path}: tensor {k} differs from {shared}; encoder and decoder (and the LM "
                                  "head) must share their weights")
    model.load_state_dict(state, assign=True, strict=True)
    with torch.device(device):
        model.rotary = RotaryEmbedding(config.text)  # non-persistent buffers, rebuilt off the meta device
    model.eval().requires_grad_(False)
    tower = None
    if vision:
        if not vision_keys:
            raise CheckpointError(f"{path}: no vision tower in this checkpoint")
        from .vision.tower import Vision, axial_inv_freq

        with torch.device("meta"):
            tower = Vision(config.vision, config.text.hidden_size)
        vstate = {k.removeprefix("model.encoder."): handle(k).get_tensor(k).to(device=device, dtype=dtype)
                  for k in vision_keys}
        tower.load_state_dict(vstate, assign=True, strict=True)
        tower.vision_tower.register_buffer("inv_freq", axial_inv_freq(config.vision).to(device), persistent=False)
        tower.eval().requires_grad_(False)
    return Checkpoint(model, config, gen, path, tuple(sorted(vision_keys)), tower)


def save(model: DiffusionGemmaText, config: ModelConfig, generation_config: GenerationConfig, path: str | Path,
         extra_tensors: dict[str, torch.Tensor] | None = None, vision=None) -> None:
    """Write the release layout: config.json, generation_config.json, model.safetensors (with the vision
    tower under model.encoder.* when given)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_dtype = str(model.dtype).removeprefix("torch.")
    cfg = config.to_dict()
    cfg["dtype"] = model_dtype
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation_config.to_dict(), indent=2) + "\n")
    tensors = {k: model.state_dict()[m].detach().contiguous().cpu() for k, m in text_key_map(model).items()}
    if vision is not None:
        tensors.update({"model.encoder." + k: v.detach().contiguous().cpu() for k, v in vision.state_dict().items()
                        if ".lora_" not in k})
    tensors.update(extra_tensors or {})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "build_text_model", "load", "save"]
