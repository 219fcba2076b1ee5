"""Quantized checkpoints: quantize -> save -> load round trips, checkpoints written by others (the compressed-tensors
compressor itself; a block-FP8 release with weight_scale_inv), errors that name the tensor or the config field,
and the quantize command."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusiongemma as dg
from diffusiongemma.loader.random_weights import write_random_checkpoint
from diffusiongemma.loader.write_quantized import Recipe, quantize_checkpoint
from diffusiongemma.quant.codec import (
    dequantize_fp8,
    dequantize_int,
    quantize_fp8,
    quantize_int,
)
from diffusiongemma.quant.experts import QuantExperts
from diffusiongemma.quant.linear import QuantLinear
from quant_utils import logits

CHECKPOINT_SCHEMES = ["int8", "int4", "fp8", "mixed"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("qtiny") / "m", "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {s: quantize_checkpoint(tiny, root / s, Recipe.named(s, group_size=32), dtype="float32")
            for s in CHECKPOINT_SCHEMES}


@pytest.mark.parametrize("scheme", CHECKPOINT_SCHEMES)
def test_quantize_save_load_round_trip(tiny, quantized, scheme):
    """Every quantized weight loads as exactly the codec's dequantization of the original weight, the rest of the
    model is the original, and the config says what was done."""
    base = dg.load(tiny, dtype="float32").model
    ck = dg.load(quantized[scheme], dtype="float32")
    recipe = Recipe.named(scheme, group_size=32)
    cfg = json.loads((quantized[scheme] / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["quantization_status"] == "compressed"
    counted = 0
    for name, mod in ck.model.named_modules():
        if isinstance(mod, QuantLinear):
            w = base.get_submodule(name).weight
            kind = "linear"
        elif isinstance(mod, QuantExperts):
            orig = base.get_submodule(name)
            for e in range(mod.num_experts):
                for part, w in (("gate_up", orig.gate_up_proj[e]), ("down", orig.down_proj[e])):
                    s = recipe.experts
                    want = _codec_roundtrip(w, s)
                    if part == "gate_up":  # gate and up are quantized apart and joined
                        want = torch.cat([_codec_roundtrip(h, s) for h in w.chunk(2)])
                    torch.testing.assert_close(mod.matrix(part, e).dequantize(torch.float32), want, rtol=0, atol=0)
                    counted += 1
            continue
        else:
            continue
        torch.testing.assert_close(mod.matrix.dequantize(torch.float32), _codec_roundtrip(w, getattr(recipe, kind)),
                                   rtol=0, atol=0)
        counted += 1
    emb = ck.model.embed_tokens
    torch.testing.assert_close(emb.weight[0:512], _codec_roundtrip(base.embed_tokens.weight, recipe.embedding),
                               rtol=0, atol=0)
    assert counted > 20
    for (n, p), (n2, p2) in zip(base.layers[0].router.named_parameters(), ck.model.layers[0].router.named_parameters()):
        assert n == n2 and torch.equal(p, p2)  # the router stays in full precision


def _codec_roundtrip(w, scheme):
    if scheme.kind == "float":
        return dequantize_fp8(*quantize_fp8(w, scheme.block), scheme.block)
    return dequantize_int(*quantize_int(w, scheme))


def _mirror(model):
    """nn.Linear modules named as the checkpoint names them (experts one Linear per expert), holding the float
    model's weights: what llm-compressor hands the compressed-tensors compressor."""
    from torch import nn

    root = nn.Module()

    def put(path, weight):
        parts, m = path.split("."), root
        for p in parts[:-1]:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        lin.weight.data.copy_(weight)
        m.add_module(parts[-1], lin)

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):  # the routers too: the recipe ignores them, and the config says so
            put("model.decoder." + name, mod.weight)
        elif hasattr(mod, "gate_up_proj"):
            for e in range(mod.num_experts):
                gate, up = mod.gate_up_proj[e].chunk(2)
                put(f"model.decoder.{name}.{e}.gate_proj", gate)
                put(f"model.decoder.{name}.{e}.up_proj", up)
                put(f"model.decoder.{name}.{e}.down_proj", mod.down_proj[e])
    return root


def test_a_checkpoint_written_by_the_compressed_tensors_compressor_loads(tiny, tmp_path):
    """int4 groups (symmetric) on the experts and int8 channels with zero points (asymmetric) on every other
    Linear, written by compressed-tensors' own ModelCompressor; loaded, its logits are those of the float model
    holding the library's own fake-quantized weights."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    base = dg.load(tiny, dtype="float32")
    mirror = _mirror(base.model)
    config = QuantizationConfig(config_groups={
        "experts": QuantizationScheme(targets=[r"re:.*experts\.\d+\..*"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)),
        "rest": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="int", symmetric=False, strategy="channel"))},
        ignore=[r"re:.*router\.proj$"])  # as MoE recipes leave the router in full precision
    apply_quantization_config(mirror, config)
    fake = {}
    for name, m in mirror.named_modules():
        if hasattr(m, "weight_scale"):
            args, w = m.quantization_scheme.weights, m.weight.data
            grouped = w.reshape(w.shape[0], -1, args.group_size or w.shape[1])
            scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
            m.weight_zero_point.data.copy_(zero.reshape(m.weight_zero_point.shape))
            fake[name] = fake_quantize(w, m.weight_scale, m.weight_zero_point, args)
    compressor = ModelCompressor.from_pretrained_model(mirror)
    compressor.compress_model(mirror)
    written = {k: v.contiguous() for k, v in mirror.state_dict().items() if "router" not in k}
    assert any(k.endswith("weight_zero_point") for k in written)  # the asymmetric group really is asymmetric
    src = load_file(str(tiny / "model.safetensors"))
    rest = {k: v for k, v in src.items() if not (k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj")
                                                 or k.removesuffix(".weight") in fake)}
    out = tmp_path / "ct"
    out.mkdir()
    save_file({**rest, **written}, str(out / "model.safetensors"))
    for f in ("config.json", "generation_config.json"):
        (out / f).write_text((tiny / f).read_text())
    compressor.update_config(str(out))
    loaded = dg.load(out, dtype="float32").model
    assert isinstance(loaded.layers[0].experts, QuantExperts)
    assert isinstance(loaded.layers[0].self_attn.q_proj, QuantLinear)

    reference = base.model  # the float model with the library's fake-quantized weights
    with torch.no_grad():
        for name, w in fake.items():
            path = name.removeprefix("model.decoder.")
            if ".experts." in path:
                layer, e, part = path.rsplit(".", 2)
                experts = reference.get_submodule(layer)
                i = experts.intermediate
                if part == "down_proj":
                    experts.down_proj[int(e)].copy_(w)
                else:
                    experts.gate_up_proj[int(e)][(slice(0, i) if part == "gate_proj" else slice(i, 2 * i))].copy_(w)
            else:
                reference.get_submodule(path).weight.copy_(w)
    torch.testing.assert_close(logits(loaded), logits(reference), atol=2e-4, rtol=1e-4)


def test_a_block_fp8_release_with_weight_scale_inv_loads(tiny, tmp_path):
    """As block-FP8 releases ship: quant_method fp8, weight_block_size, each Linear an e4m3 `weight` with
    `weight_scale_inv` per block, experts one Linear per expert, the router left in full precision."""
    base = dg.load(tiny, dtype="float32")
    src = load_file(str(tiny / "model.safetensors"))
    block = (32, 32)
    out, dq = {}, {}

    def fp8(name, w):
        values, scale = quantize_fp8(w, block)
        out[f"{name}.weight"], out[f"{name}.weight_scale_inv"] = values, scale
        return dequantize_fp8(values, scale, block)

    for k, v in src.items():
        name = k.removesuffix(".weight")
        if k.endswith("experts.gate_up_proj"):
            base_name = k.removesuffix(".gate_up_proj")
            dq[k] = torch.stack([torch.cat([fp8(f"{base_name}.{e}.{p}", h) for p, h in zip(("gate_proj", "up_proj"),
                                                                                            v[e].chunk(2))])
                                 for e in range(v.shape[0])])
        elif k.endswith("experts.down_proj"):
            dq[k] = torch.stack([fp8(f"{k.removesuffix('.down_proj')}.{e}.down_proj", v[e]) for e in range(v.shape[0])])
        elif v.ndim == 2 and "embed_tokens" not in k and "router" not in k and k.startswith("model.decoder."):
            dq[k] = fp8(name, v)
        else:
            out[k] = v
    d = tmp_path / "fp8"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"))
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (d / "config.json").write_text(json.dumps(cfg))
    loaded = dg.load(d, dtype="float32").model
    assert isinstance(loaded.layers[0].mlp.up_proj, QuantLinear) and loaded.layers[0].mlp.up_proj.scheme.block == block
    assert isinstance(loaded.layers[0].router.proj, torch.nn.Linear)
    reference = base.model
    state = {k.removeprefix("model.decoder."): v for k, v in dq.items()}
    with torch.no_grad():
        for k, v in state.items():
            reference.get_parameter(k).copy_(v)
    torch.testing.assert_close(logits(loaded), logits(reference), atol=2e-4, rtol=1e-4)


def _rewrite(src, dst, edit):
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    for f in ("config.json", "generation_config.json"):
        (dst / f).write_text((src / f).read_text())
    return dst


def test_corrupt_or_mismatched_tensors_are_named(quantized, tmp_path):
    key = "model.decoder.layers.1.mlp.up_proj"
    src = quantized["int4"]

    def wrong_scale(t):
        t[f"{key}.weight_scale"] = t[f"{key}.weight_scale"][:, :1].contiguous()

    with pytest.raises(dg.CheckpointError, match=rf"{key}.weight_scale has shape \[128, 1\], expected \[128, 2\]"):
        dg.load(_rewrite(src, tmp_path / "a", wrong_scale))

    def no_packed(t):
        del t[f"{key}.weight_packed"]

    with pytest.raises(dg.CheckpointError, match=rf"missing tensor {key}.weight_packed"):
        dg.load(_rewrite(src, tmp_path / "b", no_packed))

    def short_packed(t):
        t[f"{key}.weight_packed"] = t[f"{key}.weight_packed"][:, :-1].contiguous()

    with pytest.raises(dg.CheckpointError, match=rf"{key}.weight_packed \[128, 7\].*int32 words cannot hold 64"):
        dg.load(_rewrite(src, tmp_path / "c", short_packed))

    def wrong_shape(t):
        t[f"{key}.weight_shape"] = torch.tensor([128, 32])

    with pytest.raises(dg.CheckpointError, match=rf"{key}.weight_shape says \[128, 32\], expected \[128, 64\]"):
        dg.load(_rewrite(src, tmp_path / "d", wrong_shape))


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(quant_method="awq"), "quant_method 'awq' is not supported"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3), "group_0.weights.num_bits 3"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor_group"), "strategy 'tensor_group'"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    (lambda q: q.update(format="marlin-24"), "format 'marlin-24'"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "dynamic": False}),
     "group_0.input_activations: static activation quantization"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=0), "group_size 0"),
])
def test_unsupported_quantization_configs_name_the_field(quantized, tmp_path, edit, message):
    d = _rewrite(quantized["int4"], tmp_path / "m", lambda t: None)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(dg.CheckpointError, match=message):
        dg.load(d)


def test_a_stored_lm_head_copy_is_dropped_when_the_embedding_is_quantized(tiny, tmp_path):
    src = _rewrite(tiny, tmp_path / "src", lambda t: t.update({"lm_head.weight": t["model.decoder.embed_tokens.weight"].clone()}))
    out = quantize_checkpoint(src, tmp_path / "q", Recipe.named("int8"), dtype="float32")
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    dg.load(out)  # loads: the tied head is the quantized embedding
    kept = quantize_checkpoint(src, tmp_path / "k", Recipe.named("int8", embedding="keep"), dtype="float32")
    assert "lm_head.weight" in load_file(str(kept / "model.safetensors"))
    dg.load(kept)


def test_the_quantize_command(tiny, tmp_path, capsys):
    from diffusiongemma.cli import main

    assert main(["quantize", str(tiny), str(tmp_path / "bad"), "--group-size", "128"]) == 2
    err = capsys.readouterr().err
    assert "group size 128 does not divide 32" in err and "experts.0.down_proj" in err and "--group-size 32" in err
    assert main(["quantize", str(tiny), str(tmp_path / "ok")]) == 0  # the group size fitted to the model: 32
    assert "int4 groups of 32" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["group_size"] for g in cfg["config_groups"].values()} == {32, None}
    assert isinstance(dg.load(tmp_path / "ok").model.layers[0].experts, QuantExperts)
    assert main(["quantize", str(tmp_path / "ok"), str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err


