"""The compiled step runner (`Engine(runner="compiled")`) against the eager step it compiles, and the
commit-only encoder pass (`encode(hidden=False)`) against the full one. fp32, tiny random model
(sliding window 8, canvas 16: every commit crosses the window)."""

import logging

import pytest
import torch

import diffusiongemma as dg
from diffusiongemma.cache import KVView
from diffusiongemma.engine import Engine, SamplingParams
from diffusiongemma.engine.compiled import CompiledStep
from diffusiongemma.sampling.vocab import vocab_pass
from hf_utils import make_hf_model, save_hf


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    hf = make_hf_model(0, logit_gain=8.0, sc_gain=0.1, vision=False)
    return dg.load(save_hf(hf, tmp_path_factory.mktemp("compiled") / "m", generation={"eos_token_id": [1]}))


def _caches_equal(a, b, n_layers):
    assert a.length == b.length and torch.equal(a.positions(0), b.positions(0))
    for i in range(n_layers):
        for x, y in zip(a.layer(i), b.layer(i)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_commit_without_hidden_states_gives_the_same_cache(ck):
    m, n = ck.model, ck.model.config.num_hidden_layers
    full, lean = [m.new_cache(), m.new_cache()], [m.new_cache(), m.new_cache()]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for length in ((5, 11), (16, 16), (16, 3)):  # prompts, then commits past the sliding window
            ids = torch.randint(3, 99, (sum(length),), generator=g)
            assert m.encode(ids, full, lengths=list(length)) is not None
            assert m.encode(ids, lean, lengths=list(length), hidden=False) is None
    for a, b in zip(full, lean):
        _caches_equal(a, b, n)


def test_kv_view_reads_the_cache(ck):
    m = ck.model
    cache = m.new_cache()
    with torch.inference_mode():
        m.encode(torch.arange(3, 40), [cache])
    view = KVView.of(cache)
    for i in range(m.config.num_hidden_layers):
        assert all(torch.equal(x, y) for x, y in zip(view.layer(i), cache.layer(i)))
        assert torch.equal(view.positions(i), cache.positions(i))
        assert view.keys[i].shape[1] > view.lengths[i]  # the cache keeps a spare row (one compiled graph)


@pytest.mark.slow
def test_compiled_step_and_commit_equal_the_eager_ones(ck):
    m = ck.model
    step = CompiledStep(m)
    g = torch.Generator().manual_seed(1)
    caches = [m.new_cache() for _ in range(2)]
    with torch.inference_mode():
        m.encode(torch.randint(3, 99, (9,), generator=g), caches[:1])
        m.encode(torch.randint(3, 99, (21,), generator=g), caches[1:])
        for rnd in range(3):  # decode, then commit; the caches grow past the window
            canvases = torch.randint(3, 99, (32,), generator=g)
            soft = None if rnd == 0 else torch.randn(32, m.config.hidden_size, generator=g)
            temps, uniforms = torch.full((32,), 0.7), torch.rand(32, generator=g, dtype=torch.float64)
            got = step(canvases, soft, caches, [16, 16], temps, uniforms)
            hidden = m.decode(canvases, caches, soft, lengths=[16, 16])
            want = vocab_pass(hidden, m.embed_tokens.weight, m.config.final_logit_softcapping, temps, uniforms, True,
                              m.embed_scale())
            assert torch.equal(got.argmax, want.argmax) and torch.equal(got.sample, want.sample)
            torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-4, atol=1e-4)  # compiler-ordered sums
            torch.testing.assert_close(got.soft, want.soft, rtol=1e-4, atol=1e-4)
            eager = [m.new_cache() for _ in caches]
            for c, e in zip(caches, eager):  # eager copies of the caches, committed by the eager encoder
                for i in range(m.config.num_hidden_layers):
                    e.append(i, *c.layer(i))
                e.advance(torch.arange(c.length))  # positions run from 0
            new = torch.randint(3, 99, (32,), generator=g)
            step.commit(new, caches, [16, 16])
            m.encode(new, eager, lengths=[16, 16], hidden=False)
            for c, e in zip(caches, eager):
                assert c.length == e.length and torch.equal(c.positions(0), e.positions(0))
                for i in range(m.config.num_hidden_layers):
                    for x, y in zip(c.layer(i), e.layer(i)):
                        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert step.failed is None


@pytest.mark.slow
def test_compiled_engine_gives_the_eager_engine_tokens(ck):
    params = [SamplingParams(max_tokens=80, seed=s) for s in range(3)]
    prompts = [[5, 6, 7, 8], [9, 10, 11], list(range(20, 45))]
    eager = Engine.from_checkpoint(ck).generate(prompts, params)
    engine = Engine.from_checkpoint(ck, runner="compiled")
    assert engine.warm_up() > 0
    compiled = engine.generate(prompts, params)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    assert sum(c.stats.commit_forwards for c in compiled) > 3  # commits ran (through the compiled graph)
    assert engine.runner.compiled.failed is None
    with pytest.raises(ValueError, match="unknown step runner 'fast'; choose one of eager, compiled, static"):
        Engine.from_checkpoint(ck, runner="fast")


def test_a_failed_compile_falls_back_to_the_eager_step(ck, caplog):
    eager = Engine.from_checkpoint(ck).generate([[5, 6, 7]], SamplingParams(max_tokens=40, seed=3))[0]
    engine = Engine.from_checkpoint(ck, runner="compiled")

    def broken(*args):
        raise RuntimeError("no C++ compiler\nmore lines")

    engine.runner.compiled._step_graph = engine.runner.compiled._commit_graph = broken
    with caplog.at_level(logging.WARNING):
        out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=40, seed=3))[0]
    assert out.token_ids == eager.token_ids
    assert engine.runner.compiled.failed == "RuntimeError: no C++ compiler"
    assert "running it eagerly" in caplog.text
