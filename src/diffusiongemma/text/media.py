"""Image and video parts of chat messages: where they are, where they come from, and who may use which source.

`extract_media` replaces each OpenAI-style image/video part (`image_url`, `image`, `video_url`, `video`)
by the bare placeholder part the chat template renders, and returns the sources in order: the bytes of
a `data:` URL, bytes or an image object given directly, or a local path when the policy allows it.
Network URLs are never fetched. Decoding the sources is the vision package's work, not this module's.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from .chat import ChatError

KINDS = ("image", "image_url", "video", "video_url")


@dataclass
class MediaPolicy:
    """What image sources a caller may use: `data:` URLs and raw bytes always, local paths only when
    allowed (the CLI allows them; the server only under the directories of --allow-local-images); never
    network URLs. A local path must be a regular file of at most `max_bytes` under one of `roots` (any
    directory when `roots` is empty); a missing file and a forbidden one get the same message."""

    allow_local_paths: bool = True
    roots: tuple = ()
    max_bytes: int = 64 * 1024 * 1024

    def local(self, path: str, where: str) -> str:
        refused = ChatError(f"{where}: no image at {path!r} that this server may read")
        try:
            p = Path(path).resolve(strict=True)
            inside = not self.roots or any(p.is_relative_to(Path(r).resolve()) for r in self.roots)
            if not inside or not p.is_file() or p.stat().st_size > self.max_bytes:
                raise refused
        except (OSError, ValueError, RuntimeError):
            raise refused from None
        return str(p)


def extract_media(messages, policy: MediaPolicy, vision: bool) -> tuple[list, list[tuple[str, object]]]:
    """(messages with placeholder parts, [(\"image\" | \"video\", source)] in order). `vision`: the model has
    a vision tower (else any image part is an error)."""
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
            if kind in KINDS:
                if not vision:
                    raise ChatError(f"messages[{i}].content[{j}]: this model has no vision tower")
                is_video = kind.startswith("video")
                media.append(("video" if is_video else "image", _source(part, kind, policy,
                                                                        f"messages[{i}].content[{j}]")))
                parts.append({"type": "video" if is_video else "image"})
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, media


def _source(part: dict, kind: str, policy: MediaPolicy, where: str):
    if kind in ("image_url", "video_url"):
        ref = part.get(kind)
        url = ref.get("url") if isinstance(ref, dict) else ref
    else:
        url = part.get(kind) or part.get("path") or part.get("url")
    if url is None:
        raise ChatError(f"{where}: the {kind} part has no image")
    if not isinstance(url, str):
        if isinstance(url, (bytes, bytearray, list, tuple)) or hasattr(url, "getbands"):
            return url  # bytes, frames or a PIL image given directly (the Python API)
        raise ChatError(f"{where}: the {kind} must be a URL string")
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
                        "--allow-local-images DIR)")
    return policy.local(url.removeprefix("file://"), where)
