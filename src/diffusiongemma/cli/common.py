"""Pieces the `generate` and `chat` commands share: sampler flags, model loading, one-line errors,
the terminal canvas view, and running one request while showing progress."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..engine import CommitEvent, DraftEvent, Engine, SamplingParams


class CLIError(Exception):
    """An error reported as one line, without a traceback."""


def default_model_dir() -> str:
    env = os.environ.get("DIFFUSIONGEMMA_MODEL")
    if env:
        return env
    return str(Path(__file__).resolve().parents[3] / "models" / "diffusiongemma-tiny")


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the model shipped in the repo)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32",
                    help="weight dtype (default float32; auto = the checkpoint's)")
    ap.add_argument("--compile", action="store_true",
                    help="compile the denoising step and commit with torch.compile: the first request pays "
                         "a compile of ~30-90 s, later steps run ~2x faster on a CPU")


def add_sampler_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("sampler (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--max-tokens", type=positive_int, help="exact cap on generated tokens")
    g.add_argument("--steps", type=positive_int, help="denoising step cap per canvas")
    g.add_argument("--t-max", type=positive_float, help="temperature at the first step")
    g.add_argument("--t-min", type=float, help="temperature the schedule approaches")
    g.add_argument("--entropy-bound", type=positive_float, help="entropy bound of the acceptance rule")
    g.add_argument("--stability", type=nonneg_int, help="steps the argmax must be unchanged to stop")
    g.add_argument("--confidence", type=positive_float, help="mean-entropy threshold to stop")
    g.add_argument("--schedule-steps", type=positive_int, help="temperature schedule length, independent of --steps")
    g.add_argument("--seed", type=int, help="random seed (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--think", action="store_true", help="thinking mode on")
    g.add_argument("--thinking-budget", type=nonneg_int, help="cap on reasoning tokens")
    g.add_argument("--show-canvas", action="store_true", help="live view of the canvas as it denoises")


def sampling_params(a, draft: bool) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, max_denoising_steps=a.steps, t_max=a.t_max, t_min=a.t_min,
                          entropy_bound=a.entropy_bound, stability_threshold=a.stability,
                          confidence_threshold=a.confidence, schedule_steps=a.schedule_steps, seed=a.seed,
                          draft=draft)


def load_text_model(a):
    from ..text.bundle import TextModel

    path = a.model or default_model_dir()
    if not Path(path).is_dir():
        raise CLIError(f"model directory {path} does not exist")
    return TextModel.load(path, dtype=a.dtype)


def known_errors() -> tuple[type[BaseException], ...]:
    from ..config import ConfigError
    from ..engine import RequestError
    from ..loader import CheckpointError
    from ..text.chat import ChatError
    from ..text.tokenizer import TokenizerError
    from ..vision.preprocess import ImageError

    return (CLIError, ConfigError, CheckpointError, RequestError, ChatError, TokenizerError, ImageError, OSError,
            json.JSONDecodeError, ValueError)


def run_cli(prog: str, fn, argv) -> int:
    try:
        return fn(argv) or 0
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except known_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2


class CanvasView:
    """Terminal view of the denoising canvas: accepted tokens bright, re-noised ones dim, colour by
    entropy (green: sure, yellow, red: unsure); redrawn in place on a terminal."""

    def __init__(self, tokenizer, stream=sys.stderr):
        self.tok, self.out = tokenizer, stream
        self.tty = stream.isatty()
        self.lines = 0

    def _piece(self, i: int, accepted: bool, h: float) -> str:
        s = self.tok.decode([i]).replace("\n", "⏎") or "·"
        if not self.tty:
            return s if accepted else "░" * max(1, min(len(s), 3))
        color = 32 if h < 0.1 else 33 if h < 1.0 else 31
        style = "1" if accepted else "2"
        return f"\x1b[{style};{color}m{s}\x1b[0m"

    def show(self, ev: DraftEvent) -> None:
        ids, acc, ent = ev.argmax.tolist(), ev.accepted.tolist(), ev.entropy.tolist()
        body = "".join(self._piece(i, a, h) for i, a, h in zip(ids, acc, ent))
        head = (f"canvas {ev.canvas} step {ev.step + 1:2d}  T={ev.temperature:.3f}  accepted {sum(acc):3d}/{len(acc)}"
                f"  mean entropy {sum(ent) / len(ent):.3f}")
        text = f"{head}\n{body}\n"
        if self.tty and self.lines:
            self.out.write(f"\x1b[{self.lines}F\x1b[J")
        self.out.write(text)
        self.out.flush()
        self.lines = text.count("\n") + sum(len(line) // 120 for line in body.split("\n"))

    def committed(self) -> None:
        self.lines = 0


def add_media_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--image", action="append", default=[], help="an image file for the message (repeatable)")
    ap.add_argument("--video", action="append", default=[], help="a video file or animated image (repeatable)")


def media_parts(a) -> list[dict]:
    return [{"type": "image", "image": p} for p in a.image] + [{"type": "video", "video": p} for p in a.video]


def make_engine(tm, compile: bool = False) -> Engine:
    return Engine.from_checkpoint(tm.checkpoint, extra_soft_ids=tm.engine_soft_ids(), compile=compile)


def run_request(engine: Engine, ids: list[int], params: SamplingParams, stream, show_canvas: bool,
                progress: bool = True, on_deltas=None, images=None):
    """Run one request to the end; returns (finish_reason, stats)."""
    view = CanvasView(stream.tok) if show_canvas else None
    rid = engine.add(ids, params, hook=stream, images=images)
    t0, tokens, reason, stats = time.perf_counter(), 0, None, None
    for ev in engine.stream():
        if ev.request_id != rid:
            continue
        if isinstance(ev, DraftEvent):
            if view:
                view.show(ev)
            elif progress and sys.stderr.isatty():
                sys.stderr.write(f"\r[canvas {ev.canvas} step {ev.step + 1}] {tokens} tokens "
                                 f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")
                sys.stderr.flush()
        elif isinstance(ev, CommitEvent):
            tokens += len(ev.token_ids)
            if view:
                view.committed()
            deltas = stream.take()
            if ev.finish_reason is not None:
                reason, stats = ev.finish_reason, ev.stats
                deltas += stream.finish()
            if on_deltas:
                on_deltas(deltas)
    if progress and sys.stderr.isatty() and not view:
        sys.stderr.write("\r\x1b[K")
    return reason, stats
