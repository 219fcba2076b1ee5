"""Image preprocessing with Pillow, as transformers' Gemma 4 image processor (PIL backend) does it.

1. RGB conversion (transparency composited onto white);
2. an aspect-ratio-preserving resize to sides that are multiples of pooling x patch size, as large as
   fits `max_soft_tokens * pooling^2` patches (small images are scaled up; very thin ones get one
   row or column of pooling cells), bicubic (Pillow antialiases when it shrinks);
3. rescale to [0, 1] (float64 multiply, float32 result);
4. patchify: patches in row-major order, each flattened as (row in patch, column in patch, channel);
5. per-patch (x, y) = (column, row) positions; padding to the budget with zero pixels at (-1, -1).

Bad input (not an image, truncated, corrupt, absurdly large) raises `ImageError` with the reason.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
MAX_PIXELS = 64_000_000  # refuse larger inputs (decompression bombs)


class ImageError(ValueError):
    """An input that is not a usable image."""


@dataclass
class ImageInput:
    pixel_values: torch.Tensor  # [max_patches, 3 * patch^2] float32 in [0, 1], zero-padded
    positions: torch.Tensor  # [max_patches, 2] long (x, y); (-1, -1) for padding
    num_soft_tokens: int
    size: tuple[int, int]  # resized (height, width)


def target_size(height: int, width: int, patch_size: int, max_patches: int, pooling: int) -> tuple[int, int]:
    side = pooling * patch_size
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ImageError(f"cannot resize a {height}x{width} image to a non-empty grid")
    longest = (max_patches // pooling**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    if th * tw > max_patches * patch_size**2:
        raise ImageError(f"a {height}x{width} image does not fit {max_patches} patches")
    return th, tw


def to_rgb(image):
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source) -> PIL.Image.Image:  # noqa: F821
    """A PIL image from a path, bytes or an open PIL image, fully decoded (errors surface here)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read image {source}: {e.strerror}") from None
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError("not an image (unrecognised format)") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"image too large: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:  # a header that is cut short or inconsistent
            raise ImageError(f"corrupt or truncated image: {e}") from None
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError("empty image")
    if w * h > MAX_PIXELS:
        raise ImageError(f"image too large: {w}x{h} pixels (limit {MAX_PIXELS})")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"corrupt or truncated image: {e}") from None
    return image


def preprocess(image, max_soft_tokens: int = 280, patch_size: int = 16, pooling: int = 3) -> ImageInput:
    from PIL import Image

    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise ImageError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens}")
    image = to_rgb(load_image(image))
    max_patches = max_soft_tokens * pooling**2
    w, h = image.size
    th, tw = target_size(h, w, patch_size, max_patches, pooling)
    if (th, tw) != (h, w):
        image = image.resize((tw, th), resample=Image.BICUBIC)
    arr = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3]
    ph, pw = th // patch_size, tw // patch_size
    patches = arr.reshape(ph, patch_size, pw, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    ys, xs = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
    pos = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)
    pixels = np.zeros((max_patches, patches.shape[1]), dtype=np.float32)
    pixels[:len(patches)] = patches
    positions = np.full((max_patches, 2), -1, dtype=np.int64)
    positions[:len(patches)] = pos
    return ImageInput(torch.from_numpy(pixels), torch.from_numpy(positions), len(patches) // pooling**2, (th, tw))
