"""`quantization_config` in config.json: which weights are quantized, and how.

Two standards are read:
- compressed-tensors (`quant_method: compressed-tensors`, what llm-compressor writes and vLLM reads):
  `config_groups` of `targets` (a module name, `re:` + a regex matched at the start of the name, or a module
  class: `Linear`, `Embedding`) with weight arguments (`type` int|float, `num_bits`, `strategy`
  channel|group|block|tensor, `group_size`, `block_structure`, `symmetric`), `ignore`, and a `format`
  (pack-quantized, float-quantized, int-quantized/naive-quantized, or mixed-precision with one per group).
- block FP8 releases (`quant_method: fp8`, `weight_block_size`), whose weights carry `weight_scale_inv`.
Anything else is refused with the field and value named. Activations are never quantized here: a scheme that
asks for dynamic activation quantization runs weight-only (a static one, with stored activation scales, is
refused).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .codec import WeightScheme

FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized", "mixed-precision")


class QuantConfigError(ValueError):
    """A quantization_config this runtime does not support (the message names the field and value)."""


@dataclass(frozen=True)
class Group:
    name: str
    targets: tuple[str, ...]
    scheme: WeightScheme
    format: str


def _match(name: str, kind: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == kind


@dataclass(frozen=True)
class QuantPlan:
    method: str
    groups: tuple[Group, ...] = ()
    ignore: tuple[str, ...] = ()
    block: tuple[int, int] | None = None  # quant_method fp8

    def scheme(self, name: str, kind: str = "Linear") -> Group | None:
        """The group quantizing module `name` (its checkpoint name, e.g. model.decoder.layers.0.mlp.up_proj) of
        class `kind` (Linear, Embedding), or None when it stays in full precision."""
        if any(_match(name, kind, t) for t in self.ignore):
            return None
        if self.method == "fp8":
            return Group("fp8", (), WeightScheme("float", 8, block=self.block), "float-quantized") \
                if kind == "Linear" else None
        # compressed-tensors' precedence: an exact name, then regexes (in sorted order), then a class name
        pairs = [(t, g) for g in self.groups for t in g.targets]
        exact = [g for t, g in pairs if t == name]
        regex = [g for t, g in sorted(pairs, key=lambda p: p[0]) if t.startswith("re:") and _match(name, kind, t)]
        cls = [g for t, g in pairs if not t.startswith("re:") and t == kind]
        found = exact + regex + cls
        return found[0] if found else None

    @classmethod
    def parse(cls, qc) -> QuantPlan:
        field = "quantization_config"
        if not isinstance(qc, dict):
            raise QuantConfigError(f"{field} must be a JSON object, not {type(qc).__name__}")
        method = qc.get("quant_method")
        if method == "fp8":
            return cls._parse_fp8(qc)
        if method != "compressed-tensors":
            raise QuantConfigError(f"{field}.quant_method {method!r} is not supported (compressed-tensors and fp8 are)")
        status = qc.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise QuantConfigError(f"{field}.quantization_status {status!r} is not supported (compressed is)")
        if qc.get("kv_cache_scheme") is not None:
            raise QuantConfigError(f"{field}.kv_cache_scheme {qc['kv_cache_scheme']!r}: a quantized KV cache is not "
                                   "supported")
        if qc.get("sparsity_config"):
            raise QuantConfigError(f"{field}.sparsity_config: sparse checkpoints are not supported")
        top = qc.get("format", "pack-quantized")
        if top not in FORMATS:
            raise QuantConfigError(f"{field}.format {top!r} is not supported (one of {', '.join(FORMATS)})")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise QuantConfigError(f"{field}.config_groups must be a non-empty object")
        ignore = qc.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
            raise QuantConfigError(f"{field}.ignore must be a list of strings")
        parsed = tuple(cls._parse_group(f"{field}.config_groups.{name}", name, g, top) for name, g in groups.items())
        return cls("compressed-tensors", parsed, tuple(ignore))

    @staticmethod
    def _parse_group(where: str, name: str, g, top: str) -> Group:
        if not isinstance(g, dict):
            raise QuantConfigError(f"{where} must be an object")
        targets = g.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise QuantConfigError(f"{where}.targets must be a non-empty list of strings")
        for key in ("input_activations", "output_activations"):
            act = g.get(key)
            if act is not None and not (isinstance(act, dict) and act.get("dynamic") in (True, "local")):
                raise QuantConfigError(f"{where}.{key}: static activation quantization is not supported "
                                       "(weight-only, or dynamic activations run weight-only)")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise QuantConfigError(f"{where}.weights must be an object (weight-only quantization)")
        kind, bits = w.get("type", "int"), w.get("num_bits")
        strategy, symmetric = w.get("strategy", "tensor"), w.get("symmetric", True)
        fmt = g.get("format") or (top if top != "mixed-precision" else None)
        if kind not in ("int", "float"):
            raise QuantConfigError(f"{where}.weights.type {kind!r} is not supported (int and float are)")
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in ((4, 8) if kind == "int" else (8,)):
            raise QuantConfigError(f"{where}.weights.num_bits {bits!r} is not supported for type {kind} "
                                   f"({'4 and 8' if kind == 'int' else '8 (FP8 e4m3)'})")
        if w.get("actorder") not in (None, False, "static", "group", "weight"):
            raise QuantConfigError(f"{where}.weights.actorder {w.get('actorder')!r} is not supported")
        if not isinstance(symmetric, bool) or (kind == "float" and not symmetric):
            raise QuantConfigError(f"{where}.weights.symmetric {symmetric!r} is not supported for type {kind}")
        group_size, block = None, None
        if strategy == "group":
            group_size = w.get("group_size")
            if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
                raise QuantConfigError(f"{where}.weights.group_size {group_size!r} must be a positive integer")
        elif strategy == "block":
            block = w.get("block_structure")
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise QuantConfigError(f"{where}.weights.block_structure {block!r} must be two positive integers")
            block = tuple(block)
            if kind != "float":
                raise QuantConfigError(f"{where}.weights.strategy block is supported for FP8 only")
        elif strategy not in ("channel", "tensor"):
            raise QuantConfigError(f"{where}.weights.strategy {strategy!r} is not supported "
                                   "(channel, group, block, tensor are)")
        if fmt is None:
            fmt = "float-quantized" if kind == "float" else "pack-quantized"
        if fmt not in FORMATS[:4]:
            raise QuantConfigError(f"{where}.format {fmt!r} is not supported")
        if (fmt == "float-quantized") != (kind == "float"):
            raise QuantConfigError(f"{where}.format {fmt!r} does not store {kind} weights")
        return Group(name, tuple(targets), WeightScheme(kind, bits, group_size, symmetric, block), fmt)

    @classmethod
    def _parse_fp8(cls, qc: dict) -> QuantPlan:
        field = "quantization_config"
        if qc.get("fmt", "e4m3") != "e4m3":
            raise QuantConfigError(f"{field}.fmt {qc.get('fmt')!r} is not supported (e4m3 is)")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise QuantConfigError(f"{field}.activation_scheme {qc.get('activation_scheme')!r} is not supported "
                                   "(dynamic, run weight-only)")
        block = qc.get("weight_block_size")
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(isinstance(b, int) and b > 0 for b in block)):
            raise QuantConfigError(f"{field}.weight_block_size {block!r} must be two positive integers")
        ignore = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
        return cls("fp8", (), tuple(f"re:.*{re.escape(m)}.*" for m in ignore), tuple(block) if block else None)
