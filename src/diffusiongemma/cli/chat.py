"""`diffusiongemma chat`: an interactive session that keeps the conversation's history.

Commands: /think on|off, /image PATH, /video PATH (attached to the next message), /reset, /quit (or Ctrl-D)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    DeltaPrinter,
    add_media_args,
    add_model_args,
    add_prefix_args,
    add_sampler_args,
    load_model,
    make_generator,
    media_parts,
    output_options,
    run_cli,
    run_request,
    sampling_params,
)

CARD = "tasks.json"  # what a checkpoint was trained to do, beside its weights (the shipped model has one)


def describe(path: Path) -> str | None:
    """The checkpoint's own account of what it knows (`tasks.json`: {"families": [{"name", "does", "example"}]}),
    as lines for the user; None when it has none. A malformed card is named, never fatal."""
    f = Path(path) / CARD
    if not f.is_file():
        return None
    try:
        fams = json.loads(f.read_text())["families"]
        lines = [f"  {x['name']}: {x['does']} (try: {x['example']})" for x in fams]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"({f} is unreadable: {type(e).__name__}: {e})"
    return "this model was trained on these tasks and knows little else:\n" + "\n".join(lines)


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="diffusiongemma chat", description=__doc__.split("\n\n")[0])
    ap.add_argument("--system", help="system prompt")
    add_media_args(ap)
    add_model_args(ap)
    add_prefix_args(ap, 256)
    add_sampler_args(ap)
    a = ap.parse_args(argv)
    params, options = sampling_params(a), output_options(a)
    gen = make_generator(a, load_model(a))
    pending_media = media_parts(a)  # images given on the command line go with the first message
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    thinking = a.think
    print(f"chatting with {gen.checkpoint.name} (thinking {'on' if thinking else 'off'}; /think on|off, /reset, /quit)",
          file=sys.stderr)
    if (known := describe(gen.checkpoint.path)) is not None:
        print(known, file=sys.stderr)
    while True:
        line = _read_line(gen.checkpoint.model.tp)
        if line is None:
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
        printer = DeltaPrinter(labels=True)
        try:
            prompt = gen.chat(history, thinking=thinking)
        except ValueError as e:  # a bad image: report it and drop the message, keep chatting
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        res = run_request(gen, prompt, params, options, a.show_canvas, on_deltas=printer)
        stats = res.stats
        sys.stdout.write("\n")
        print(f"[{res.finish_reason}: {stats.completion_tokens} tokens, {stats.tokens_per_forward:.1f} tokens/forward, "
              f"{stats.total_s:.1f} s]", file=sys.stderr)
        history.append({"role": "assistant", "content": res.content,
                        **({"tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                           for c in res.tool_calls]} if res.tool_calls else {})})
    return 0


def _read_line(tp) -> str | None:
    """The user's next line (None at the end of input). Tensor parallel: rank 0 reads it, every rank gets it (they
    all run this loop, in step)."""
    line = None
    if tp.rank == 0:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            pass
    return tp.broadcast_object(line, "control")


def main(argv=None) -> int:
    return run_cli("diffusiongemma chat", _main, argv)
