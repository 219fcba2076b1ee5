"""Tokenizer, chat template (same string and ids as transformers), output parsing under any chunking,
incremental detokenisation, stop strings and the thinking budget."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusiongemma.text import tokenizer as T
from diffusiongemma.text.chat import ChatError, ChatTemplate, default_template, normalize_messages, validate_tools
from diffusiongemma.text.parser import OutputParser
from diffusiongemma.text.stops import StopMatcher
from diffusiongemma.text.stream import TextStream
from diffusiongemma.text.syntax import format_call, format_value, parse_call, parse_value
from diffusiongemma.text.tokenizer import IncrementalDecoder, Tokenizer
from diffusiongemma.training.tasks import TOOLS
from diffusiongemma.training.tokenizer import RELEASE_SPECIALS


@pytest.fixture(scope="module")
def tok(small_tokenizer_dir):
    return Tokenizer.from_dir(small_tokenizer_dir)


def test_special_tokens_at_release_ids(tok):
    for i, s in RELEASE_SPECIALS.items():
        assert tok.token_id(s) == i
        assert tok.encode(s) == [i]
    assert tok.encode("<|turn>user\nhi<turn|>")[:2] == [105, tok.encode("user")[0]]


CONVERSATIONS = {
    "system_multi_turn": dict(messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "<|channel>thought\nplan it<channel|>Hello!"},
        {"role": "user", "content": "Sort: 3 1 2"}]),
    "thinking_on": dict(messages=[{"role": "user", "content": "What is 2 + 2?"}], enable_thinking=True),
    "thinking_off": dict(messages=[{"role": "user", "content": "What is 2 + 2?"}], enable_thinking=False),
    "thinking_on_with_system": dict(messages=[{"role": "system", "content": "Be precise."},
                                              {"role": "user", "content": "Go"}], enable_thinking=True),
    "tools_round_trip": dict(tools=TOOLS, messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "name": "get_weather", "response": {"temperature": -3, "condition": "snowy"}}]),
    "tool_answer_then_user": dict(tools=TOOLS, messages=[
        {"role": "user", "content": "Convert 5 USD to EUR."},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "convert_currency", "arguments": {"amount": 5, "from": "USD", "to": "EUR"}}}]},
        {"role": "tool", "name": "convert_currency", "response": {"result": 4.61}},
        {"role": "assistant", "content": "5 USD is 4.61 EUR."},
        {"role": "user", "content": "Thanks"}]),
    "images": dict(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_matches_transformers(small_tokenizer_dir, tok, name, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(small_tokenizer_dir / "tokenizer.json"), bos_token="<bos>",
                                 eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = default_template()
    conv = CONVERSATIONS[name]
    kwargs = {k: v for k, v in conv.items() if k not in ("messages", "tools")}
    want = hf.apply_chat_template(conv["messages"], tools=conv.get("tools"), tokenize=False,
                                  add_generation_prompt=add_generation_prompt, **kwargs)
    want_ids = hf.apply_chat_template(conv["messages"], tools=conv.get("tools"), tokenize=True,
                                      add_generation_prompt=add_generation_prompt, return_dict=False, **kwargs)
    ours = ChatTemplate.from_dir(small_tokenizer_dir, tok.special_tokens_map())
    got = ours.render(conv["messages"], conv.get("tools"), add_generation_prompt, **kwargs)
    assert got == want
    assert tok.encode(got) == list(want_ids)


def test_template_format_details(small_tokenizer_dir, tok):
    t = ChatTemplate.from_dir(small_tokenizer_dir, tok.special_tokens_map())
    off = t.render([{"role": "user", "content": "Hi"}], None, True)
    assert off == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    on = t.render([{"role": "user", "content": "Hi"}], None, True, enable_thinking=True)
    assert on == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    hist = t.render(CONVERSATIONS["system_multi_turn"]["messages"], None, True)
    assert "plan it" not in hist and "Hello!<turn|>" in hist  # earlier thinking stripped
    tools = t.render(CONVERSATIONS["tools_round_trip"]["messages"], TOOLS, True)
    assert '<|tool>declaration:get_weather{description:<|"|>Current weather in a city<|"|>,parameters:' in tools
    assert "type:<|\"|>STRING<|\"|>" in tools
    assert tools.endswith('<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
                          '<|tool_response>response:get_weather{condition:<|"|>snowy<|"|>,temperature:-3}'
                          "<tool_response|>")  # the model continues its turn after the tool result


def test_openai_messages_are_normalised():
    msgs = normalize_messages([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "reasoning_content": "hidden",
         "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"k": [1, 2]}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": '{"ok": true}'},
        {"role": "tool", "tool_call_id": "a", "content": "plain text"}])
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"k": [1, 2]} and "reasoning_content" not in msgs[1]
    assert msgs[2]["name"] == "f" and msgs[2]["response"] == {"ok": True} and msgs[3]["response"] == "plain text"
    for bad, msg in [([], "non-empty"), ([{"role": "robot", "content": "x"}], "role"),
                     ([{"role": "user", "content": 3}], "content"),
                     ([{"role": "tool", "content": "x"}], "tool_call_id"),
                     ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
                      "not valid JSON")]:
        with pytest.raises(ChatError, match=msg):
            normalize_messages(bad)
    with pytest.raises(ChatError, match="required"):
        validate_tools([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {}, "required": ["x"]}}}])


# -- the Gemma 4 value syntax and the incremental parser -----------------------------------------------
keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
safe_text = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=12)
scalars = st.one_of(safe_text, st.integers(-10**6, 10**6), st.booleans(), st.none(),
                    st.floats(allow_nan=False, allow_infinity=False, width=32).map(float))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(keys, c, max_size=3)),
                      max_leaves=8)
calls = st.tuples(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), st.dictionaries(keys, values, max_size=4))


@given(calls)
def test_syntax_round_trip(call):
    name, args = call
    assert parse_call(format_call(name, args)) == (name, args)
    assert parse_value(format_value(args)) == args


def _chunks(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def _parse(chunks):
    p = OutputParser()
    out = [d for c in chunks for d in p.feed(c)] + p.finish()
    content = "".join(d.text for d in out if d.kind == "content")
    reasoning = "".join(d.text for d in out if d.kind == "reasoning")
    return out, content, reasoning


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(calls, safe_text, safe_text, st.lists(st.integers(0, 10**6), max_size=12))
def test_parser_round_trip_under_every_chunking(call, thought, answer, cuts):
    name, args = call
    text = (f"{T.CHANNEL_OPEN}thought\n{thought}{T.CHANNEL_CLOSE}{answer}"
            f"{T.CALL_OPEN}{format_call(name, args)}{T.CALL_CLOSE}{T.RESPONSE_OPEN}")
    out, content, reasoning = _parse(_chunks(text, cuts))
    calls_out = [d.call for d in out if d.kind == "tool_call"]
    assert [(c.name, c.arguments) for c in calls_out] == [(name, args)]
    assert content == answer and reasoning == thought
    assert not any(d.kind == "tool_call_error" for d in out)


MARKER_SOUP = st.lists(st.sampled_from(list(T.__dict__[k] for k in (
    "TURN_OPEN", "TURN_CLOSE", "CHANNEL_OPEN", "CHANNEL_CLOSE", "CALL_OPEN", "CALL_CLOSE", "RESPONSE_OPEN",
    "QUOTE", "EOS", "PAD")) + ["call:", "f{", "}", "x", "<", "|", ">", "thought\n", "a:1", ","]), max_size=30)


@settings(max_examples=300)
@given(MARKER_SOUP, st.lists(st.integers(0, 10**6), max_size=10))
def test_parser_never_crashes_or_leaks_markers(pieces, cuts):
    text = "".join(pieces)
    out, content, reasoning = _parse(_chunks(text, cuts))
    for m in ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
              "<eos>", "<pad>"):
        assert m not in content and m not in reasoning


def test_malformed_call_is_an_error_and_text():
    out, content, _ = _parse([f"ok {T.CALL_OPEN}call:get_weather{{city:Paris", f"}}{T.CALL_CLOSE} done"])
    err = [d for d in out if d.kind == "tool_call_error"]
    assert len(err) == 1 and "malformed" in err[0].error
    assert content == "ok call:get_weather{city:Paris} done"
    out, content, _ = _parse([f"{T.CALL_OPEN}call:f{{a:1"])  # cut off
    assert [d.kind for d in out] == ["tool_call_error", "content"] and "cut off" in out[0].error


# -- detokenisation, stop strings, thinking budget --------------------------------------------------------
@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=40), st.lists(st.integers(1, 4), max_size=20))
def test_incremental_decoding_never_breaks_a_character(tok, text, sizes):
    ids = tok.encode(text)
    dec, out, i = IncrementalDecoder(tok), [], 0
    for n in sizes + [len(ids)]:
        piece = dec.feed(ids[i:i + n])
        assert "\ufffd" not in piece
        out.append(piece)
        i += n
    out.append(dec.flush())
    assert "".join(out) == tok.decode(ids)


def test_multibyte_split_token_by_token(tok):
    text = "ñandú 🍕 ж ψ 한국 ünïcödé"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters really are split across tokens
    dec = IncrementalDecoder(tok)
    pieces = [dec.feed([i]) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text


@given(st.text(min_size=1, max_size=30), st.sampled_from(["STOP", "\n\n", "é!", "abc"]),
       st.lists(st.integers(0, 10**6), max_size=8))
def test_stop_string_cuts_exactly_across_chunks(prefix, stop, cuts):
    text = prefix + stop + "tail that must not appear"
    m = StopMatcher([stop])
    got = "".join(m.feed(c) for c in _chunks(text, cuts)) + m.flush()
    assert m.stopped and got == text[:text.find(stop)]
    m = StopMatcher([stop])
    clean = prefix.replace(stop, "").replace(stop[0], "")
    assert "".join(m.feed(c) for c in _chunks(clean, cuts)) + m.flush() == clean and not m.stopped


def test_text_stream_stop_string_spanning_canvases(tok):
    ids = tok.encode("Hello there, general Kenobi. More text.")
    s = TextStream(tok, stop=["general Ke"])
    first, second = ids[:4], ids[4:]
    assert s(first) is None
    action = s(second)
    assert action is not None and action.finish_reason == "stop"
    s.finish()
    assert s.content == "Hello there, "
    assert tok.decode(first + second[:action.keep]).startswith("Hello there, general Ke")


def test_thinking_budget_closes_the_channel(tok):
    ids = tok.encode("<|channel>thought\n") + tok.encode(" a b c d e f g h i j k l")
    s = TextStream(tok, thinking_budget=5)
    action = s(ids)
    assert action is not None and action.finish_reason is None
    assert action.append == (tok.token_id("<channel|>"),)
    assert s.thought_tokens == 5 and not s.in_thought
    assert s(tok.encode("The answer.<turn|>")) is None
    s.finish()
    assert s.content == "The answer." and len(tok.encode(s.reasoning)) <= 6


def test_text_stream_collects_tool_calls_and_reasoning(tok):
    text = (f"{T.CHANNEL_OPEN}thought\nneed weather{T.CHANNEL_CLOSE}{T.CALL_OPEN}call:get_weather"
            f"{{city:<|\"|>Oslo<|\"|>}}{T.CALL_CLOSE}{T.RESPONSE_OPEN}")
    s = TextStream(tok)
    s(tok.encode(text))
    s.finish()
    assert s.reasoning == "need weather" and s.content == ""
    assert [(c.name, c.arguments) for c in s.calls] == [("get_weather", {"city": "Oslo"})]
    assert json.loads(s.calls[0].arguments_json()) == {"city": "Oslo"}
