"""The server with the shipped model and the official openai client: a tool call and its result fed
back, reasoning content apart from the answer, images as data: URLs, a corrupt image."""

import base64
import io
import json

import openai
import pytest

from diffusiongemma.training.tasks import TOOLS
from diffusiongemma.training.vision_tasks import make_image_example
from server_utils import running_server


@pytest.fixture(scope="module")
def client(shipped_model_dir):
    with running_server(shipped_model_dir) as (url, app):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300), app.state.model_name


def test_tool_call_round_trip(client):
    c, name = client
    msgs = [{"role": "user", "content": "What is the weather in Oslo?"}]
    r = c.chat.completions.create(model=name, messages=msgs, tools=TOOLS, seed=1, max_tokens=64,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    assert "<|" not in (choice.message.content or "")
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 7, "condition": "rainy"})}]
    r2 = c.chat.completions.create(model=name, messages=msgs, tools=TOOLS, seed=2, max_tokens=64)
    assert r2.choices[0].finish_reason in ("stop", "length") and isinstance(r2.choices[0].message.content, str)
    # streamed: the call arrives as a tool_calls delta, never as raw markers
    chunks = list(c.chat.completions.create(model=name, messages=msgs[:1], tools=TOOLS, seed=1, max_tokens=64,
                                            stream=True, tool_choice={"type": "function",
                                                                      "function": {"name": "get_weather"}}))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert any(d.tool_calls for d in deltas)
    assert not any("<|" in (d.content or "") for d in deltas)


def test_reasoning_content_is_apart(client):
    c, name = client
    r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is 12 + 30?"}], seed=0,
                                  max_tokens=128, extra_body={"enable_thinking": True})
    msg = r.choices[0].message
    assert msg.model_extra.get("reasoning_content"), msg
    assert "<|channel>" not in (msg.content or "") and "thought" not in (msg.content or "")[:8]


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_images_as_data_urls(client):
    c, name = client
    img, q, _ = make_image_example("shape", 11)
    r = c.chat.completions.create(model=name, seed=0, max_tokens=16, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(img)}}, {"type": "text", "text": q}]}])
    assert isinstance(r.choices[0].message.content, str) and r.usage.prompt_tokens > 40
    bad = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=name, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": q}]}])
    assert "invalid image" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="network URLs"):
        c.chat.completions.create(model=name, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert c.models.list().data  # still serving


def test_response_format_json_schema(client):
    import jsonschema

    c, name = client
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Paris"]}, "temp": {"type": "integer",
              "minimum": -30, "maximum": 40}}, "required": ["city", "temp"], "additionalProperties": False}
    r = c.chat.completions.create(model=name, seed=0, max_tokens=32, messages=[{"role": "user", "content": "Weather?"}],
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "w", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert r.usage.model_extra["diffusion"]["accepted_per_canvas"] is not None  # verified (speculatively)
    for bad, msg in (({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "frob"}}}, "not supported"),
                     ({"type": "yaml"}, "response_format.type")):
        with pytest.raises(openai.BadRequestError, match=msg) as e:
            c.chat.completions.create(model=name, max_tokens=8, messages=[{"role": "user", "content": "x"}],
                                      response_format=bad)
        assert e.value.body["param"] == "response_format"
