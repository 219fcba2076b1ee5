"""Checkpoint loading: layouts the release uses, and errors that name the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusiongemma as dg
from diffusiongemma.config import release_config
from diffusiongemma.loader import build_text_model, vision_shapes
from hf_utils import make_hf_model, save_hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    hf = make_hf_model(0)
    save_hf(hf, path, generation={"eos_token_id": [1, 106, 50]})
    return hf, path


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_release_layout_with_vision_tensors(saved):
    hf, path = saved
    ck = dg.load(path)
    assert ck.model.dtype == torch.float32
    assert ck.generation_config.eos_token_id == (1, 106, 50)
    assert ck.generation_config.max_denoising_steps == 48 and ck.generation_config.entropy_bound == 0.1
    assert len(ck.vision_keys) > 0 and all(k.startswith("model.encoder.") for k in ck.vision_keys)
    # one set of weights: decoder and encoder share, the LM head is the embedding
    torch.testing.assert_close(ck.model.embed_tokens.weight, hf.lm_head.weight)
    assert not any(p.is_meta for p in ck.model.parameters())
    assert not any(b.is_meta for b in ck.model.buffers())


def test_dtype_choice(saved):
    _, path = saved
    assert dg.load(path, dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(dg.CheckpointError, match="unknown dtype"):
        dg.load(path, dtype="float8")


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model(1, hidden_size=64)
    hf.generation_config.max_new_tokens = 256
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = dg.load(tmp_path / "sharded").model
    torch.testing.assert_close(model.layers[1].experts.down_proj, hf.model.decoder.layers[1].experts.down_proj)


def _rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_missing_tensor_is_named(saved, tmp_path):
    path = copy_dir(saved[1], tmp_path / "c")
    _rewrite(path, lambda t: t.pop("model.decoder.layers.1.router.per_expert_scale"))
    with pytest.raises(dg.CheckpointError, match=r"missing tensor\(s\) model\.decoder\.layers\.1\.router\.per_expert_scale"):
        dg.load(path)


def test_wrong_shape_names_key_and_shapes(saved, tmp_path):
    path = copy_dir(saved[1], tmp_path / "c")
    _rewrite(path, lambda t: t.update({"model.decoder.layers.0.self_attn.q_proj.weight": torch.zeros(8, 32)}))
    with pytest.raises(dg.CheckpointError,
                       match=r"model\.decoder\.layers\.0\.self_attn\.q_proj\.weight has shape \[8, 32\], expected \[16, 32\]"):
        dg.load(path)


def test_unexpected_tensor(saved, tmp_path):
    path = copy_dir(saved[1], tmp_path / "c")
    _rewrite(path, lambda t: t.update({"model.decoder.layers.1.self_attn.v_proj.weight": torch.zeros(16, 32)}))
    with pytest.raises(dg.CheckpointError, match=r"unexpected tensor\(s\) model\.decoder\.layers\.1\.self_attn\.v_proj"):
        dg.load(path)


def test_untied_copy_must_match(saved, tmp_path):
    path = copy_dir(saved[1], tmp_path / "c")
    _rewrite(path, lambda t: t.update({"lm_head.weight": t["model.decoder.embed_tokens.weight"].clone()}))
    dg.load(path)  # an equal copy of a shared weight is fine
    _rewrite(path, lambda t: t.update({"lm_head.weight": torch.zeros_like(t["lm_head.weight"])}))
    with pytest.raises(dg.CheckpointError, match="lm_head.weight differs"):
        dg.load(path)


def test_not_safetensors(saved, tmp_path):
    path = copy_dir(saved[1], tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(dg.CheckpointError, match="not a readable safetensors file"):
        dg.load(path)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(dg.CheckpointError, match="does not exist"):
        dg.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dg.ConfigError, match="config.json does not exist"):
        dg.load(tmp_path / "empty")


def test_wrong_model_type(saved, tmp_path):
    path = copy_dir(saved[1], tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gemma4"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(dg.ConfigError, match="model_type.*'gemma4'.*expected 'diffusion_gemma'"):
        dg.load(path)


def test_vision_tensors_without_vision_config(saved, tmp_path):
    path = copy_dir(saved[1], tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["vision_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(dg.CheckpointError, match="vision tower but config.json has no vision_config"):
        dg.load(path)


def test_text_only_checkpoint(saved, tmp_path):
    """A checkpoint without any vision tower (config or tensors) loads for text."""
    path = copy_dir(saved[1], tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["vision_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    _rewrite(path, lambda t: [t.pop(k) for k in list(t) if k.startswith(("model.encoder.vision", "model.encoder.embed"))])
    ck = dg.load(path)
    assert ck.vision_keys == () and ck.config.vision is None


def test_save_roundtrip_loads_in_reference(saved, tmp_path):
    """Our writer produces a directory the reference loads with identical weights."""
    from transformers import DiffusionGemmaForBlockDiffusion

    ck = dg.load(saved[1])
    vision = {k: v for k, v in load_file(str(saved[1] / "model.safetensors")).items() if k in ck.vision_keys}
    dg.save(ck.model, ck.config, ck.generation_config, tmp_path / "out", extra_tensors=vision)
    again = DiffusionGemmaForBlockDiffusion.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    for (k, a), b in zip(saved[0].state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert dg.load(tmp_path / "out").generation_config == ck.generation_config


def _count(params):
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def test_release_config_builds_on_meta_with_the_release_parameter_count():
    """25.2B text + ~0.55B vision: our meta build against the reference's meta build."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    rc = release_config()
    ours = build_text_model(rc, device="meta")
    assert all(p.is_meta for p in ours.parameters())
    text = _count(ours.parameters())

    hf_cfg = DiffusionGemmaConfig(text_config=rc.text.to_dict(), vision_config=rc.vision.to_dict())
    with torch.device("meta"):
        ref = DiffusionGemmaForBlockDiffusion(hf_cfg)
    ref_vision = _count(list(ref.model.encoder.vision_tower.parameters()) +
                        list(ref.model.encoder.embed_vision.parameters()))
    ref_text = _count(ref.parameters()) - ref_vision
    assert text == ref_text
    assert 25.0e9 < text < 25.5e9
    # std_bias / std_scale are buffers in the reference, not parameters
    vision = sum(torch.Size(s).numel() for k, s in vision_shapes(rc.vision, rc.text.hidden_size).items()
                 if not k.endswith(("std_bias", "std_scale")))
    assert vision == ref_vision
    assert 0.5e9 < vision < 0.6e9
