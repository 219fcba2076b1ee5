"""Decoding modes: `autoregressive` (the causal encoder alone) and `speculative` (each denoised canvas verified
by the encoder at its commit). Lossless: greedy speculative output is the greedy autoregressive output, and
sampled speculative output is distributed as autoregressive sampling (a goodness-of-fit test)."""

import math
import tempfile
from pathlib import Path

import pytest
import torch

import diffusiongemma as dg
from diffusiongemma.engine import DraftEvent, Engine, RequestError, SamplingParams
from diffusiongemma.generation import Generator, OutputOptions

STOPS = [1, 2, 3]



def test_truncate_takes_tokens_back_on_every_layer_kind(pair):
    """A cache that committed a canvas and took part of it back is the cache that committed only the kept
    part: the same positions, and keys and values on sliding (window 8, passed) and full layers (up to the
    rounding of a 16-row against a 5-row matrix product)."""
    _, ck = pair
    m, n = ck.model, ck.model.config.num_hidden_layers
    spare, plain = m.new_cache(spare=16), m.new_cache()
    g = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(7, 99, (20,), generator=g), torch.randint(7, 99, (16,), generator=g)
    with torch.inference_mode():
        for c in (spare, plain):
            m.encode(prompt, [c])
        m.encode(canvas, [spare])
        spare.truncate(11)
        m.encode(canvas[:5], [plain])
        assert spare.length == plain.length == 25 and spare.next_position == plain.next_position
        for i in range(n):
            assert torch.equal(spare.positions(i), plain.positions(i))
            for x, y in zip(spare.layer(i), plain.layer(i)):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        assert spare.layer(0)[0].shape[1] == 7  # a sliding layer shows window - 1 tokens
        nxt = torch.randint(7, 99, (16,), generator=g)
        torch.testing.assert_close(m.decode(nxt, [spare]), m.decode(nxt, [plain]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot take back 17"):
        spare.truncate(17)


@pytest.mark.usefixtures("one_thread")
def test_greedy_speculative_equals_greedy_autoregressive(pair):
    _, ck = pair
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [20, 21]]
    free = Engine.from_checkpoint(ck).generate(prompts[2:3], SamplingParams(max_tokens=60, decoding="autoregressive",
                                                                           stop_token_ids=()))[0].token_ids
    stop = next(t for i, t in enumerate(free) if i >= 5 and t not in free[:i])  # a stop id inside a canvas
    for seed in range(2):
        sp = dict(max_tokens=60, seed=seed, stop_token_ids=(stop,))
        ar = Engine.from_checkpoint(ck, max_batch=4).generate(prompts, SamplingParams(decoding="autoregressive", **sp))
        for steps in (None, 3):  # the default (one denoising step per canvas) and a longer draft
            spec = Engine.from_checkpoint(ck, max_batch=4).generate(
                prompts, SamplingParams(decoding="speculative", max_denoising_steps=steps, **sp))
            assert [s.token_ids for s in spec] == [a.token_ids for a in ar]
            assert [s.finish_reason for s in spec] == [a.finish_reason for a in ar]
            assert all(len(s.stats.accepted_per_canvas) == len(s.stats.steps_per_canvas) for s in spec)
    assert ar[2].finish_reason == "stop" and ar[2].token_ids[-1] == stop and len(ar[2].token_ids) % 16 != 0
    assert max(len(a.token_ids) for a in ar) > 2 * 16  # several canvases
    assert all(a.stats.commit_forwards == len(a.token_ids) for a in ar)  # one encoder pass per token
    assert all(a.stats.decoder_forwards == 0 for a in ar)


def test_greedy_speculative_on_the_shipped_model_is_its_autoregressive_output_in_fewer_passes(shipped_model_dir):
    from diffusiongemma.training import tasks

    gen = Generator(dg.load(shipped_model_dir, dtype="float32"))
    exs = [tasks.make_example(f, tasks.EVAL_SEEDS.start + 50_000 + i) for f in ("arithmetic", "sort") for i in range(4)]
    prompts = [gen.chat(e.turns[0].messages, e.turns[0].tools, e.turns[0].thinking) for e in exs]
    ar = gen.run(prompts, SamplingParams(max_tokens=128, seed=0, decoding="autoregressive"))
    spec = gen.run(prompts, SamplingParams(max_tokens=128, seed=0, decoding="speculative"))
    assert [s.token_ids for s in spec] == [a.token_ids for a in ar]
    assert [s.content for s in spec] == [a.content for a in ar]
    assert max(len(s.stats.steps_per_canvas) for s in spec) > 4  # long answers: many verified canvases
    passes = lambda rs: sum(r.stats.decoder_forwards + r.stats.commit_forwards for r in rs)  # noqa: E731
    assert passes(spec) < passes(ar)
    assert sum(a for s in spec for a in s.stats.accepted_per_canvas) > len(spec)  # drafts were accepted


@pytest.mark.usefixtures("one_thread")
def test_autoregressive_decoding_is_transformers_encoder_as_a_causal_lm(pair):
    """Each token is the argmax of the reference encoder's logits over the whole prefix (run without a
    cache), and our verifier's logits at each step equal the reference's to 1e-5."""
    hf, ck = pair
    from transformers import DynamicCache

    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # longer than the sliding window (8)
    out = Engine.from_checkpoint(ck).generate([prompt], SamplingParams(max_tokens=20, seed=0, decoding="autoregressive",
                                                                        stop_token_ids=()))[0]
    seq = list(prompt)
    with torch.no_grad():
        for token in out.token_ids:
            ids = torch.tensor([seq])
            cache = DynamicCache(config=hf.config.text_config)
            pos = torch.arange(len(seq))[None]
            masks = hf.model.encoder.create_masks_for_generate(
                config=hf.config, inputs_embeds=torch.empty(1, len(seq), 0), attention_mask=torch.ones_like(ids).bool(),
                past_key_values=cache, position_ids=pos)
            h = hf.model.encoder(input_ids=ids, attention_mask=masks, past_key_values=cache,
                                 position_ids=pos).last_hidden_state[0, -1]
            cap = hf.config.text_config.final_logit_softcapping
            want = torch.tanh(hf.lm_head(h) / cap) * cap
            got = ck.model.logits(ck.model.encode(ids[0], [ck.model.new_cache()])[-1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert token == int(want.argmax())
            seq.append(token)


def test_modes_mix_in_one_batch(pair):
    _, ck = pair
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    params = [SamplingParams(max_tokens=40, seed=s, decoding=d)
              for s, d in zip((1, 2, 3), ("diffusion", "speculative", "autoregressive"))]
    alone = [Engine.from_checkpoint(ck).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    together = Engine.from_checkpoint(ck, max_batch=3).generate(prompts, params)
    assert [c.token_ids for c in together] == alone
    assert together[0].stats.accepted_per_canvas == [] and together[1].stats.accepted_per_canvas


@pytest.mark.parametrize("decoding", ["speculative", "autoregressive"])
def test_text_features_in_every_mode(tiny_text_model_dir, decoding):
    """max_tokens exact, stop strings, the thinking budget and draft frames through the generator."""
    gen = Generator(dg.load(tiny_text_model_dir, dtype="float32"))
    base = dict(seed=3, decoding=decoding, stop_token_ids=())
    r = gen.run([gen.text("Once upon a time")], SamplingParams(max_tokens=37, **base))[0]
    assert len(r.token_ids) == 37 and r.finish_reason == "length"
    stop = r.content[4:7]
    cut = gen.run([gen.text("Once upon a time")], SamplingParams(max_tokens=37, **base), OutputOptions(stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.content == r.content[:r.content.find(stop)]
    think = gen.chat([{"role": "user", "content": "Hi"}], thinking=True)
    t = gen.run([think], SamplingParams(max_tokens=40, **base), OutputOptions(thinking_budget=3))[0]
    assert len(gen.tokenizer.encode(t.reasoning)) <= 4
    outs = list(gen.stream(gen.text("Once"), SamplingParams(max_tokens=20, **base), OutputOptions(draft=True)))
    drafts = [o for o in outs if isinstance(o, DraftEvent)]
    assert len(drafts) == outs[-1].stats.decoder_forwards and (drafts if decoding == "speculative" else True)


def test_compiled_and_static_runners_verify_alike(pair):
    _, ck = pair
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    params = [SamplingParams(max_tokens=48, seed=s, decoding="speculative", max_denoising_steps=2) for s in (4, 5)]
    params.append(SamplingParams(max_tokens=20, seed=6, decoding="autoregressive"))
    eager = Engine.from_checkpoint(ck, max_batch=3, batch_invariant=False).generate(prompts, params)
    static = Engine.from_checkpoint(ck, max_batch=3, runner="static", max_context=128).generate(prompts, params)
    assert [c.token_ids for c in static] == [c.token_ids for c in eager]


@pytest.mark.slow
def test_compiled_runner_verifies_alike(pair):
    _, ck = pair
    params = [SamplingParams(max_tokens=48, seed=s, decoding="speculative", max_denoising_steps=2) for s in (4, 5)]
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    eager = Engine.from_checkpoint(ck).generate(prompts, params)
    engine = Engine.from_checkpoint(ck, runner="compiled")
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in eager]
    assert engine.runner.compiled.failed is None


def test_decoding_settings_are_checked():
    with pytest.raises(RequestError, match="decoding must be one of diffusion, speculative, autoregressive") as e:
        SamplingParams(decoding="fast")
    assert e.value.param == "decoding"
    with pytest.raises(RequestError, match="ar_temperature must be a number >= 0") as e:
        SamplingParams(ar_temperature=-1)
    assert e.value.param == "ar_temperature"
    with pytest.raises(RequestError, match="initial_canvas"):
        SamplingParams(decoding="autoregressive", initial_canvas=(1, 2))
    gen = dg.GenerationConfig()
    assert SamplingParams(decoding="speculative").resolve(gen, 0).max_denoising_steps == 1  # a one-step draft
    assert SamplingParams(decoding="speculative", max_denoising_steps=9).resolve(gen, 0).max_denoising_steps == 9
    assert SamplingParams().resolve(gen, 0).decoding == "diffusion"


# -- sampled speculative decoding: the distribution of autoregressive sampling --------------------------

VOCAB, CANVAS, TOKENS, SAMPLES = 10, 2, 3, 3000


@pytest.fixture(scope="module")
def small_vocab_model():
    """A random model with 10 tokens and a 2-token canvas: 3 generated tokens cross a canvas boundary, so a
    draft is accepted or corrected, a bonus token drawn, and the next canvas starts pinned."""
    from diffusiongemma.config import GenerationConfig, ModelConfig, TextConfig
    from diffusiongemma.loader.random_weights import random_model, size_config

    text = TextConfig.from_dict({**size_config("tiny").text.to_dict(), "vocab_size": VOCAB})
    config = ModelConfig(text=text, canvas_length=CANVAS)
    model = random_model(config, torch.float32, seed=3)
    with torch.no_grad():
        model.norm.weight.mul_(6.0)  # peaked next-token distributions: few outcomes hold most of the mass
    path = Path(tempfile.mkdtemp()) / "v10"
    dg.save(model, config, GenerationConfig(eos_token_id=()), path)
    return dg.load(path)


def _exact_autoregressive(ck, prompt, temperature):
    """P(t1, t2, t3) of autoregressive sampling at `temperature`, from full-logits forwards over each prefix."""
    m = ck.model
    probs = {}

    def dist(seq):
        with torch.no_grad():
            h = m.encode(torch.tensor(seq), [m.new_cache()])[-1]
            return torch.softmax(m.logits(h).double() / temperature, -1)

    p1 = dist(prompt)
    for a in range(VOCAB):
        p2 = dist(prompt + [a])
        for b in range(VOCAB):
            p3 = dist(prompt + [a, b])
            for c in range(VOCAB):
                probs[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    return probs


def _chi_square_p(counts: dict, probs: dict, n: int) -> float:
    """Pearson's test; outcomes expected fewer than 5 times are pooled into one cell."""
    cells, rare_obs, rare_exp = [], 0, 0.0
    for key, p in probs.items():
        e = n * p
        if e < 5:
            rare_obs, rare_exp = rare_obs + counts.get(key, 0), rare_exp + e
        else:
            cells.append((counts.get(key, 0), e))
    if rare_exp > 0:
        cells.append((rare_obs, rare_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _sample(ck, prompt, decoding, temperature, **kw):
    eng = Engine.from_checkpoint(ck, max_batch=512, batch_invariant=False)  # packed forwards: 10x faster here
    outs = eng.generate([prompt] * SAMPLES, [SamplingParams(max_tokens=TOKENS, seed=s, decoding=decoding,
                                                            ar_temperature=temperature, stop_token_ids=(), **kw)
                                             for s in range(SAMPLES)])
    counts: dict = {}
    for o in outs:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    return counts


@pytest.mark.slow
def test_sampled_speculative_decoding_is_distributed_as_autoregressive_sampling(small_vocab_model):
    """3,000 samples of 3 tokens per mode against the exact autoregressive distribution, Pearson's chi-square
    at significance 0.001 (seeds fixed, so the outcome is deterministic). The unverified diffusion sampler,
    which draws from another distribution, must be rejected by the same test (it has the power to see)."""
    ck, prompt, temperature = small_vocab_model, [4, 7, 1, 2], 1.0
    probs = _exact_autoregressive(ck, prompt, temperature)
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-9)
    for decoding in ("autoregressive", "speculative"):
        p = _chi_square_p(_sample(ck, prompt, decoding, temperature), probs, SAMPLES)
        assert p > 1e-3, (decoding, p)
    assert _chi_square_p(_sample(ck, prompt, "diffusion", temperature, max_denoising_steps=2), probs, SAMPLES) < 1e-6
