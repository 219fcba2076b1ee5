"""Prefix caching (`engine.prefix`): a prompt that begins with committed tokens reuses their keys and values, and
gives the tokens it gives without the cache (fp32) with every step runner, in every decoding mode, past the
sliding window, with images in the prompt, and when a full cache evicts."""

import pytest
import torch
from PIL import Image

import diffusiongemma as dg
from diffusiongemma.cache import KVCache
from diffusiongemma.engine import Engine, SamplingParams
from diffusiongemma.engine.prefix import PrefixCache, block_bytes
from diffusiongemma.vision.placement import expand_placeholders
from diffusiongemma.vision.preprocess import preprocess

A = [7 + (i * 5) % 80 for i in range(40)]  # 40 tokens: five times the pair model's sliding window of 8
MIB = 1 << 20


def _turns(engine, mode="diffusion", extra=(9, 10, 11, 12, 13), **kw):
    """A first request, then one whose prompt is the first's prompt, its answer and more: (first, second)."""
    sp = dict(max_tokens=48, stop_token_ids=(), decoding=mode, **kw)
    a = engine.generate([A], SamplingParams(seed=1, **sp))[0]
    b = engine.generate([A + a.token_ids + list(extra)], SamplingParams(seed=2, **sp))[0]
    return a, b


def test_the_cache_records_what_the_window_drops():
    from diffusiongemma.config import TextConfig

    cfg = TextConfig.from_dict(dict(vocab_size=10, hidden_size=8, num_attention_heads=1, num_key_value_heads=1,
                                    intermediate_size=8, moe_intermediate_size=4, num_experts=2, top_k_experts=1,
                                    num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                    head_dim=4, global_head_dim=4, num_global_key_value_heads=1, sliding_window=4))
    c = KVCache(cfg)
    c.record()
    ks = [torch.randn(1, 5, 4) for _ in range(2)]
    for chunk in ks:
        for i in range(2):
            c.append(i, chunk, -chunk)
        c.advance(torch.arange(c.length, c.length + 5))
    assert c.layer(0)[0].shape[1] == 3 and c.recorded == 10  # the sliding layer shows 3, the record keeps 10
    c.truncate(0)
    first = c.take_recorded(6)
    assert torch.equal(first[0][0], torch.cat(ks, 1)[:, :6]) and torch.equal(first[1][1], -torch.cat(ks, 1)[:, :6])
    assert c.recorded == 4
    with pytest.raises(ValueError, match="cannot take 5 recorded tokens of 4"):
        c.take_recorded(5)


@pytest.mark.parametrize("mode", ["diffusion", "speculative", "autoregressive"])
def test_same_tokens_with_and_without_the_cache(pair, mode):
    _, ck = pair
    want = _turns(Engine.from_checkpoint(ck), mode)
    engine = Engine.from_checkpoint(ck, prefix_cache=MIB)
    got = _turns(engine, mode)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    assert got[0].stats.cached_tokens == 0
    # the second prompt reused the first prompt and the committed canvases, far past the window of 8
    assert got[1].stats.cached_tokens >= 64
    st = engine.prefix_stats()
    assert st["hits"] == 1 and st["reused_tokens"] == got[1].stats.cached_tokens and st["bytes"] <= MIB


@pytest.mark.parametrize("runner", ["static", "compiled"])
def test_every_runner_gives_the_same_tokens(pair, runner):
    _, ck = pair
    want = _turns(Engine.from_checkpoint(ck))
    got = _turns(Engine.from_checkpoint(ck, runner=runner, max_context=256, prefix_cache=MIB, prefix_block=4))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert got[1].stats.cached_tokens >= 64


def test_the_first_step_after_a_cached_prefix_matches(pair, one_thread):
    """Beyond equal tokens: the first denoising step's entropies of the second request agree to 1e-5."""
    _, ck = pair

    def first_step(engine):
        a = engine.generate([A], SamplingParams(max_tokens=48, seed=1, stop_token_ids=()))[0]
        engine.add(A + a.token_ids + [9, 10], SamplingParams(max_tokens=16, seed=2), draft=True)
        while True:
            for ev in engine.step():
                if type(ev).__name__ == "DraftEvent":
                    return ev.entropy

    # blocks of 4 tokens: the window of 8 spans several blocks
    torch.testing.assert_close(first_step(Engine.from_checkpoint(ck, prefix_cache=MIB, prefix_block=4)),
                               first_step(Engine.from_checkpoint(ck)), atol=1e-5, rtol=0)


def _image(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return preprocess(Image.fromarray(pixels), max_soft_tokens=70, patch_size=5, pooling=2)


def test_images_are_part_of_the_key(pair):
    """The same text with the same image reuses the image's blocks; a different image with the same token ids
    reuses only what comes before it; both give the tokens they give without the cache."""
    _, ck = pair
    cat, dog = _image(40, 50, 0), _image(40, 50, 1)
    assert cat.num_soft_tokens == dog.num_soft_tokens
    text = A[:20] + [4] + A[20:]  # text, the image, more text (soft token 4, begin 5, end 6)
    ids = expand_placeholders(text, [cat.num_soft_tokens], placeholder=4, boi=5, eoi=6)
    start = ids.index(4)
    sp = SamplingParams(max_tokens=16, seed=3, stop_token_ids=())

    def run(engine, image, more):
        rid = engine.add(ids + more, sp, images=[image])
        events = [ev for ev in engine.stream() if ev.request_id == rid]
        return events[-1], [t for ev in events for t in ev.token_ids]

    cached = Engine.from_checkpoint(ck, prefix_cache=MIB)
    plain = Engine.from_checkpoint(ck)
    run(cached, cat, [])
    same, same_tokens = run(cached, cat, [30, 31, 32])
    assert same.stats.cached_tokens == len(ids) // 16 * 16 > start + cat.num_soft_tokens  # past the image
    other, other_tokens = run(cached, dog, [30, 31, 32])
    assert other.stats.cached_tokens == start // 16 * 16 > 0  # up to the image only
    for image, got in ((cat, same_tokens), (dog, other_tokens)):
        assert got == run(plain, image, [30, 31, 32])[1]


def test_a_full_cache_evicts_and_never_fails(pair):
    _, ck = pair
    one_block = block_bytes(ck.config.text, 16, torch.float32)
    engine = Engine.from_checkpoint(ck, prefix_cache=3 * one_block)
    plain = Engine.from_checkpoint(ck)
    prompts = [[10 + i] + A for i in range(4)]
    sp = SamplingParams(max_tokens=32, seed=5, stop_token_ids=())
    for p in prompts + prompts[::-1]:
        got, want = engine.generate([p], sp)[0], plain.generate([p], sp)[0]
        assert got.token_ids == want.token_ids
        st = engine.prefix_stats()
        assert st["bytes"] <= 3 * one_block and st["blocks"] <= 3
    assert st["evictions"] > 0
    # the last prompt was just cached: asked again, it reuses its blocks
    assert engine.generate([prompts[0]], sp)[0].stats.cached_tokens > 0


def test_bad_settings_are_named(pair):
    _, ck = pair
    with pytest.raises(ValueError, match="cannot hold one block: a block of 16 tokens takes"):
        Engine.from_checkpoint(ck, prefix_cache=1000)
    with pytest.raises(ValueError, match="block size must be a positive integer, got 0"):
        PrefixCache(ck.config.text, MIB, block_size=0)
    with pytest.raises(ValueError, match="at most the model's .* positions"):
        Engine.from_checkpoint(ck, max_context=10 ** 9)


def test_a_tool_dialogue_on_the_shipped_model(shipped_model_dir):
    """Three turns of a tool dialogue through the generation layer: the same answers with and without the
    cache, and the later turns reuse the earlier ones."""
    from diffusiongemma.generation import Generator

    ck = dg.load(shipped_model_dir)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]

    def dialogue(gen):
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the weather in Paris?"}]
        out = []
        for turn in range(3):
            res = gen.run([gen.chat(messages, tools)], SamplingParams(max_tokens=64, seed=turn))[0]
            out.append(res)
            messages.append({"role": "assistant", "content": res.content,
                             **({"tool_calls": [{"type": "function", "function": {"name": c.name,
                                                                                  "arguments": c.arguments}}
                                                for c in res.tool_calls]} if res.tool_calls else {})})
            messages.append({"role": "tool", "name": "get_weather", "content": '{"temperature": 21}'} if turn == 0
                            else {"role": "user", "content": "And in Rome?"})
        return out

    want = dialogue(Generator(ck))
    got = dialogue(Generator(ck, prefix_cache=64 * MIB))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got[0].stats.cached_tokens == 0 and got[1].stats.cached_tokens > 0 and got[2].stats.cached_tokens > 0
