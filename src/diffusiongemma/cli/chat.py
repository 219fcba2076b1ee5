"""`diffusiongemma chat`: an interactive session that keeps the conversation's history.

Commands: /think on|off, /image PATH, /video PATH (attached to the next message), /reset, /quit (or Ctrl-D)."""

from __future__ import annotations

import argparse
import sys

from .common import (
    add_media_args,
    add_model_args,
    add_sampler_args,
    load_text_model,
    make_engine,
    media_parts,
    run_cli,
    run_request,
    sampling_params,
)


def _main(argv) -> int:
    from ..text.stream import TextStream

    ap = argparse.ArgumentParser(prog="diffusiongemma chat", description=__doc__.split("\n\n")[0])
    ap.add_argument("--system", help="system prompt")
    add_media_args(ap)
    add_model_args(ap)
    add_sampler_args(ap)
    a = ap.parse_args(argv)
    tm = load_text_model(a)
    engine = make_engine(tm, a.compile)
    pending_media = media_parts(a)  # images given on the command line go with the first message
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    thinking = a.think
    tty = sys.stdout.isatty()
    print(f"chatting with {tm.name} (thinking {'on' if thinking else 'off'}; /think on|off, /reset, /quit)",
          file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = history[:1] if a.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        if line.startswith("/think"):
            thinking = line.split()[-1] != "off"
            print(f"(thinking {'on' if thinking else 'off'})", file=sys.stderr)
            continue
        if line.startswith("/image ") or line.startswith("/video "):
            kind, path = line.split(" ", 1)
            pending_media.append({"type": kind[1:], kind[1:]: path.strip()})
            print(f"({kind[1:]} attached to the next message)", file=sys.stderr)
            continue
        content = pending_media + [{"type": "text", "text": line}] if pending_media else line
        pending_media = []
        history.append({"role": "user", "content": content})
        stream = TextStream(tm.tokenizer, a.stop, a.thinking_budget)
        printer = _Printer(tty)
        try:
            ids, images = tm.chat_inputs(history, thinking=thinking)
        except ValueError as e:  # a bad image: report it and drop the message, keep chatting
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        reason, stats = run_request(engine, ids, sampling_params(a, draft=True), stream, a.show_canvas,
                                    on_deltas=printer, images=images)
        sys.stdout.write("\n")
        print(f"[{reason}: {stats.completion_tokens} tokens, {stats.tokens_per_forward:.1f} tokens/forward, "
              f"{stats.total_s:.1f} s]", file=sys.stderr)
        history.append({"role": "assistant", "content": stream.content,
                        **({"tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                           for c in stream.calls]} if stream.calls else {})})
    return 0


class _Printer:
    """Prints one answer as it arrives: reasoning dimmed under [thinking], then the [answer]."""

    def __init__(self, tty: bool):
        self.tty, self.phase = tty, None

    def __call__(self, deltas) -> None:
        for d in deltas:
            if d.kind == "reasoning":
                if self.phase is None:
                    sys.stdout.write("[thinking] ")
                    self.phase = "thinking"
                sys.stdout.write(f"\x1b[2m{d.text}\x1b[0m" if self.tty else d.text)
            elif d.kind == "content":
                if self.phase == "thinking":
                    sys.stdout.write("\n[answer] ")
                self.phase = "answer"
                sys.stdout.write(d.text)
            elif d.kind == "tool_call":
                sys.stdout.write(f"\n[tool call] {d.call.name}({d.call.arguments_json()})")
        sys.stdout.flush()


def main(argv=None) -> int:
    return run_cli("diffusiongemma chat", _main, argv)
