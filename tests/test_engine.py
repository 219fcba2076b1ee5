"""The engine: equal to the slow reference generator and to transformers' generate (with the same
draws injected), requests that finish on their own, exact max_tokens, events, cancellation."""

import tempfile
from pathlib import Path

import pytest
import torch

import diffusiongemma as dg
from diffusiongemma.bench.same_draws import SameDraws
from diffusiongemma.engine import (
    CommitAction,
    CommitEvent,
    DraftEvent,
    Engine,
    RequestError,
    SamplingParams,
    reference_generate,
)
from hf_utils import make_hf_model, save_hf

STOPS = [1, 2, 3]



def test_engine_equals_reference_generator(pair):
    _, ck = pair
    for seed in range(4):
        sp = SamplingParams(max_tokens=64, seed=seed)
        out = Engine.from_checkpoint(ck).generate([[5, 6, 7, 8]], sp)[0]
        want, reason = reference_generate(ck.model, [5, 6, 7, 8], sp.resolve(ck.generation_config, seed), 16)
        assert out.token_ids == want and out.finish_reason == reason


def test_tokens_do_not_depend_on_the_batch(pair):
    _, ck = pair
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [20]]
    params = [SamplingParams(max_tokens=48, seed=s) for s in (11, 12, 13, 14)]
    alone = [Engine.from_checkpoint(ck).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    batched = Engine.from_checkpoint(ck, max_batch=4).generate(prompts, params)
    assert [c.token_ids for c in batched] == alone
    # different steps per canvas inside one batch: the requests really ran side by side
    assert len({tuple(c.stats.steps_per_canvas) for c in batched}) > 1


def test_requests_finish_independently_and_join_late(pair):
    _, ck = pair
    eng = Engine.from_checkpoint(ck, max_batch=2)
    short = eng.add([5, 6], SamplingParams(max_tokens=16, seed=1))
    long_ = eng.add([7, 8], SamplingParams(max_tokens=64, seed=2, stop_token_ids=()))
    late = eng.add([9], SamplingParams(max_tokens=16, seed=3))
    finished_at, step = {}, 0
    while eng.has_work():
        for ev in eng.step():
            if isinstance(ev, CommitEvent) and ev.finish_reason:
                finished_at[ev.request_id] = step
        if late not in finished_at and step < 200:
            # the late request is admitted only once the short one has left
            assert eng.num_active <= 2
        step += 1
    assert finished_at[short] < finished_at[late] < finished_at[long_]


@pytest.mark.parametrize("max_tokens", [1, 5, 16, 17, 40])
def test_max_tokens_is_exact(pair, max_tokens):
    _, ck = pair
    out = Engine.from_checkpoint(ck).generate([[5, 6]], SamplingParams(max_tokens=max_tokens, seed=0,
                                                                        stop_token_ids=()))[0]
    assert len(out.token_ids) == max_tokens and out.finish_reason == "length"
    assert out.stats.completion_tokens == max_tokens


def test_stop_id_inside_a_canvas(pair):
    _, ck = pair
    out = None
    for seed in range(20):
        out = Engine.from_checkpoint(ck).generate([[5, 6, 7]], SamplingParams(max_tokens=200, seed=seed))[0]
        if out.finish_reason == "stop" and len(out.token_ids) % 16 != 0:
            break
    assert out.finish_reason == "stop" and out.token_ids[-1] in STOPS
    assert len(out.token_ids) % 16 != 0  # the stop id came inside a canvas: the rest of that canvas was cut
    assert not any(t in STOPS for t in out.token_ids[:-1])


def test_events_stream_and_statistics(pair):
    _, ck = pair
    eng = Engine.from_checkpoint(ck)
    rid = eng.add([5, 6, 7], SamplingParams(max_tokens=40, seed=4, stop_token_ids=()), draft=True)
    events = list(eng.stream())
    drafts = [e for e in events if isinstance(e, DraftEvent)]
    commits = [e for e in events if isinstance(e, CommitEvent)]
    assert [len(c.token_ids) for c in commits] == [16, 16, 8]
    assert commits[-1].finish_reason == "length" and all(c.finish_reason is None for c in commits[:-1])
    stats = commits[-1].stats
    assert stats.decoder_forwards == len(drafts) == sum(stats.steps_per_canvas)
    assert stats.commit_forwards == 3  # prefill + two commits (the last canvas is not re-encoded)
    assert stats.tokens_per_forward == pytest.approx(40 / stats.decoder_forwards)
    assert stats.ttft_s is not None and stats.ttft_s <= stats.total_s
    d = drafts[0]
    assert d.request_id == rid and d.step == 0 and d.argmax.shape == (16,) and d.accepted.dtype == torch.bool
    assert d.temperature == pytest.approx(0.8) and d.entropy.shape == (16,)
    # a plain request emits no drafts
    eng.add([5], SamplingParams(max_tokens=4, seed=1))
    assert not any(isinstance(e, DraftEvent) for e in eng.stream())


def test_cancel_frees_the_request(pair):
    _, ck = pair
    eng = Engine.from_checkpoint(ck)
    rid = eng.add([5, 6, 7], SamplingParams(max_tokens=64, seed=4, stop_token_ids=()))
    eng.step()
    eng.step()
    cache = eng._active[0].cache
    assert cache.nbytes() > 0
    eng.cancel(rid)
    events = eng.step()
    assert [e.finish_reason for e in events] == ["cancelled"]
    assert cache.nbytes() == 0 and not eng.has_work()


def test_commit_hook_can_cut_and_finish(pair):
    _, ck = pair
    hook = lambda ids: CommitAction(keep=3, finish_reason="stop")  # noqa: E731
    out = Engine.from_checkpoint(ck).generate([[5, 6]], SamplingParams(max_tokens=64, seed=0), hooks=[hook])[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "stop"


def test_initial_canvas_and_per_request_settings(pair):
    _, ck = pair
    canvas = tuple(range(10, 26))
    a = Engine.from_checkpoint(ck).generate([[5]], SamplingParams(max_tokens=16, seed=0, initial_canvas=canvas,
                                                                  max_denoising_steps=1))[0]
    b = Engine.from_checkpoint(ck).generate([[5]], SamplingParams(max_tokens=16, seed=0, max_denoising_steps=1))[0]
    assert a.token_ids != b.token_ids
    # two requests in one batch, each with settings of its own: its own step cap and temperature schedule
    # (a stability window longer than the cap: neither can stop early)
    eng = Engine.from_checkpoint(ck, max_batch=2)
    hot = eng.add([5], SamplingParams(max_tokens=16, seed=0, max_denoising_steps=3, t_max=1.5, t_min=1.0,
                                      entropy_bound=5.0, stability_threshold=100), draft=True)
    cold = eng.add([5], SamplingParams(max_tokens=16, seed=0, max_denoising_steps=5, stability_threshold=100),
                   draft=True)
    events = list(eng.stream())
    drafts = {rid: [e for e in events if isinstance(e, DraftEvent) and e.request_id == rid] for rid in (hot, cold)}
    # T = t_min + (t_max - t_min) * remaining / N, remaining = N..1
    assert [e.temperature for e in drafts[hot]] == pytest.approx([1.5, 1.0 + 0.5 * 2 / 3, 1.0 + 0.5 / 3])
    assert [e.temperature for e in drafts[cold]] == pytest.approx([0.8, 0.72, 0.64, 0.56, 0.48])
    steps = {e.request_id: e.stats.steps_per_canvas for e in events if isinstance(e, CommitEvent) and e.finish_reason}
    assert steps == {hot: [3], cold: [5]}
    # entropy bound 5 nats accepts far more of the first canvas than the release's 0.1
    assert int(drafts[hot][0].accepted.sum()) > int(drafts[cold][0].accepted.sum())


@pytest.mark.parametrize("kw,msg", [
    (dict(max_tokens=0), "max_tokens"), (dict(t_max=0.3, t_min=0.5), "t_max"), (dict(entropy_bound=-1.0), "entropy"),
    (dict(max_denoising_steps=2.5), "max_denoising_steps"), (dict(seed="x"), "seed"),
])
def test_bad_parameters_are_named(kw, msg):
    with pytest.raises(RequestError, match=msg):
        SamplingParams(**kw)


def test_bad_prompts_are_rejected(pair):
    _, ck = pair
    eng = Engine.from_checkpoint(ck, max_context=100)
    with pytest.raises(RequestError, match="empty"):
        eng.add([])
    with pytest.raises(RequestError, match="token ids must be in"):
        eng.add([5, 99])
    with pytest.raises(RequestError, match="exceeds the context"):
        eng.add([5] * 50, SamplingParams(max_tokens=64))
    assert not eng.has_work()


def test_engine_equals_transformers_generate(pair, monkeypatch):
    """End to end against DiffusionGemmaForBlockDiffusion.generate: a left-padded batch of three,
    several canvases, a stop id inside a canvas, rows finishing at different canvases."""
    hf, ck = pair
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    seeds = [0, 7, 3]
    L, N, canvases = 16, 48, 4
    SameDraws(seeds, L, 99, N).install(monkeypatch.setattr)
    S = max(map(len, prompts))
    ids = torch.tensor([[0] * (S - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=canvases * L)
    want = []
    for row in out.sequences[:, S:].tolist():
        stop = next((i for i, t in enumerate(row) if t in STOPS), None)
        want.append(row[: stop + 1] if stop is not None else row)
    got = Engine.from_checkpoint(ck, max_batch=3).generate(
        prompts, [SamplingParams(max_tokens=canvases * L, seed=s) for s in seeds])
    assert [g.token_ids for g in got] == want
    lengths = [len(w) for w in want]
    assert any(n % L != 0 for n in lengths)  # a stop id inside a canvas
    assert max(lengths) > 2 * L  # at least one row ran more than two canvases
    assert len(set((n - 1) // L for n in lengths)) > 1  # rows finished in different canvases


def test_packed_decoder_attention_equals_one_call_per_sequence():
    """DecoderPass(pack=True) attends for all sequences in one masked call; it must match one call per
    sequence, with caches of different lengths, one empty, and sliding layers past their window."""
    from diffusiongemma.model.attention import DecoderPass

    hf = make_hf_model(6, sliding_window=8)
    path = save_hf(hf, Path(tempfile.mkdtemp()) / "m")
    model = dg.load(path).model
    prompts = [list(range(5, 25)), [9, 10], list(range(30, 37))]
    caches = [model.new_cache() for _ in prompts] + [model.new_cache()]  # the last one stays empty
    with torch.no_grad():
        model.encode(torch.tensor(sum(prompts, [])), caches[:3], lengths=[len(p) for p in prompts])
        canvas = torch.randint(0, 99, (4 * 16,))
        positions = torch.cat([torch.arange(c.next_position, c.next_position + 16) for c in caches])
        x = model.self_conditioning(model.embed(canvas), None)
        out = {pack: model.forward_tokens(x, positions, DecoderPass(caches, [16] * 4, pack=pack))
               for pack in (True, False)}
        auto = model.decode(canvas, caches, lengths=[16] * 4)
    assert caches[0].layer(0)[0].shape[1] == 7  # the sliding layer kept window - 1 of 20 tokens
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)
    torch.testing.assert_close(auto, out[False], atol=0, rtol=0)  # fp32 (parity dtype): one call per sequence
    # bf16 inference, small: packed by default
    bf = dg.load(path, dtype="bfloat16").model
    caches = [bf.new_cache() for _ in prompts] + [bf.new_cache()]
    with torch.no_grad():
        bf.encode(torch.tensor(sum(prompts, [])), caches[:3], lengths=[len(p) for p in prompts])
        x = bf.self_conditioning(bf.embed(canvas), None)
        packed = bf.forward_tokens(x, positions, DecoderPass(caches, [16] * 4, pack=True))
        auto = bf.decode(canvas, caches, lengths=[16] * 4)
    torch.testing.assert_close(auto, packed, atol=0, rtol=0)


def test_packed_forwards_agree_with_per_request_forwards(pair):
    """batch_invariant=False packs all canvases into one forward: same numbers up to rounding."""
    _, ck = pair
    model = ck.model
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    caches = [model.new_cache() for _ in prompts]
    with torch.no_grad():
        model.encode(torch.tensor(sum(prompts, [])), caches, lengths=[len(p) for p in prompts])
        solo = [model.new_cache() for _ in prompts]
        for p, c in zip(prompts, solo):
            model.encode(torch.tensor(p), [c])
        canvas = torch.randint(0, 99, (3 * 16,))
        packed = model.decode(canvas, caches, lengths=[16] * 3)
        alone = torch.cat([model.decode(canvas[16 * i:16 * (i + 1)], [c]) for i, c in enumerate(solo)])
    # different matrix shapes (48 rows vs 16) take differently blocked kernels: 1.3-3.3e-5 apart on an AMD EPYC
    # host, in hidden states up to ~37 (relative ~1e-6)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=0)
    eng = Engine.from_checkpoint(ck, max_batch=3, batch_invariant=False)
    out = eng.generate(prompts, [SamplingParams(max_tokens=16, seed=s, max_denoising_steps=4) for s in (1, 2, 3)])
    ref = [Engine.from_checkpoint(ck).generate([p], SamplingParams(max_tokens=16, seed=s, max_denoising_steps=4))[0]
           for p, s in zip(prompts, (1, 2, 3))]
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]


def test_static_step_matches_the_dynamic_decoder(pair):
    """The fixed-shape step (what a GPU captures as a CUDA graph) computes what decode + vocab_pass do."""
    from diffusiongemma.engine.static import StaticStep
    from diffusiongemma.sampling.vocab import vocab_pass

    _, ck = pair
    m, L = ck.model, 16
    st = StaticStep(m, slots=3, canvas_length=L, capacity=64)
    caches = [m.new_cache() for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    for c, n in zip(caches, (5, 40)):  # 40 > the sliding window of the test model: a full sliding slot
        m.encode(torch.randint(0, 64, (n,), generator=g), [c])
    canvases = [torch.randint(0, 64, (L,), generator=g) for _ in caches]
    softs = [None, torch.randn(L, m.config.hidden_size, generator=g)]
    uniforms = [torch.rand(L, generator=g) for _ in caches]
    for slot, (c, cv, sf, u) in enumerate(zip(caches, canvases, softs, uniforms)):
        st.load(slot * 2, c)  # slots 0 and 2; slot 1 stays empty
        st.set_inputs(slot * 2, cv, sf, c.next_position, 0.7, u)
    st.run()
    for slot, (c, cv, sf, u) in enumerate(zip(caches, canvases, softs, uniforms)):
        hidden = m.decode(cv, [c], sf)
        want = vocab_pass(hidden, m.embed_tokens.weight, m.config.final_logit_softcapping, torch.full((L,), 0.7), u,
                          True, m.embed_scale())
        rows = st.rows(slot * 2)
        torch.testing.assert_close(st.entropy[rows], want.entropy, atol=1e-5, rtol=0)
        torch.testing.assert_close(st.next_soft[rows], want.soft, atol=1e-5, rtol=1e-5)
        assert torch.equal(st.argmax[rows], want.argmax) and torch.equal(st.sample[rows], want.sample)


def test_static_engine_gives_the_dynamic_engines_tokens(pair):
    _, ck = pair
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    params = [SamplingParams(max_tokens=48, seed=s) for s in (21, 22, 23)]
    dynamic = Engine.from_checkpoint(ck, max_batch=2, batch_invariant=False).generate(prompts, params)
    static = Engine.from_checkpoint(ck, max_batch=2, runner="static", max_context=128).generate(prompts, params)
    assert [c.token_ids for c in static] == [c.token_ids for c in dynamic]
    assert [c.finish_reason for c in static] == [c.finish_reason for c in dynamic]


@pytest.mark.gpu
def test_static_step_is_captured_as_a_cuda_graph_and_replays_the_eager_step():
    """On a GPU the fixed-shape step is captured once as a CUDA graph; each replay must compute what the same
    step run eagerly computes, for new inputs written into the same buffers (fp32, a random tiny model)."""
    from diffusiongemma.engine.static import StaticStep
    from diffusiongemma.loader.random_weights import random_model, size_config

    dev = torch.device("cuda")
    config = size_config("tiny")
    m, L = random_model(config, torch.float32, device=dev), config.canvas_length
    graphed = StaticStep(m, slots=2, canvas_length=L, capacity=128)
    eager = StaticStep(m, slots=2, canvas_length=L, capacity=128, graph=False)
    assert graphed.graph_enabled and not eager.graph_enabled
    g = torch.Generator(device=dev).manual_seed(0)
    caches = [m.new_cache() for _ in range(2)]
    with torch.inference_mode():
        for c, n in zip(caches, (9, 80)):  # 80 > the sliding window (64): a full sliding slot
            m.encode(torch.randint(0, 512, (n,), device=dev, generator=g), [c])
    for step in range(3):  # capture at the first run, then replays with new inputs
        for st in (graphed, eager):
            for slot, c in enumerate(caches):
                st.load(slot, c)
        soft = None if step == 0 else torch.randn(L, config.text.hidden_size, device=dev, generator=g)
        inputs = [(torch.randint(0, 512, (L,), device=dev, generator=g), soft, 0.8 - 0.1 * step,
                   torch.rand(L, device=dev, generator=g, dtype=torch.float64)) for _ in caches]
        for st in (graphed, eager):
            for slot, (c, (canvas, sf, t, u)) in enumerate(zip(caches, inputs)):
                st.set_inputs(slot, canvas, sf, c.next_position, t, u)
            st.run()
        assert graphed._graph is not None
        assert torch.equal(graphed.argmax, eager.argmax) and torch.equal(graphed.sample, eager.sample)
        torch.testing.assert_close(graphed.entropy, eager.entropy, atol=1e-6, rtol=0)
        torch.testing.assert_close(graphed.next_soft, eager.next_soft, atol=1e-6, rtol=1e-6)
