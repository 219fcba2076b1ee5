"""Quantized weights: the encodings against the compressed-tensors library, every kernel against the dequantized
reference, quantize -> save -> load round trips, per-scheme logit error bounds, checkpoints written by others
(the compressed-tensors compressor itself; a block-FP8 release with weight_scale_inv), errors that name the
tensor, and quantized modules under the engine's step runners."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusiongemma as dg
from diffusiongemma.engine import Engine, SamplingParams
from diffusiongemma.loader.random_weights import write_random_checkpoint
from diffusiongemma.loader.write_quantized import Recipe, quantize_checkpoint
from diffusiongemma.quant.codec import (
    FP8,
    INT8,
    WeightScheme,
    dequantize_fp8,
    dequantize_int,
    int4,
    pack_int32,
    quantize_fp8,
    quantize_int,
    unpack_int32,
)
from diffusiongemma.quant.experts import QuantExperts
from diffusiongemma.quant.linear import QuantLinear, QuantMatrix

CHECKPOINT_SCHEMES = ["int8", "int4", "fp8", "mixed"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("qtiny") / "m", "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {s: quantize_checkpoint(tiny, root / s, Recipe.named(s, group_size=32), dtype="float32")
            for s in CHECKPOINT_SCHEMES}


def _logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=g)
    cache = model.new_cache()
    with torch.no_grad():
        model.encode(ids[:24], [cache])
        return model.logits(model.decode(ids[24:], [cache]))


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors_packing(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    for shape in [(5, 37), (3, 64), (2, 4, 40)]:
        q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g, dtype=torch.int8)
        ours = pack_int32(q, bits)
        assert torch.equal(ours, pack_to_int32(q, bits))
        assert torch.equal(unpack_int32(ours, bits, shape[-1]), q)
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape)), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,kernel", [(INT8, True), (int4(32), True), (int4(64), True), (int4(32), False),
                                           (FP8, True), (WeightScheme("float", 8, block=(32, 32)), True)])
def test_every_kernel_equals_the_dequantized_reference(scheme, kernel, dtype):
    """Each layout's matmul, at every row count the kernels switch on, against x @ W^T with W dequantized from the
    codes by the codec (not by the module): the packed kernels read what was stored."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 192, generator=g) * 0.02
    if scheme.kind == "float":
        values, scale = quantize_fp8(w, scheme.block)
        want_w = dequantize_fp8(values, scale, scheme.block)
    else:
        q, scale = quantize_int(w, scheme)
        want_w = dequantize_int(q, scale)
    m = QuantMatrix.quantize(w, scheme, dtype, kernel=kernel)
    if scheme.bits == 4 and kernel:
        assert "packed" in m.t  # tinygemm's layout
    torch.testing.assert_close(m.dequantize(torch.float32), want_w, rtol=0, atol=0 if dtype == torch.float32 else
                               want_w.abs().max().item() / 64)
    for rows in (1, 4, 16, 17, 300):
        x = torch.randn(rows, 192, generator=g).to(dtype)
        want = x.float() @ want_w.t()
        got = m.matmul(x)
        assert got.dtype == dtype and got.shape == (rows, 96)
        bound = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got.float() - want).abs().max().item() <= bound * want.abs().max().item(), (rows, scheme.name)


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


# relative RMS logit error of one decoder step of the shipped (trained) model, measured 0.0054 int8, 0.049 int4,
# 0.0099 fp8, 0.0084 mixed; a random model is chaotic (0.55% noise on its weights moves its logits by 25%), so
# the bounds are held on the trained one. `python -m diffusiongemma.bench.quant` reports the mid size.
BOUNDS = {"int8": 0.012, "int4": 0.1, "fp8": 0.02, "mixed": 0.017}


@pytest.mark.parametrize("scheme", CHECKPOINT_SCHEMES)
def test_logit_error_is_within_the_schemes_bound(shipped_model_dir, tmp_path, scheme):
    out = quantize_checkpoint(shipped_model_dir, tmp_path / scheme, Recipe.named(scheme, group_size=32),
                              dtype="float32")
    want = _logits(dg.load(shipped_model_dir, dtype="float32", vision=False, text=False).model)
    got = _logits(dg.load(out, dtype="float32", vision=False, text=False).model)
    rel = ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    assert 0 < rel < BOUNDS[scheme], rel


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
    torch.testing.assert_close(_logits(loaded), _logits(reference), atol=2e-4, rtol=1e-4)


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
    torch.testing.assert_close(_logits(loaded), _logits(reference), atol=2e-4, rtol=1e-4)


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


@pytest.fixture(scope="module")
def damped_mixed(shipped_model_dir, tmp_path_factory):
    """The shipped model (trained, so peaked: an ulp does not flip its samples, as it does a random model's)
    quantized `mixed`: tinygemm int4 experts, int8 elsewhere."""
    out = quantize_checkpoint(shipped_model_dir, tmp_path_factory.mktemp("shipped") / "mixed",
                              Recipe.named("mixed", group_size=32), dtype="float32")
    return dg.load(out, dtype="float32", vision=False)


def test_quantized_modules_under_the_static_runner(damped_mixed):
    ck = damped_mixed
    assert isinstance(ck.model.layers[0].experts, QuantExperts) and "packed" in ck.model.layers[0].experts.matrix(
        "gate_up", 0).t
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    params = [SamplingParams(max_tokens=40, seed=s) for s in (21, 22, 23)]
    eager = Engine.from_checkpoint(ck, max_batch=2, batch_invariant=False).generate(prompts, params)
    static = Engine.from_checkpoint(ck, max_batch=2, runner="static", max_context=128).generate(prompts, params)
    assert [c.token_ids for c in static] == [c.token_ids for c in eager]
    assert all(len(c.token_ids) > 0 for c in eager)


@pytest.mark.slow
def test_quantized_modules_under_the_compiled_runner(damped_mixed):
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = [SamplingParams(max_tokens=40, seed=s) for s in (1, 2)]
    eager = Engine.from_checkpoint(damped_mixed).generate(prompts, params)
    compiled = Engine.from_checkpoint(damped_mixed, runner="compiled").generate(prompts, params)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [INT8, int4(128), FP8])
def test_gpu_kernels_equal_the_dequantized_reference(scheme):
    """On CUDA: tinygemm int4 (`_weight_int4pack_mm`), int8 cast-and-matmul, FP8 through `torch._scaled_mm` with
    the activations quantized per row (its bound is the activation rounding, ~2^-4 relative)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 1024, generator=g) * 0.02
    if scheme.kind == "float":
        want_w = dequantize_fp8(*quantize_fp8(w))
    else:
        want_w = dequantize_int(*quantize_int(w, scheme))
    m = QuantMatrix.quantize(w.cuda(), scheme, torch.bfloat16)
    for rows in (1, 16, 256):
        x = torch.randn(rows, 1024, generator=g).bfloat16()
        want = x.float() @ want_w.t()
        got = m.matmul(x.cuda()).float().cpu()
        bound = 0.08 if scheme.kind == "float" else 2e-2
        assert (got - want).abs().max().item() <= bound * want.abs().max().item(), (rows, scheme.name)


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


def test_the_release_bench_path_on_the_tiny_size(tmp_path, capsys):
    """`bench --size S --quant Q`: written directly quantized (cached), measured in a fresh process through the
    engine; the release size runs the same code (README figures)."""
    from types import SimpleNamespace

    from diffusiongemma.bench.release import run

    assert run(SimpleNamespace(size="tiny", quant="mixed", group_size=None, steps=1, profile=False), tmp_path) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["release"]
    assert res["tokens"] == res["canvas"] == 32 and res["steps"] == [1]
    assert res["peak_rss"] >= res["rss_after_load"] > 0 and res["s_per_step"] > 0 and res["s_commit"] > 0
    ck = dg.load(tmp_path / "random-tiny-mixed-g32")
    assert isinstance(ck.model.layers[0].experts, QuantExperts)
    assert isinstance(ck.model.layers[0].self_attn.q_proj, QuantLinear)


def test_int4_weights_packed_for_one_device_refuse_another():
    """tinygemm's CPU and CUDA layouts differ: a module moved across (here: marked as packed for CUDA) raises instead
    of computing garbage."""
    m = QuantLinear(QuantMatrix.quantize(torch.randn(64, 128) * 0.02, int4(32), torch.float32))
    x = torch.randn(3, 128)
    assert m(x).shape == (3, 64)
    m.matrix.layout = "cuda"
    with pytest.raises(RuntimeError, match="packed for cuda cannot run on cpu"):
        m(x)
