"""The compute dtype chosen by measurement (`loader.host`): the decision, the loader's "host" dtype and its one
warning where bf16 is slow, the trainer's warning."""

import logging

import pytest
import torch

import diffusiongemma as dg
from diffusiongemma.loader import host

SLOW = {"float32": 84.0, "bfloat16": 1.9}  # a 2-core AVX2-only AMD EPYC (docs/performance.md §9)
FAST = {"float32": 118.0, "bfloat16": 300.0}  # an AVX512-BF16 host


@pytest.fixture
def rates(monkeypatch):
    def use(r):
        monkeypatch.setattr(host, "matmul_rates", lambda *a, **k: dict(r))
        monkeypatch.setattr(host, "_warned", False)
    return use


def test_the_measured_rates_are_real_and_the_choice_follows_them():
    r = host.matmul_rates()
    assert set(r) == {"float32", "bfloat16"} and all(v > 0 for v in r.values())
    want = torch.float32 if r["float32"] > host.TIE * r["bfloat16"] else torch.bfloat16
    assert host.preferred_dtype() == want
    assert (host.slow_bf16_note() is None) == (r["float32"] < host.SLOW * r["bfloat16"])
    assert isinstance(host.cpu_capability(), str) and host.cpu_capability()


def test_the_decision_on_a_slow_and_a_fast_bf16_host(rates):
    rates(SLOW)
    assert host.preferred_dtype() == torch.float32
    note = host.slow_bf16_note()
    assert "1.9 GFLOP/s" in note and "84 for float32" in note and "~44x faster" in note
    rates(FAST)
    assert host.preferred_dtype() == torch.bfloat16 and host.slow_bf16_note() is None
    rates({"float32": 100.0, "bfloat16": 95.0})  # a tie goes to bf16 (half the memory), and is not "slow"
    assert host.preferred_dtype() == torch.bfloat16 and host.slow_bf16_note() is None


def test_load_in_host_dtype_and_one_warning_for_slow_bf16(rates, tiny_text_model_dir, caplog):
    caplog.set_level(logging.WARNING, logger="diffusiongemma.loader.host")
    rates(SLOW)
    assert dg.load(tiny_text_model_dir, dtype="host").model.dtype == torch.float32
    assert not caplog.records  # float32: nothing to say
    for _ in range(2):
        assert dg.load(tiny_text_model_dir, dtype="bfloat16").model.dtype == torch.bfloat16
    (rec,) = caplog.records  # once per process
    assert "loading model in bfloat16" in rec.getMessage() and "GFLOP/s" in rec.getMessage()
    rates(FAST)
    caplog.clear()
    assert dg.load(tiny_text_model_dir, dtype="host").model.dtype == torch.bfloat16
    dg.load(tiny_text_model_dir, dtype="bfloat16")
    assert not caplog.records
    with pytest.raises(dg.CheckpointError, match="unknown dtype 'int3'; choose one of .*'host'"):
        dg.load(tiny_text_model_dir, dtype="int3")


def test_quantized_weights_keep_their_activation_dtype_under_host(rates, tiny_text_model_dir, tmp_path):
    """Their packed kernels are fast with bf16 activations even where a dense bf16 product is slow (§9)."""
    from diffusiongemma.loader.write_quantized import Recipe, quantize_checkpoint

    out = quantize_checkpoint(tiny_text_model_dir, tmp_path / "int8", Recipe.named("int8"), dtype="bfloat16")
    rates(SLOW)
    assert dg.load(out, dtype="host").model.embed_tokens.weight.dtype == torch.bfloat16


def test_training_in_bf16_where_it_is_slow_says_so(rates, caplog):
    from diffusiongemma.config import GenerationConfig
    from diffusiongemma.training.objective import ObjectiveConfig
    from diffusiongemma.training.trainer import TrainConfig, Trainer
    from test_training import SortData, tiny_setup

    caplog.set_level(logging.WARNING, logger="diffusiongemma.loader.host")
    rates(SLOW)
    model, config = tiny_setup()
    for dtype in ("float32", "bfloat16"):
        Trainer(model, config, GenerationConfig(eos_token_id=(1, 106)), SortData(), ObjectiveConfig(8),
                TrainConfig(steps=1, batch_size=2, dtype=dtype, progress=False), "unused", 1, 0)
        assert len(caplog.records) == (dtype == "bfloat16")
    assert "training with bfloat16 autocast" in caplog.records[0].getMessage()
