"""The generation layer (text on both sides of the engine), the one validation of request settings, and the
one `load()` that returns the whole bundle."""

import json
import pathlib

import pytest
import torch

import diffusiongemma as dg
from diffusiongemma.engine import SETTINGS, DraftEvent, Engine, RequestError, SamplingParams
from diffusiongemma.generation import Generator, OutputOptions, Result, parse_ids
from diffusiongemma.text.chat import ChatError
from diffusiongemma.text.parser import Delta

MSGS = [{"role": "user", "content": "Reverse the list: apple pear fig"}]


@pytest.fixture(scope="module")
def ck(tiny_text_model_dir):
    return dg.load(tiny_text_model_dir, dtype="float32")


def test_run_gives_the_engines_tokens_and_their_text(ck):
    gen = Generator(ck)
    prompts = [gen.chat(MSGS), gen.chat(MSGS, thinking=True), gen.text("Once upon a time")]
    params = [SamplingParams(max_tokens=40, seed=s, max_denoising_steps=4) for s in (1, 2, 3)]
    results = gen.run(prompts, params)
    plain = Engine.from_checkpoint(ck).generate([p.ids for p in prompts], params)
    assert [r.token_ids for r in results] == [c.token_ids for c in plain]
    assert [r.finish_reason for r in results] == [c.finish_reason for c in plain]
    for r in results:  # the text is what the ids say, read after the fact
        s = parse_ids(ck.tokenizer, r.token_ids)
        assert (r.content, r.reasoning) == (s.content, s.reasoning)
        assert r.stats.completion_tokens == len(r.token_ids)


def test_stream_outputs_add_up_to_the_result(ck):
    gen = Generator(ck)
    outs = list(gen.stream(gen.chat(MSGS, thinking=True), SamplingParams(max_tokens=48, seed=5, max_denoising_steps=3),
                           OutputOptions(draft=True)))
    result = outs[-1]
    assert isinstance(result, Result) and not any(isinstance(o, Result) for o in outs[:-1])
    deltas = [o for o in outs if isinstance(o, Delta)]
    assert "".join(d.text for d in deltas if d.kind == "content") == result.content
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == result.reasoning
    drafts = [o for o in outs if isinstance(o, DraftEvent)]
    assert len(drafts) == result.stats.decoder_forwards
    # no draft frames unless asked
    outs = list(gen.stream(gen.chat(MSGS), SamplingParams(max_tokens=8, seed=5, max_denoising_steps=2)))
    assert not any(isinstance(o, DraftEvent) for o in outs)


def test_stop_string_cuts_the_text_and_the_tokens(ck):
    gen = Generator(ck)
    params = SamplingParams(max_tokens=64, seed=7, max_denoising_steps=3, stop_token_ids=())
    free = gen.run([gen.text("Once")], params)[0]
    assert len(free.content) > 6
    stop = free.content[3:6]  # a stop string the free run writes: it must end the answer before it
    cut = gen.run([gen.text("Once")], params, OutputOptions(stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.content == free.content[:free.content.find(stop)]
    assert len(cut.token_ids) < len(free.token_ids) and cut.token_ids == free.token_ids[:len(cut.token_ids)]


def test_step_reports_each_request_by_id_and_cancel_finishes_it(ck):
    gen = Generator(ck, max_batch=4)
    a = gen.submit(gen.chat(MSGS), SamplingParams(max_tokens=200, seed=1, stop_token_ids=()))
    b = gen.submit(gen.chat(MSGS), SamplingParams(max_tokens=16, seed=2, stop_token_ids=()))
    finals: dict[str, Result] = {}
    while b not in finals:
        for rid, o in gen.step():
            assert rid in (a, b)
            if isinstance(o, Result):
                finals[rid] = o
    assert a not in finals and finals[b].finish_reason == "length"
    gen.cancel(a)
    outs = gen.step()
    assert [(rid, o.finish_reason) for rid, o in outs if isinstance(o, Result)] == [(a, "cancelled")]
    assert not gen.has_work()


def test_forced_tool_call_and_tool_choice_errors(ck):
    gen = Generator(ck)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    p = gen.chat(MSGS, tools, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert p.forced == "<|tool_call>call:get_weather"
    assert ck.tokenizer.decode(p.ids).endswith("<|tool_call>call:get_weather")
    assert gen.chat(MSGS, tools, tool_choice="required").forced == "<|tool_call>call:"
    assert gen.chat(MSGS, tools, tool_choice="none").ids == gen.chat(MSGS).ids  # tools not shown
    with pytest.raises(ChatError, match="tool_choice names an undeclared function 'nope'"):
        gen.chat(MSGS, tools, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ChatError, match="tool_choice needs tools"):
        gen.chat(MSGS, tool_choice="required")


@pytest.mark.parametrize("kw,param", [
    (dict(stop=["ok", ""]), "stop"), (dict(stop=[3]), "stop"), (dict(thinking_budget=-1), "thinking_budget"),
    (dict(thinking_budget=True), "thinking_budget"), (dict(draft="yes"), "draft"),
])
def test_output_options_name_a_bad_value(kw, param):
    with pytest.raises(RequestError) as e:
        OutputOptions(**kw)
    assert e.value.param == param and param in str(e.value)


def test_sampling_params_are_the_one_source_of_settings():
    gen = dg.GenerationConfig(eos_token_id=(1,))
    r = SamplingParams(temperature=0.5).resolve(gen, seed=3)
    assert (r.t_max, r.t_min, r.seed) == (pytest.approx(0.4), pytest.approx(0.2), 3)  # the schedule scaled
    r = SamplingParams(temperature=0.5, t_max=0.9).resolve(gen, seed=0)
    assert (r.t_max, r.t_min) == (0.9, pytest.approx(0.2))  # an explicit t_max wins
    assert SamplingParams(temperature=0).resolve(gen, seed=0).t_max == pytest.approx(0.008)  # 0 is taken as 0.01
    assert SamplingParams().resolve(gen, seed=0).max_tokens == gen.max_new_tokens
    with pytest.raises(RequestError, match="t_max must be greater than t_min") as e:
        SamplingParams(t_min=0.9).resolve(gen, seed=0)  # above the checkpoint's t_max
    assert e.value.param == "t_min"
    with pytest.raises(RequestError, match="temperature must be a number between 0 and 2, got 5") as e:
        SamplingParams(temperature=5)
    assert e.value.param == "temperature"
    assert SETTINGS["max_denoising_steps"].parse("7") == 7
    with pytest.raises(RequestError, match="max_denoising_steps must be a positive integer, got 'x'"):
        SETTINGS["max_denoising_steps"].parse("x")
    assert set(SETTINGS) == set(SamplingParams.__dataclass_fields__)  # every field described once


def test_load_returns_the_bundle_reading_each_file_once(tiny_text_model_dir, monkeypatch):
    reads: dict[str, int] = {}
    real = pathlib.Path.read_text

    def counting(self, *a, **k):
        reads[self.name] = reads.get(self.name, 0) + 1
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "read_text", counting)
    ck = dg.load(tiny_text_model_dir)
    assert ck.tokenizer is not None and ck.template is not None and ck.vision is None
    assert reads and all(n == 1 for n in reads.values()), reads
    assert {"config.json", "generation_config.json"} <= set(reads)


def test_ids_only_checkpoints_load_and_the_generator_says_what_it_needs(tmp_path):
    from diffusiongemma.loader.random_weights import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "r", "tiny", torch.float32)
    ck = dg.load(path)
    assert ck.tokenizer is None and ck.template is None
    assert Engine.from_checkpoint(ck).generate([[5, 6]], SamplingParams(max_tokens=4, seed=0))[0].token_ids
    with pytest.raises(ChatError, match="has no tokenizer.json"):
        Generator(ck)
    with pytest.raises(dg.CheckpointError, match="no vision tower"):
        dg.load(path, vision=True)
    assert json.loads((path / "config.json").read_text())["model_type"] == "diffusion_gemma"
