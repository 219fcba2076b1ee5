"""Write a random checkpoint of a named size in the release layout (no download needed)."""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    from ..loader.random_weights import SIZES, write_random_checkpoint

    ap = argparse.ArgumentParser(prog="diffusiongemma random-checkpoint", description=__doc__)
    ap.add_argument("path", help="directory to write")
    ap.add_argument("--size", choices=list(SIZES), default="tiny", help="named size (default: tiny)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weight dtype")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed")
    a = ap.parse_args(argv)
    write_random_checkpoint(a.path, a.size, getattr(torch, a.dtype), a.seed)
    print(f"wrote a random {a.size} checkpoint to {a.path}")
    return 0
