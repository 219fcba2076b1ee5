"""`diffusiongemma` command line: a thin dispatcher; each command lives in its own module with a main()."""

from __future__ import annotations

import sys

COMMANDS = {
    "generate": ("diffusiongemma.cli.generate", "generate text from a prompt or chat messages"),
    "chat": ("diffusiongemma.cli.chat", "interactive chat with history"),
    "serve": ("diffusiongemma.cli.serve", "OpenAI-compatible server with a browser view of the canvas"),
    "bench": ("diffusiongemma.bench.run", "benchmark against the reference implementation"),
    "train": ("diffusiongemma.cli.train", "train or fine-tune a model"),
    "eval": ("diffusiongemma.cli.eval", "evaluate a model on held-out task families"),
    "quantize": ("diffusiongemma.cli.quantize", "quantize a checkpoint's weights (int8, int4, fp8, mixed)"),
    "random-checkpoint": ("diffusiongemma.cli.random_checkpoint", "write a random checkpoint of a named size"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: diffusiongemma COMMAND [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:18} {help_}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffusiongemma: unknown command {name!r} (try --help)", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0
