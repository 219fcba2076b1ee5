"""The server with the official openai client on loopback: chat, completions, streaming with and
without draft frames, errors as OpenAI error objects, limits, cancellation."""

import json
import time

import httpx
import openai
import pytest

from server_utils import idle, running_server


@pytest.fixture(scope="module")
def server(tiny_text_model_dir):
    with running_server(tiny_text_model_dir, max_concurrent=4, max_tokens=512, max_prompt_tokens=400,
                        max_body_bytes=20_000) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def name(server):
    return server[1].state.model_name


SMALL = dict(max_tokens=24, seed=1, extra_body={"max_denoising_steps": 4})


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [server[1].state.model_name]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_chat_completion_with_usage_and_diffusion_stats(client, name):
    r = client.chat.completions.create(model=name,
                                       messages=[{"role": "user", "content": "Sort: 3 1 2"}], **SMALL)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 0
    diff = r.usage.model_extra["diffusion"]
    assert diff["decoder_forwards"] >= 1 and diff["steps_per_canvas"] > 0
    # tokens per forward counts the non-pad committed tokens (as the reference does): at most all of them
    assert 0 < diff["tokens_per_forward"] <= r.usage.completion_tokens / diff["decoder_forwards"] + 1e-3


@pytest.mark.parametrize("decoding", ["speculative", "autoregressive"])
def test_decoding_modes(client, name, decoding):
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Sort: 3 1 2"}], max_tokens=20,
                                       seed=1, extra_body={"decoding": decoding})
    diff = r.usage.model_extra["diffusion"]
    assert r.usage.completion_tokens <= 20 and diff["commit_forwards"] >= 1 and diff["tokens_per_pass"] > 0
    assert (diff["accepted_per_canvas"] is not None) == (decoding == "speculative")
    assert (diff["decoder_forwards"] == 0) == (decoding == "autoregressive")


def test_max_tokens_is_exact(client, name):
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Go on forever"}], model=name,
                                       max_tokens=7, seed=2, extra_body={"max_denoising_steps": 2})
    assert r.usage.completion_tokens <= 7
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 7


def test_streaming_parses_in_the_official_client(client, name):
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], model=name,
                                                 stream=True, stream_options={"include_usage": True}, **SMALL))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage is not None and not chunks[-1].choices
    assert not any(getattr(c, "draft", None) for c in chunks)  # no drafts unless asked


def test_draft_frames_are_opt_in(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 20, "seed": 3,
            "max_denoising_steps": 3, "stream_options": {"include_draft": True}}
    frames = []
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                j = json.loads(line[6:])
                if "draft" in j:
                    frames.append(j["draft"])
    assert frames and frames[0]["step"] == 0 and len(frames[0]["tokens"]) == 16
    f = frames[0]
    assert len(f["accepted"]) == len(f["entropy"]) == 16 and isinstance(f["temperature"], float)


def test_completions_endpoint(client, name):
    r = client.completions.create(model=name, prompt="Once upon a time", max_tokens=10, seed=4,
                                  extra_body={"max_denoising_steps": 2})
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens <= 10
    s = list(client.completions.create(model=name, prompt="Once", max_tokens=6, seed=4, stream=True,
                                       extra_body={"max_denoising_steps": 2}))
    assert s[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs,status,param", [
    (dict(n=2), 400, "n"),
    (dict(logprobs=True), 400, "logprobs"),
    (dict(extra_body={"frobnicate": 1}), 400, "frobnicate"),
    (dict(temperature=5), 400, "temperature"),
    (dict(max_tokens=10_000), 400, "max_tokens"),
    (dict(extra_body={"t_max": 0.1, "t_min": 0.3}), 400, "t_max"),
    (dict(model="no-such-model"), 404, "model"),
    (dict(extra_body={"decoding": "fast"}), 400, "decoding"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice"),
    (dict(response_format={"type": "xml"}), 400, "response_format"),
    (dict(extra_body={"ar_temperature": -1}), 400, "ar_temperature"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {"name": ""}}]), 400,
     "tools"),
    (dict(messages=[{"role": "user", "content": "x " * 2000}]), 400, "messages"),
])
def test_bad_requests_get_openai_errors(client, name, kwargs, status, param):
    args = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    args.update(kwargs)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == status
    err = e.value.body if isinstance(e.value.body, dict) else {}
    err = err.get("error", err)
    assert err.get("param") == param, err
    assert err.get("message")


def test_invalid_json_and_oversized_body(server):
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]["message"]
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{" + b" " * 30_000 + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server[0] + "/v1/chat/completions", json={"messages": "hello"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # and the server still serves
    assert httpx.get(server[0] + "/health").status_code == 200


def test_disconnect_cancels_and_frees(server):
    runner = server[1].state.runner
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 500, "seed": 5,
            "stop": [], "max_denoising_steps": 48}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
    assert idle(runner)


def test_too_many_in_flight_is_a_429_with_retry_after(server):
    """Four long streams fill the server's limit of 4; a fifth request is a 429. The four then hang up (the
    server cancels them: test_disconnect_cancels_and_frees), so the test does not wait out 400 tokens each."""
    import threading

    url, app = server
    runner = app.state.runner
    long = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "stop": [], "seed": 9,
            "max_denoising_steps": 48, "confidence_threshold": 1e-30, "stream": True}
    done = threading.Event()

    def hold():
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, timeout=120) as r:
            lines = r.iter_lines()  # held: a dropped line iterator closes the response
            next(lines)
            done.wait(120)

    threads = [threading.Thread(target=hold) for _ in range(4)]  # the server's limit is 4
    for t in threads:
        t.start()
    try:
        for _ in range(500):
            if runner.in_flight >= 4:
                break
            time.sleep(0.02)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        done.set()
        for t in threads:
            t.join()
    assert idle(runner)


def test_metrics_and_the_request_log(server, client, name, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="diffusiongemma.requests")
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], **SMALL)
    httpx.post(server[0] + "/v1/chat/completions", json={"messages": "x"})
    text = httpx.get(server[0] + "/metrics").text
    assert 'diffusiongemma_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'diffusiongemma_requests_total{route="/v1/chat/completions",status="400"}' in text
    for metric in ("diffusiongemma_generated_tokens_total", "diffusiongemma_decoder_forwards_total",
                   "diffusiongemma_tokens_per_forward_bucket", "diffusiongemma_steps_per_canvas_bucket",
                   "diffusiongemma_time_to_first_token_seconds_bucket", "diffusiongemma_engine_step_seconds_bucket",
                   "diffusiongemma_in_flight", "diffusiongemma_waiting", "diffusiongemma_kv_cache_bytes"):
        assert metric in text, metric
    tokens = next(float(x.split()[-1]) for x in text.splitlines() if x.startswith("diffusiongemma_generated_tokens_total"))
    assert tokens > 0
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "diffusiongemma.requests"]
    ok = next(x for x in lines if x["status"] == 200)
    assert ok["path"] == "/v1/chat/completions" and ok["completion_tokens"] > 0 and ok["id"].startswith("req-")
    assert {"decoding", "finish_reason", "ttft_s", "seconds", "prompt_tokens"} <= set(ok)
    assert any(x["status"] == 400 for x in lines)


def test_the_next_turn_reuses_the_prefix_cache(server, client, name):
    """On by default: a second turn's prompt starts with the first's, reuses its blocks (usage says how many
    tokens), and /v1/models and /metrics report the cache."""
    messages = [{"role": "system", "content": "You sort numbers. " * 6},
                {"role": "user", "content": "Sort: 3 1 2"}]
    first = client.chat.completions.create(model=name, messages=messages, **SMALL)
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "Sort: 9 8 7"}]
    second = client.chat.completions.create(model=name, messages=messages, **SMALL)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < second.usage.prompt_tokens and cached % 16 == 0
    stats = httpx.get(server[0] + "/v1/models").json()["data"][0]["prefix_cache"]
    assert stats["hits"] >= 1 and stats["reused_tokens"] >= cached and 0 < stats["bytes"] <= stats["capacity_bytes"]
    assert stats["capacity_bytes"] == 1 << 30 and stats["block_size"] == 16
    assert "diffusiongemma_prefix_cache_reused_tokens" in httpx.get(server[0] + "/metrics").text


def test_page_is_served(server):
    r = httpx.get(server[0] + "/")
    assert r.status_code == 200 and "canvas" in r.text and "/static/app.js" in r.text
    assert httpx.get(server[0] + "/static/app.js").status_code == 200
    assert httpx.get(server[0] + "/static/../app.py").status_code == 404


def test_api_key_required_when_configured(tiny_text_model_dir):
    with running_server(tiny_text_model_dir, api_key="s3cret") as (url, _):
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/").status_code == 200  # the page itself is open: it asks for the key
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data
