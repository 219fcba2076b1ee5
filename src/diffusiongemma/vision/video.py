"""Video input: frames sampled evenly (32 by default), each preprocessed as an image with a budget of
70 soft tokens and introduced by its `mm:ss` timestamp, as the Gemma 4 video processor does
(indices = arange(n) * total // n; timestamp = index / fps).

Sources: a video file (decoded with PyAV, which ships its own FFmpeg), an animated image (GIF,
WebP, APNG) or a list of frames. transformers' DiffusionGemma refuses video; we follow the model card
and vLLM, which feed video to the model as image frames (see the README).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from .preprocess import ImageError, ImageInput, load_image, preprocess

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg")


@dataclass
class VideoInput:
    frames: list[ImageInput]
    timestamps: list[str]  # "mm:ss" per frame


def sample_indices(total: int, n: int) -> list[int]:
    n = min(n, total)
    return [i * total // n for i in range(n)]


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def _decode_file(source, num_frames: int = 32):
    """(the sampled frames, fps, the frame count) of a video file (a path or a file object): the frames are
    counted from the container's packets first, so only the sampled ones are ever kept in memory."""
    try:
        import av
    except ImportError:
        raise ImageError("video files need PyAV (pip install av)") from None
    what = source if isinstance(source, (str, Path)) else "the video"
    try:
        with av.open(str(source) if isinstance(source, Path) else source) as container:
            stream = container.streams.video[0]
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if hasattr(source, "seek"):
            source.seek(0)
        keep = set(sample_indices(total, num_frames)) if total else set()
        with av.open(str(source) if isinstance(source, Path) else source) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 24)
            frames = [f.to_image() for i, f in enumerate(container.decode(stream)) if i in keep]
    except (av.error.FFmpegError, IndexError, OSError, ValueError) as e:
        raise ImageError(f"cannot decode video {what}: {e}") from None
    return frames, fps, total


def _decode_animation(image) -> tuple[list, float]:
    from PIL import ImageSequence

    frames, durations = [], []
    for f in ImageSequence.Iterator(image):
        frames.append(f.copy())
        durations.append(f.info.get("duration", 100) or 100)
    fps = 1000.0 / (sum(durations) / len(durations))
    return frames, fps


def load_video(source, num_frames: int = 32, max_soft_tokens: int = 70, patch_size: int = 16, pooling: int = 3,
               fps: float | None = None) -> VideoInput:
    if isinstance(source, (list, tuple)):
        frames, rate = [load_image(f) for f in source], fps or 24.0
    elif isinstance(source, (bytes, bytearray)):  # a data: URL's bytes: an animated image, or a video file
        try:
            frames, rate = _decode_animation(load_image(source))
        except ImageError:
            frames, rate, total = _decode_file(io.BytesIO(source), num_frames)
            return _sampled(frames, total, num_frames, fps or rate, max_soft_tokens, patch_size, pooling)
        rate = fps or rate
    else:
        path = Path(source)
        if path.suffix.lower() in VIDEO_SUFFIXES:
            if not path.is_file():
                raise ImageError(f"cannot read video {path}: no such file")
            frames, rate, total = _decode_file(path, num_frames)
            return _sampled(frames, total, num_frames, fps or rate, max_soft_tokens, patch_size, pooling)
        else:
            frames, rate = _decode_animation(load_image(source))
        rate = fps or rate
    if not frames:
        raise ImageError("the video has no frames")
    idx = sample_indices(len(frames), num_frames)
    return VideoInput([preprocess(frames[i], max_soft_tokens, patch_size, pooling) for i in idx],
                      [_mmss(i / rate) for i in idx])


def _sampled(frames, total: int, num_frames: int, rate: float, max_soft_tokens, patch_size, pooling) -> VideoInput:
    """A video file's already-sampled frames (at sample_indices(total, num_frames)) as a VideoInput."""
    if not frames:
        raise ImageError("the video has no frames")
    idx = sample_indices(total, num_frames)[:len(frames)]
    return VideoInput([preprocess(f, max_soft_tokens, patch_size, pooling) for f in frames],
                      [_mmss(i / rate) for i in idx])
