"""Structured output: `response_format` json_object / json_schema through the causal verifier (llguidance):
every answer that ends with `stop` parses and validates, in every decoding mode, greedy and sampled."""

import json

import jsonschema
import pytest
import torch

import diffusiongemma as dg
from diffusiongemma.engine import RequestError, SamplingParams
from diffusiongemma.generation import Generator, OutputOptions
from diffusiongemma.generation.structured import response_schema

SCHEMAS = {
    "enum and range": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                         "n": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["color", "n"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 4,
                                                         "items": {"type": "integer", "minimum": 0, "maximum": 99}}},
              "required": ["items"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                "weather": {"type": "object", "properties": {
                                                    "temp": {"type": "number", "minimum": -50, "maximum": 60},
                                                    "rain": {"type": "boolean"}},
                                                    "required": ["temp", "rain"], "additionalProperties": False}},
               "required": ["city", "weather"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def gen(shipped_model_dir):
    return Generator(dg.load(shipped_model_dir, dtype="float32"))


def _format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("decoding", ["diffusion", "speculative", "autoregressive"])
def test_answers_parse_and_validate(gen, decoding):
    prompt = gen.chat([{"role": "user", "content": "What is the weather in Oslo? Answer in JSON."}])
    stops = 0
    for schema in SCHEMAS.values():
        for t in (0.0, 1.0):
            params = [SamplingParams(max_tokens=48, seed=s, decoding=decoding, ar_temperature=t) for s in range(3)]
            for r in gen.run([prompt] * 3, params, OutputOptions(response_format=_format(schema))):
                assert r.finish_reason in ("stop", "length"), r.finish_reason
                assert r.stats.decoding != "diffusion"  # constrained requests are verified
                if r.finish_reason == "stop":
                    jsonschema.validate(json.loads(r.content), schema)
                    stops += 1
    assert stops >= 9, stops  # the rest ran out of max_tokens inside an unbounded number or string
    # json_object: any object
    r = gen.run([prompt], SamplingParams(max_tokens=32, seed=0, decoding=decoding),
                OutputOptions(response_format={"type": "json_object"}))[0]
    assert r.finish_reason == "stop" and isinstance(json.loads(r.content), dict)


def test_unconstrained_answers_are_not_json(gen):
    """The shipped model never learned JSON: without the grammar its answers do not parse (so the test above
    shows the grammar at work, not the model)."""
    prompt = gen.chat([{"role": "user", "content": "What is the weather in Oslo? Answer in JSON."}])
    parsed = 0
    for r in gen.run([prompt] * 6, [SamplingParams(max_tokens=48, seed=s) for s in range(6)]):
        try:
            json.loads(r.content)
            parsed += 1
        except ValueError:
            pass
    assert parsed == 0


@pytest.mark.parametrize("fmt,msg", [
    ({"type": "xml"}, "response_format.type must be 'text', 'json_object' or 'json_schema'"),
    ("json", "response_format must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": 3}}, "must be an object with a 'schema' object"),
])
def test_bad_response_formats_are_named(fmt, msg):
    with pytest.raises(RequestError, match=msg) as e:
        response_schema(fmt)
    assert e.value.param == "response_format"


def test_schema_the_grammar_engine_rejects_and_bad_combinations(gen):
    prompt = gen.chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(RequestError, match="response_format schema is not supported") as e:
        gen.submit(prompt, SamplingParams(max_tokens=8), OutputOptions(response_format=_format({"type": "frob"})))
    assert e.value.param == "response_format"
    with pytest.raises(RequestError, match="cannot be combined with stop strings"):
        OutputOptions(response_format={"type": "json_object"}, stop=("}",))
    with pytest.raises(RequestError, match="stop_token_ids cannot be combined"):
        gen.submit(prompt, SamplingParams(max_tokens=8, stop_token_ids=(1,)),
                   OutputOptions(response_format={"type": "json_object"}))
    assert not gen.has_work()  # nothing was queued


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "convert_currency"}}])
def test_forced_tool_calls_follow_the_tools_parameters(gen, choice):
    from diffusiongemma.training.tasks import TOOLS

    prompt = gen.chat([{"role": "user", "content": "Tell me about the sea."}], TOOLS, tool_choice=choice)
    params = [SamplingParams(max_tokens=64, seed=s, decoding=d, ar_temperature=t)
              for s, (d, t) in enumerate([("diffusion", 0.0), ("speculative", 1.0), ("autoregressive", 1.0)] * 2)]
    for r in gen.run([prompt] * len(params), params):
        assert r.chat_finish_reason == "tool_calls" and len(r.tool_calls) == 1 and not r.tool_call_errors, r
        call = r.tool_calls[0]
        tool = next(t["function"] for t in TOOLS if t["function"]["name"] == call.name)
        jsonschema.validate(call.arguments, tool["parameters"])
        if isinstance(choice, dict):
            assert call.name == "convert_currency"


def test_tool_call_grammar_accepts_valid_calls_only(gen):
    """The grammar itself: optional keys may be left out, required ones may not, keys in sorted order."""
    import llguidance

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": ["b"], "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]},
                                                            "c": {"type": "array", "items": {"type": "boolean"}}}}}}]
    grammar = gen.grammars.compile_tool_call(tools, None)
    _, ll = gen.grammars._lib()
    for text, ok in (('f{b:<|"|>x<|"|>}<tool_call|>', True), ('f{a:3,b:<|"|>y<|"|>,c:[true,false]}<tool_call|>', True),
                     ('f{a:3}<tool_call|>', False), ('f{b:<|"|>z<|"|>}<tool_call|>', False),
                     ('f{b:<|"|>x<|"|>,a:3}<tool_call|>', False), ('g{b:<|"|>x<|"|>}<tool_call|>', False)):
        m = llguidance.LLMatcher(ll, grammar, log_level=0)
        assert (m.consume_tokens(gen.tokenizer.encode(text)) and m.is_accepting()) == ok, text
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}}}}]
    with pytest.raises(RequestError, match="uses 'pattern'") as e:
        gen.grammars.compile_tool_call(bad, None)
    assert e.value.param == "tool_choice"


def test_looking_through_a_draft_leaves_the_grammar_where_it_was(gen):
    """masks() over a draft that holds an allowed stop id and more tokens after it (the stop id is not
    consumed: an answer ends there) must leave the matcher at the emitted tokens."""
    c = gen.grammars.constraint(gen.grammars.compile({"type": "object", "properties": {"a": {"enum": ["x"]}},
                                                      "required": ["a"]}))
    tok = gen.tokenizer
    c.consume(tok.encode('{"a":"x"'))
    before = c.masks([])[0]
    stop = tok.token_id("<turn|>")
    masks = c.masks(tok.encode("}") + [stop] + tok.encode("{{"))
    assert len(masks) == 3 and bool(masks[1][stop]) and masks[2].sum() == len(c.stop_ids)
    assert torch.equal(c.masks([])[0], before)
    c.consume(tok.encode("}") + [stop])
    assert c.error is None
