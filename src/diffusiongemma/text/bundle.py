"""A checkpoint together with its tokenizer, chat template and (optionally) vision preprocessing:
messages in, prompt ids (and the images they refer to) out."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loader import Checkpoint, load
from . import tokenizer as T
from .chat import ChatError, ChatTemplate, normalize_messages, validate_tools
from .tokenizer import Tokenizer


@dataclass
class MediaPolicy:
    """What image sources a caller may use: `data:` URLs and raw bytes always, local paths only when
    allowed (the CLI allows them; the server only with --allow-local-images); never network URLs."""

    allow_local_paths: bool = True


@dataclass
class PromptBuilder:
    """Chat messages (with image/video parts) -> prompt ids and the preprocessed images they refer to."""

    tokenizer: Tokenizer
    template: ChatTemplate
    image_ids: tuple[int, int, int] | None = None  # (begin-image, image soft token, end-image); None: no vision
    processor: dict = field(default_factory=dict)  # max_soft_tokens, patch_size, pooling_kernel_size, num_frames

    def render(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = False,
               add_generation_prompt: bool = True) -> str:
        return self.template.render(normalize_messages(messages), validate_tools(tools),
                                    add_generation_prompt=add_generation_prompt, enable_thinking=thinking)

    def chat_inputs(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = False,
                    policy: MediaPolicy | None = None) -> tuple[list[int], list]:
        """Prompt ids with image/video placeholders expanded, and the preprocessed images (video frames
        included) in the order their soft tokens appear."""
        messages, media = self._extract_media(messages, policy or MediaPolicy())
        ids = self.tokenizer.encode(self.render(messages, tools, thinking))
        if not media:
            return ids, []
        return self._expand(ids, media)

    # -- media ------------------------------------------------------------------------------------
    def _extract_media(self, messages, policy):
        if not isinstance(messages, list):
            raise ChatError("messages must be a non-empty list")
        out, media = [], []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, list):
                out.append(m)
                continue
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image", "image_url", "video", "video_url"):
                    if self.image_ids is None:
                        raise ChatError(f"messages[{i}].content[{j}]: this model has no vision tower")
                    src = self._source(part, kind, policy, f"messages[{i}].content[{j}]")
                    is_video = kind.startswith("video")
                    media.append(("video" if is_video else "image", src))
                    parts.append({"type": "video" if is_video else "image"})
                else:
                    parts.append(part)
            out.append({**m, "content": parts})
        return out, media

    def _source(self, part, kind, policy, where):
        if kind in ("image_url", "video_url"):
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
        else:
            url = part.get(kind) or part.get("path") or part.get("url")
        if url is None:
            raise ChatError(f"{where}: the {kind} part has no image")
        if not isinstance(url, str):
            return url  # bytes or a PIL image given directly
        if url.startswith("data:"):
            try:
                header, data = url.split(",", 1)
                if ";base64" not in header:
                    raise ValueError("only base64 data URLs are supported")
                return base64.b64decode(data, validate=True)
            except (ValueError, binascii.Error) as e:
                raise ChatError(f"{where}: invalid data URL ({e})") from None
        if url.startswith(("http://", "https://", "ftp://")):
            raise ChatError(f"{where}: network URLs are not fetched; send the image as a data: URL")
        if not policy.allow_local_paths:
            raise ChatError(f"{where}: local file paths are not allowed here (start the server with "
                            "--allow-local-images)")
        return url.removeprefix("file://")

    def _expand(self, ids, media):
        from ..vision.placement import expand_placeholders
        from ..vision.preprocess import preprocess
        from ..vision.video import load_video

        p = self.processor
        boi, img_id, eoi = self.image_ids
        vid_id = self.tokenizer.token_id(T.VIDEO_TOKEN)
        images, out, k = [], [], 0
        for t in ids:
            if t not in (img_id, vid_id) or k >= len(media):
                out.append(t)
                continue
            kind, src = media[k]
            k += 1
            if kind == "image":
                im = preprocess(src, p["max_soft_tokens"], p["patch_size"], p["pooling_kernel_size"])
                images.append(im)
                out += expand_placeholders([img_id], [im.num_soft_tokens], img_id, boi, eoi)
            else:
                video = load_video(src, p["num_frames"], p["video_soft_tokens"], p["patch_size"],
                                   p["pooling_kernel_size"])
                for n, (frame, stamp) in enumerate(zip(video.frames, video.timestamps)):
                    images.append(frame)
                    out += self.tokenizer.encode((" " if n else "") + stamp + " ")
                    out += [boi] + [vid_id] * frame.num_soft_tokens + [eoi]
        if k != len(media):
            raise ChatError(f"the chat template placed {k} of {len(media)} images")
        return out, images




@dataclass
class TextModel:
    checkpoint: Checkpoint
    builder: PromptBuilder

    @classmethod
    def load(cls, path: str | Path, dtype: str | torch.dtype | None = "auto", vision: bool | None = None) -> TextModel:
        """vision=None loads the vision tower when the checkpoint has one."""
        path = Path(path)
        if vision is None:
            cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
            vision = cfg.get("vision_config") is not None and _has_vision_tensors(path)
        ck = load(path, dtype=dtype, vision=vision)
        tok = Tokenizer.from_dir(path)
        template = ChatTemplate.from_dir(path, tok.special_tokens_map())
        if ck.vision is None:
            return cls(ck, PromptBuilder(tok, template))
        c = ck.config
        return cls(ck, PromptBuilder(tok, template, (c.boi_token_id, c.image_token_id, c.eoi_token_id),
                                     processor_config(path, c.vision)))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.builder.tokenizer

    @property
    def template(self) -> ChatTemplate:
        return self.builder.template

    @property
    def name(self) -> str:
        return self.checkpoint.path.name

    @property
    def sees(self) -> bool:
        return self.checkpoint.vision is not None

    def engine_soft_ids(self) -> tuple[int, ...]:
        vid = self.tokenizer.token_id(T.VIDEO_TOKEN)
        return (vid,) if vid is not None else ()

    def render(self, *a, **k) -> str:
        return self.builder.render(*a, **k)

    def chat_inputs(self, *a, **k) -> tuple[list[int], list]:
        return self.builder.chat_inputs(*a, **k)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = False) -> list[int]:
        ids, images = self.builder.chat_inputs(messages, tools, thinking)
        if images:
            raise ChatError("these messages contain images: use chat_inputs() and pass the images to the engine")
        return ids

    def text_ids(self, text: str) -> list[int]:
        """A raw prompt (no chat template): <bos> then the text."""
        return [self.tokenizer.require_id(self.tokenizer.bos_token)] + self.tokenizer.encode(text)


def processor_config(path: Path | None, vision) -> dict:
    """Image/video preprocessing settings: the vision config's, overridden by preprocessor_config.json."""
    proc = {"max_soft_tokens": vision.default_output_length, "patch_size": vision.patch_size,
            "pooling_kernel_size": vision.pooling_kernel_size, "num_frames": 32, "video_soft_tokens": 70}
    f = path / "preprocessor_config.json" if path else None
    if f is not None and f.is_file():
        proc.update({k: v for k, v in json.loads(f.read_text()).items() if k in proc})
    return proc


def _has_vision_tensors(path: Path) -> bool:
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        return any(k.startswith("model.encoder.vision_tower.") for k in json.loads(idx.read_text())["weight_map"])
    f = path / "model.safetensors"
    if not f.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        return any(k.startswith("model.encoder.vision_tower.") for k in h.keys())
