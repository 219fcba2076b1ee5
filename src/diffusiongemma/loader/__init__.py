"""Load a checkpoint directory as published: one `load()` returns the whole bundle, each file read once.

A directory holds `config.json`, optionally `generation_config.json`, the weights (`model.safetensors` or
shards, `loader.weights`), and for a chat model `tokenizer.json` (+ `tokenizer_config.json`),
`chat_template.jinja` and, with a vision tower, `preprocessor_config.json`. A directory without a
tokenizer (a random checkpoint, ids only) loads too; then `tokenizer` and `template` are None.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError, GenerationConfig, ModelConfig, VisionConfig
from ..model import DiffusionGemmaText
from ..parallel import SINGLE, TensorParallel
from .host import warn_if_slow_bf16
from .keys import vision_shapes
from .weights import (
    CheckpointError,
    WeightFiles,
    build_text_model,
    check_vision,
    read_text_model,
    read_vision,
    resolve_dtype,
    save,
)

if TYPE_CHECKING:  # the text extra is optional: imported only when a directory has a tokenizer
    from ..text.chat import ChatTemplate
    from ..text.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    """What `load` returns: the text model, its configs, and what a chat model ships beside its weights."""

    model: DiffusionGemmaText
    config: ModelConfig
    generation_config: GenerationConfig
    path: Path
    vision_keys: tuple[str, ...] = ()
    vision: torch.nn.Module | None = None  # the vision tower and projection, when loaded
    tokenizer: Tokenizer | None = None  # when the directory has tokenizer.json
    template: ChatTemplate | None = None  # with the tokenizer
    processor: dict = field(default_factory=dict)  # image/video preprocessing settings (with a vision tower)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def soft_token_ids(self) -> tuple[int, ...]:
        """Token ids whose embeddings vision vectors replace: the image token, and the tokenizer's video token."""
        from ..text.tokenizer import VIDEO_TOKEN

        video = self.tokenizer.token_id(VIDEO_TOKEN) if self.tokenizer is not None else None
        return (self.config.image_token_id,) + ((video,) if video is not None else ())


def default_model_dir() -> str:
    """The model every command uses when none is given: $DIFFUSIONGEMMA_MODEL, else the one shipped in the repo."""
    env = os.environ.get("DIFFUSIONGEMMA_MODEL")
    return env or str(Path(__file__).resolve().parents[3] / "models" / "diffusiongemma-tiny")


def processor_config(path: Path | None, vision: VisionConfig) -> dict:
    """Image/video preprocessing settings: the vision config's, overridden by preprocessor_config.json."""
    proc = {"max_soft_tokens": vision.default_output_length, "patch_size": vision.patch_size,
            "pooling_kernel_size": vision.pooling_kernel_size, "num_frames": 32, "video_soft_tokens": 70}
    f = path / "preprocessor_config.json" if path else None
    if f is not None and f.is_file():
        try:
            given = json.loads(f.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{f} is not valid JSON: {e}") from None
        if not isinstance(given, dict):
            raise ConfigError(f"{f} must hold a JSON object")
        proc.update({k: v for k, v in given.items() if k in proc})
    return proc


def resolve(model: str | Path, revision: str | None = None) -> Path:
    """A checkpoint directory, or a Hugging Face model id (`org/name`) found in the local Hugging Face cache
    (offline: `local_files_only`; `HF_HOME` / `HF_HUB_CACHE` honoured; `revision` a branch, tag or commit).
    Nothing is ever downloaded."""
    path = Path(model)
    if path.is_dir():
        return path
    name = str(model)
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{name} is neither a directory nor resolvable: model ids need huggingface_hub "
                              "(pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        where = f"revision {revision!r} of " if revision else ""
        raise CheckpointError(
            f"{where}model {name} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and is not a "
            f"directory; nothing is downloaded at run time: place it there (huggingface-cli download {name}, on a "
            f"machine with network, then copy the cache) or give the checkpoint's directory ({e.__class__.__name__})"
        ) from None


def load(path: str | Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
         vision: bool | None = None, text: bool | None = None, revision: str | None = None,
         tp: TensorParallel = SINGLE) -> Checkpoint:
    """Load a checkpoint directory, or a model id from the local Hugging Face cache (`resolve`). Errors name
    the file, key and shapes involved.

    dtype: "auto" (the checkpoint's), "host" (float32 or bfloat16, whichever this CPU multiplies faster:
    `loader.host`), a name or a torch.dtype. bfloat16 on a CPU without bf16 kernels logs one warning with the
    measured rates (there float32 is many times faster).
    vision: load the vision tower (None: when the checkpoint has one; True: an error if it has none).
    text: load the tokenizer and chat template (None: when the directory has tokenizer.json).
    tp: this process's tensor-parallel group (`parallel.init`): only its shard of the text weights is read."""
    path = resolve(path, revision)
    config = ModelConfig.from_file(path / "config.json")
    gen_file = path / "generation_config.json"
    gen = GenerationConfig.from_file(gen_file) if gen_file.is_file() else GenerationConfig(
        eos_token_id=config.eos_token_id or config.text.eos_token_id, pad_token_id=config.text.pad_token_id)
    dtype = resolve_dtype(dtype, config)
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and config.quantization is None:  # said once
        warn_if_slow_bf16(f"loading {path.name} in bfloat16")
    files = WeightFiles(path)
    vision_keys = check_vision(files, config)
    model = read_text_model(files, config, dtype, device, tp)
    if vision and not vision_keys:
        raise CheckpointError(f"{path}: no vision tower in this checkpoint")
    tower = read_vision(files, vision_keys, config, dtype, device) if vision_keys and vision is not False else None
    ck = Checkpoint(model, config, gen, path, tuple(vision_keys), tower)
    if text or (text is None and (path / "tokenizer.json").is_file()):
        try:
            from ..text.chat import ChatTemplate
            from ..text.tokenizer import Tokenizer
        except ImportError as e:  # the `text` extra (tokenizers, jinja2) is not installed
            raise CheckpointError(f"{path} has a tokenizer, which needs the text extra: pip install "
                                  f"'diffusiongemma[text]' ({e})") from None
        ck.tokenizer = Tokenizer.from_dir(path)
        ck.template = ChatTemplate.from_dir(path, ck.tokenizer.special_tokens_map())
    if tower is not None:
        ck.processor = processor_config(path, config.vision)
    return ck


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "build_text_model", "default_model_dir", "load",
           "processor_config", "resolve", "save", "vision_shapes"]
