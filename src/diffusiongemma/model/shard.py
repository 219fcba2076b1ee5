"""Which slice of each text-model tensor a tensor-parallel rank holds, and the model rebuilt to those shapes.

Megatron-style, one all-reduce per block:
- attention: q/k/v projections split by head (column-parallel), o_proj by its input columns (row-parallel);
  key/value heads split with the query heads, or, where there are fewer of them than ranks, the one each
  rank's query heads read (replicated). The KV cache of a rank holds its heads only.
- the dense MLP and the self-conditioning MLP: gate/up by intermediate row, down by intermediate column;
- the experts: expert parallel gives each rank a contiguous share of whole experts; otherwise every rank holds
  every expert's share of the intermediate dimension. The router runs on every rank (it is replicated);
- the tied embedding / LM head: vocabulary-parallel, rows [r V/N, (r+1) V/N).
Norms, layer scalars, the router and rotary tables are replicated. The dense MLP's and the MoE's partial
outputs are summed in one all-reduce per layer (in the activation dtype, before their separate post-norms),
attention's in one.

`slices(name, ...)` is the rule; `shard_text_model` applies it to a model built on the meta device (module
attributes and parameter shapes), and the loader reads exactly those slices from the memory-mapped files.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..config import TextConfig
from ..parallel import TensorParallel, check_shapes, kv_share, split

# A rule: the dimension split, and the [start, stop) pieces along it (concatenated in order).
Rule = tuple[int, list[tuple[int, int]]]

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def slices(name: str, config: TextConfig, tp: TensorParallel) -> Rule | None:
    """The slice of state-dict tensor `name` rank `tp.rank` holds (None: the whole tensor, replicated)."""
    if tp.size == 1:
        return None
    r, n = tp.rank, tp.size
    if name == "embed_tokens.weight":
        return 0, [split(config.vocab_size, n, r)]
    mlp = re.match(r"^(?:layers\.\d+\.mlp|self_conditioning)\.(gate_proj|up_proj|down_proj)\.weight$", name)
    if mlp:
        a, b = split(config.intermediate_size, n, r)
        return (1 if mlp.group(1) == "down_proj" else 0), [(a, b)]
    m = _LAYER.match(name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    hd = config.layer_head_dim(layer)
    if rest in ("self_attn.q_proj.weight", "self_attn.o_proj.weight"):
        a, b = split(config.num_attention_heads, n, r)
        return (0 if rest.startswith("self_attn.q") else 1), [(a * hd, b * hd)]
    if rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        a, b = kv_share(config.num_attention_heads, config.layer_kv_heads(layer), n, r)
        return 0, [(a * hd, b * hd)]
    if rest in ("experts.gate_up_proj", "experts.down_proj"):
        if tp.expert_parallel:
            return 0, [split(config.num_experts, n, r)]
        i = config.moe_intermediate_size
        a, b = split(i, n, r)
        return (1, [(a, b), (i + a, i + b)]) if rest == "experts.gate_up_proj" else (2, [(a, b)])
    return None


def local_shape(shape: tuple[int, ...], rule: Rule | None) -> tuple[int, ...]:
    if rule is None:
        return tuple(shape)
    dim, pieces = rule
    out = list(shape)
    out[dim] = sum(b - a for a, b in pieces)
    return tuple(out)


def read_slice(get_slice, shape: tuple[int, ...], rule: Rule | None) -> torch.Tensor:
    """The rank's part of one stored tensor: `get_slice` is a safetensors slice (indexable without reading the
    rest of the tensor), `shape` the stored shape."""
    if rule is None:
        return get_slice[tuple(slice(None) for _ in shape)] if shape else get_slice[:]
    dim, pieces = rule
    parts = [get_slice[tuple(slice(a, b) if d == dim else slice(None) for d in range(len(shape)))]
             for a, b in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def cache_config(config: TextConfig, tp: TensorParallel) -> TextConfig:
    """The config a rank's KV caches are shaped by: its key/value heads per layer."""
    if tp.size == 1:
        return config
    kv = {}
    for i in range(config.num_hidden_layers):
        a, b = kv_share(config.num_attention_heads, config.layer_kv_heads(i), tp.size, tp.rank)
        kv[i] = b - a
    per_layer = {i: {**o, "num_key_value_heads": kv[i]} for i, o in config.per_layer_config.items()}
    sliding = [i for i in range(config.num_hidden_layers) if i not in per_layer]
    base = kv[sliding[0]] if sliding else config.num_key_value_heads
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // tp.size,
                               num_key_value_heads=base, per_layer_config=per_layer)


def _resize(module: nn.Module, attr: str, shape: tuple[int, ...]) -> None:
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                       requires_grad=old.requires_grad))


def shard_text_model(model, tp: TensorParallel) -> None:
    """Give a `DiffusionGemmaText` (on the meta device, before its weights are assigned) this rank's shapes and
    the group its blocks reduce over. Checks the shapes divide first (`parallel.check_shapes`)."""
    config = model.config
    check_shapes(config, tp.size, tp.expert_parallel)
    if tp.size == 1:
        return
    for name, p in list(model.named_parameters()):
        rule = slices(name, config, tp)
        if rule is not None:
            owner, _, attr = name.rpartition(".")
            _resize(model.get_submodule(owner), attr, local_shape(tuple(p.shape), rule))
    model.tp = tp
    model.vocab_start = split(config.vocab_size, tp.size, tp.rank)[0]
    model.embed_tokens.num_embeddings = config.vocab_size // tp.size
    model.cache_config = cache_config(config, tp)
    model.self_conditioning.tp = tp
    for i, layer in enumerate(model.layers):
        layer.tp = tp
        att = layer.self_attn
        att.heads = config.num_attention_heads // tp.size
        a, b = kv_share(config.num_attention_heads, config.layer_kv_heads(i), tp.size, tp.rank)
        att.kv_heads = b - a
        att.tp = tp
        ex = layer.experts
        ex.tp = tp
        if tp.expert_parallel:
            ex.num_experts = config.num_experts // tp.size
            ex.first = split(config.num_experts, tp.size, tp.rank)[0]
        else:
            ex.intermediate = config.moe_intermediate_size // tp.size
