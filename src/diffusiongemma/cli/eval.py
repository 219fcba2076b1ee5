"""`diffusiongemma eval`: held-out evaluation of a model on the task families, with the default sampler.

Per family (items from evaluation seeds never used in training): exact-match accuracy of the answer,
tokens per forward and steps per canvas; for `tools`, the valid-tool-call rate and the exact match of
the answer given the tool's result; and the held-out loss on the text corpus. Prints one table and one
JSON line (`training.evaluate`)."""

from __future__ import annotations

import argparse
import json

from .common import add_model_args, load_model, positive_int, run_cli


def _main(argv) -> int:
    from ..engine.params import DECODING
    from ..training import tasks
    from ..training.evaluate import evaluate, format_side_by_side, format_table
    from ..training.vision_tasks import QUESTION_TYPES

    ap = argparse.ArgumentParser(prog="diffusiongemma eval", description=__doc__.split("\n\n")[0])
    add_model_args(ap, runner=False)
    ap.add_argument("--n", type=positive_int, default=50, help="held-out items per family")
    ap.add_argument("--families", default=",".join(tasks.EVAL_FAMILIES),
                    help="comma-separated families; NAME/heldout: phrased with the held-out templates and lengths "
                    "(default: every family both ways, and the image questions when the model has a vision tower)")
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (items and sampling)")
    ap.add_argument("--decoding", default="diffusion",
                    help=f"decoding mode, or several comma-separated for a side-by-side table ({', '.join(DECODING)})")
    a = ap.parse_args(argv)
    modes = [m for m in a.decoding.split(",") if m]
    if not modes or set(modes) - set(DECODING):
        ap.error(f"--decoding takes {', '.join(DECODING)} (comma-separated), got {a.decoding!r}")
    fams = [f for f in a.families.split(",") if f]
    bad = set(fams) - set(tasks.EVAL_FAMILIES) - {f"image_{q}" for q in QUESTION_TYPES}
    if bad:
        ap.error(f"unknown families: {sorted(bad)}")
    ck = load_model(a)
    by_mode = {}
    for i, mode in enumerate(modes):
        by_mode[mode] = res = evaluate(ck, a.n, fams, a.seed, decoding=mode, text_items=64 if i == 0 else 0)
        print(f"decoding: {mode}")
        print(format_table(res))
    if len(modes) > 1:
        print(format_side_by_side(by_mode))
    out = {"eval": by_mode[modes[0]], "model": str(ck.path), "decoding": modes[0]}
    if len(modes) > 1:
        out["by_decoding"] = by_mode
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    return run_cli("diffusiongemma eval", _main, argv)
