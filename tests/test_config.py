"""Configuration files: the reference's field names and defaults, and errors that name field and file."""

import json

import pytest

from diffusiongemma.config import ConfigError, GenerationConfig, ModelConfig, TextConfig
from hf_utils import hf_config


def write(tmp_path, d, name="config.json"):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


def base():
    return hf_config().to_dict()


def test_reads_reference_config_with_per_layer_geometry():
    cfg = ModelConfig.from_dict(base())
    t = cfg.text
    assert cfg.canvas_length == 16 and cfg.image_token_id == 4
    assert t.layer_types == ("sliding_attention", "full_attention")
    assert (t.layer_head_dim(0), t.layer_kv_heads(0)) == (8, 2)
    assert (t.layer_head_dim(1), t.layer_kv_heads(1)) == (16, 1)
    assert t.layer_has_v_proj(0) and not t.layer_has_v_proj(1)
    assert t.rope_parameters["full_attention"].rope_type == "proportional"
    assert t.rope_parameters["full_attention"].partial_rotary_factor == 0.25
    assert cfg.vision is not None and cfg.vision.patch_size == 5


def test_global_head_dim_form_matches_reference_post_init():
    d = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=6, num_attention_heads=2,
             num_key_value_heads=2, head_dim=4, num_experts=2, top_k_experts=1, moe_intermediate_size=4,
             global_head_dim=8, num_global_key_value_heads=1)
    t = TextConfig.from_dict(d)
    assert t.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (t.layer_head_dim(5), t.layer_kv_heads(5)) == (8, 1)
    assert t.sliding_window == 512  # the reference's default when absent


def test_unknown_keys_are_ignored():
    d = base()
    d["something_new"] = 1
    d["text_config"]["another_new_field"] = [1, 2]
    assert ModelConfig.from_dict(d) == ModelConfig.from_dict(base())


def test_missing_required_field_names_field_and_file(tmp_path):
    d = base()
    del d["text_config"]["hidden_size"]
    p = write(tmp_path, d)
    with pytest.raises(ConfigError, match=r"missing required field 'text_config.hidden_size' in .*config.json"):
        ModelConfig.from_file(p)


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d["text_config"].update(layer_types=["sliding_attention"] * 3), "has 3 entries but"),
    (lambda d: d["text_config"].update(top_k_experts=9), "top_k_experts' .*exceeds"),
    (lambda d: d["text_config"].update(num_key_value_heads=3), "not a multiple"),
    (lambda d: d["text_config"].update(hidden_size="32"), "must be int"),
    (lambda d: d["text_config"].update(hidden_activation="relu"), "hidden_activation"),
    (lambda d: d["text_config"]["rope_parameters"].pop("full_attention"), "rope_parameters.full_attention"),
    (lambda d: d["text_config"].update(per_layer_config={"7": {"head_dim": 4}}), "out of range"),
    (lambda d: d.update(tie_word_embeddings=False), "untied"),
    (lambda d: d.update(canvas_length=0), "canvas_length"),
])
def test_contradictions_are_errors(tmp_path, mutate, msg):
    d = base()
    mutate(d)
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_file(write(tmp_path, d))


def test_bad_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(p)


def test_generation_config_reads_release_file(tmp_path):
    d = {"max_new_tokens": 256, "max_denoising_steps": 48,
         "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
         "t_max": 0.8, "t_min": 0.4, "stability_threshold": 1, "confidence_threshold": 0.005,
         "eos_token_id": [1, 106, 50], "pad_token_id": 0, "return_dict_in_generate": True,
         "transformers_version": "5.23.0"}
    g = GenerationConfig.from_file(write(tmp_path, d, "generation_config.json"))
    assert g.eos_token_id == (1, 106, 50) and g.entropy_bound == 0.1 and g.t_max == 0.8
    assert GenerationConfig.from_dict(g.to_dict()) == g


def test_generation_config_defaults_are_the_reference_defaults():
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    ref = DiffusionGemmaGenerationConfig._get_default_generation_params()
    g = GenerationConfig.from_dict({})
    for k in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
              "confidence_threshold"):
        assert getattr(g, k) == ref[k], k
    assert g.entropy_bound == ref["sampler_config"].entropy_bound


@pytest.mark.parametrize("field,value,msg", [
    ("t_max", 0.3, "t_max.*greater than t_min"),
    ("max_denoising_steps", 0, "max_denoising_steps.*> 0"),
    ("confidence_threshold", -1.0, "confidence_threshold"),
    ("eos_token_id", "x", "eos_token_id"),
])
def test_generation_config_bad_values_name_field_and_file(tmp_path, field, value, msg):
    p = write(tmp_path, {field: value}, "generation_config.json")
    with pytest.raises(ConfigError, match=msg) as e:
        GenerationConfig.from_file(p)
    assert "generation_config.json" in str(e.value)
