"""Pieces the commands share: model and sampler flags (the sampler's mapped onto `engine.SETTINGS`, whose
errors they report as they are), loading, one-line errors, the terminal canvas view, and showing one
request's outputs as they come."""

from __future__ import annotations

import argparse
import json
import sys

from ..engine import SETTINGS, DraftEvent, RequestError, SamplingParams
from ..generation import Generator, OutputOptions, Result
from ..loader import default_model_dir

# command-line flag -> SamplingParams field (help lines and checks come from engine.SETTINGS)
SAMPLER_FLAGS = {"--max-tokens": "max_tokens", "--steps": "max_denoising_steps", "--temperature": "temperature",
                 "--t-max": "t_max", "--t-min": "t_min", "--entropy-bound": "entropy_bound",
                 "--stability": "stability_threshold", "--confidence": "confidence_threshold",
                 "--schedule-steps": "schedule_steps", "--seed": "seed", "--decoding": "decoding",
                 "--ar-temperature": "ar_temperature"}


class CLIError(Exception):
    """An error reported as one line, without a traceback."""


def _int_at_least(s: str, low: int, what: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return v


def positive_int(s: str) -> int:
    return _int_at_least(s, 1, "a positive integer")


def non_negative_int(s: str) -> int:
    return _int_at_least(s, 0, "a non-negative integer")


def add_prefix_args(ap: argparse.ArgumentParser, default_mib: int) -> None:
    ap.add_argument("--prefix-cache-mib", type=non_negative_int, default=default_mib,
                    help="memory for the prefix cache: prompts that begin with tokens already committed (the next "
                         f"turn of a chat, a shared system prompt) reuse their keys and values (default {default_mib}; "
                         "0 turns it off)")
    ap.add_argument("--prefix-block", type=positive_int, default=16, help="tokens per prefix-cache block")


def add_model_args(ap: argparse.ArgumentParser, runner: bool = True,
                   compile_help: str = "compile the denoising step and commit with torch.compile: the first request "
                                       "pays a compile of ~30-90 s, later steps run ~2x faster on a CPU") -> None:
    ap.add_argument("--model", default=None,
                    help="checkpoint directory, or a model id (org/name) in the local Hugging Face cache "
                         "(default: the model shipped in the repo)")
    ap.add_argument("--revision", help="with a model id: the branch, tag or commit in the cache")
    ap.add_argument("--dtype", choices=["auto", "host", "float32", "bfloat16"], default="float32",
                    help="weight dtype (default float32; auto = the checkpoint's; host = float32 or bfloat16, "
                         "whichever this CPU multiplies faster, measured)")
    if runner:
        ap.add_argument("--compile", action="store_true", help=compile_help)
    add_parallel_args(ap)


def add_parallel_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("parallel (launch with torchrun --nproc-per-node N -m diffusiongemma ...)")
    g.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                   help="shard attention heads, MLPs and the vocabulary over N processes (default 1)")
    g.add_argument("--expert-parallel", action="store_true",
                   help="with --tensor-parallel: each process holds a share of whole experts instead of a share "
                        "of every expert")
    g.add_argument("--dist-timeout", type=positive_int, default=120, metavar="S",
                   help="seconds a collective may wait for the other processes before this one stops with an "
                        "error (a rank that died or hangs; default 120)")


def join_group(a):
    """This process's tensor-parallel group (`parallel.init`); ranks other than 0 print nothing to stdout (every
    rank runs the same generation in lock-step, rank 0 reports it)."""
    import os

    from ..parallel import init

    tp = init(getattr(a, "tensor_parallel", 1), getattr(a, "expert_parallel", False),
              timeout_s=float(getattr(a, "dist_timeout", 120)))
    if tp.rank:
        sys.stdout = open(os.devnull, "w")
    return tp


def _setting(name: str):
    def parse(text: str):
        try:
            return SETTINGS[name].parse(text)
        except RequestError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_sampler_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("sampler (defaults: the checkpoint's generation_config.json)")
    for flag, name in SAMPLER_FLAGS.items():
        g.add_argument(flag, dest=name, type=_setting(name), help=SETTINGS[name].help)
    o = ap.add_argument_group("output")
    o.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    o.add_argument("--think", action="store_true", help="thinking mode on")
    o.add_argument("--thinking-budget", type=int, help="cap on reasoning tokens")
    o.add_argument("--show-canvas", action="store_true", help="live view of the canvas as it denoises")


def sampling_params(a) -> SamplingParams:
    return SamplingParams(**{name: getattr(a, name) for name in SAMPLER_FLAGS.values()})


def output_options(a) -> OutputOptions:
    return OutputOptions(stop=tuple(a.stop), thinking_budget=a.thinking_budget, draft=True)


def load_model(a, vision: bool | None = None):
    import diffusiongemma as dg

    return dg.load(a.model or default_model_dir(), dtype=a.dtype, vision=vision, revision=a.revision,
                   tp=join_group(a))


def make_generator(a, ck, **engine_kw) -> Generator:
    if getattr(a, "prefix_cache_mib", 0):
        engine_kw.update(prefix_cache=a.prefix_cache_mib << 20, prefix_block=a.prefix_block)
    return Generator(ck, runner="compiled" if getattr(a, "compile", False) else "eager", **engine_kw)


def known_errors() -> tuple[type[BaseException], ...]:
    from ..config import ConfigError
    from ..loader import CheckpointError
    from ..parallel import CollectiveError
    from ..text.chat import ChatError
    from ..text.tokenizer import TokenizerError
    from ..vision.preprocess import ImageError

    return (CLIError, ConfigError, CheckpointError, RequestError, ChatError, TokenizerError, ImageError, OSError,
            json.JSONDecodeError, ValueError, CollectiveError)


def run_cli(prog: str, fn, argv) -> int:
    from ..parallel import shutdown

    try:
        return fn(argv) or 0
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except known_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        shutdown()


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


class DeltaPrinter:
    """Prints an answer's text deltas on stdout as they arrive: reasoning dimmed on a terminal (with `labels`,
    under [thinking], then the [answer]), tool calls and malformed calls on lines of their own."""

    def __init__(self, labels: bool = False, out=None):
        self.out = out or sys.stdout
        self.tty, self.labels, self.phase = self.out.isatty(), labels, None

    def __call__(self, deltas) -> None:
        w = self.out.write
        for d in deltas:
            if d.kind == "reasoning":
                if self.labels and self.phase is None:
                    w("[thinking] ")
                self.phase = "thinking"
                w(f"\x1b[2m{d.text}\x1b[0m" if self.tty else d.text)
            elif d.kind == "content":
                if self.labels and self.phase == "thinking":
                    w("\n[answer] ")
                self.phase = "answer"
                w(d.text)
            elif d.kind == "tool_call":
                w(f"\n[tool call] {d.call.name}({d.call.arguments_json()})\n")
            else:
                w(f"\n[invalid tool call: {d.error}]\n")
        self.out.flush()


def add_media_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--image", action="append", default=[], help="an image file for the message (repeatable)")
    ap.add_argument("--video", action="append", default=[], help="a video file or animated image (repeatable)")


def media_parts(a) -> list[dict]:
    return [{"type": "image", "image": p} for p in a.image] + [{"type": "video", "video": p} for p in a.video]


def run_request(gen: Generator, prompt, params: SamplingParams, options: OutputOptions, show_canvas: bool,
                on_deltas=None) -> Result:
    """Run one request to the end, showing its canvas (or a progress bar on a terminal) and handing its text
    deltas to `on_deltas` as they commit; returns its Result."""
    view = CanvasView(gen.tokenizer) if show_canvas else None
    bar = _progress() if not view else None
    try:
        for out in gen.stream(prompt, params, options):
            if isinstance(out, DraftEvent):
                if view:
                    view.show(out)
                    if out.finished_denoising:
                        view.committed()
                elif bar is not None:
                    bar.set_description(f"canvas {out.canvas} step {out.step + 1}", refresh=False)
                    bar.update(out.committed_tokens - bar.n)
            elif isinstance(out, Result):
                return out
            elif on_deltas:
                on_deltas([out])
    finally:
        if bar is not None:
            bar.close()
    raise CLIError("generation ended without a result")


def _progress():
    """A transient tqdm bar of committed tokens on a terminal (None elsewhere, or without tqdm)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit="tok", leave=False, dynamic_ncols=True, file=sys.stderr)
