"""`diffusiongemma quantize SRC DST`: weight-only quantization of a checkpoint into the compressed-tensors format
(what vLLM and llm-compressor read), tensor by tensor: neither checkpoint is ever whole in memory."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    from ..config import ConfigError, ModelConfig
    from ..loader import CheckpointError, resolve
    from ..loader.write_quantized import SCHEMES, Recipe, auto_group_size, config_in_dims, quantize_checkpoint

    ap = argparse.ArgumentParser(prog="diffusiongemma quantize", description=__doc__)
    ap.add_argument("src", help="full-precision checkpoint directory (or a model id in the local Hugging Face cache)")
    ap.add_argument("dst", help="directory to write (its old weights are replaced)")
    ap.add_argument("--scheme", choices=SCHEMES, default="mixed",
                    help="int8: per channel; int4: groups of --group-size; fp8: e4m3 per channel; mixed (default): "
                         "experts int4, attention, dense and self-conditioning MLPs and the embedding int8")
    ap.add_argument("--group-size", type=int, default=None, help="int4 group size (default: the largest of 128, 64, "
                    "32 dividing every weight's input dimension; 32-256 use the packed int4 kernel)")
    ap.add_argument("--embedding", choices=["keep", "int8", "int4", "fp8"], default=None,
                    help="the tied embedding / LM head's scheme (default: the scheme's; keep = full precision, "
                         "for loaders that do not read a quantized embedding)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="activation dtype recorded in config.json, and the scales' dtype (default bfloat16)")
    a = ap.parse_args(argv)
    if a.group_size is not None and a.group_size <= 0:
        ap.error("--group-size must be positive")
    t0 = time.perf_counter()
    try:
        src = resolve(a.src)
        group = a.group_size or auto_group_size(config_in_dims(ModelConfig.from_file(src / "config.json")))
        recipe = Recipe.named(a.scheme, group, a.embedding)
        out = quantize_checkpoint(src, a.dst, recipe, a.dtype)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"diffusiongemma quantize: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    print(f"wrote {a.scheme} weights (int4 groups of {group}) to {out} ({size / 2**20:.1f} MiB of weights, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0
