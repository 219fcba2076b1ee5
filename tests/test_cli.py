"""The command line, run as a user runs it (a subprocess), on a complete random model directory."""

import json
import subprocess
import sys

import pytest


def run(*args, stdin=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "diffusiongemma", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_generate_json_with_statistics(tiny_text_model_dir):
    r = run("generate", "Sort: 3 1 2", "--model", str(tiny_text_model_dir), "--max-tokens", "20", "--seed", "1",
            "--json", "--steps", "4")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["finish_reason"] in ("length", "stop") and out["usage"]["completion_tokens"] <= 20
    st = out["stats"]
    assert st["decoder_forwards"] >= 1 and st["steps_per_canvas"] and "tokens_per_forward" in st


def test_generate_speculative_json(tiny_text_model_dir):
    r = run("generate", "Sort: 3 1 2", "--model", str(tiny_text_model_dir), "--max-tokens", "20", "--seed", "1",
            "--json", "--decoding", "speculative")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout.strip().splitlines()[-1])["stats"]
    assert st["accepted_per_canvas"] and st["steps_per_canvas"] == [1] * len(st["steps_per_canvas"])
    assert st["tokens_per_pass"] > 0


def test_generate_json_schema(tiny_text_model_dir, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = run("generate", "Give n", "--model", str(tiny_text_model_dir), "--max-tokens", "24", "--seed", "1", "--json",
            "--json-schema", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["finish_reason"] == "stop" and 0 <= json.loads(out["text"])["n"] <= 9
    assert out["stats"]["decoding"] == "speculative"
    (tmp_path / "bad.json").write_text(json.dumps({"type": "frob"}))
    r = run("generate", "x", "--model", str(tiny_text_model_dir), "--json-schema", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "response_format schema is not supported" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_generate_messages_file_thinking_and_canvas_view(tiny_text_model_dir, tmp_path):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]))
    r = run("generate", "--messages", str(msgs), "--model", str(tiny_text_model_dir), "--max-tokens", "16",
            "--seed", "2", "--think", "--show-canvas", "--steps", "3", "--thinking-budget", "4")
    assert r.returncode == 0, r.stderr
    assert "canvas 0 step  1" in r.stderr and "accepted" in r.stderr and "mean entropy" in r.stderr
    assert "tokens/forward" in r.stderr


def test_chat_keeps_history(tiny_text_model_dir):
    r = run("chat", "--model", str(tiny_text_model_dir), "--max-tokens", "8", "--seed", "3", "--steps", "2",
            stdin="Hello\n/think on\nWhat is 2 + 2?\n/reset\nBye\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("tokens/forward") == 3
    assert "(thinking on)" in r.stderr and "(history cleared)" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["generate", "hi", "--model", "/nonexistent/model"], "model directory /nonexistent/model does not exist"),
    (["generate", "--messages", "/nonexistent.json", "hi"], None),
    (["generate", "hi", "--steps", "0"], "argument --steps: max_denoising_steps must be a positive integer, got 0"),
    (["generate", "hi", "--t-max", "abc"], "argument --t-max: t_max must be a positive number, got 'abc'"),
    (["generate", "hi", "--t-max", "0.3", "--t-min", "0.5"], "t_max must be greater than t_min"),
    (["generate", "hi", "--thinking-budget", "-1"], "thinking_budget must be an integer >= 0, got -1"),
    (["generate", "hi", "--decoding", "fast"], "decoding must be one of diffusion, speculative, autoregressive"),
    (["chat", "--prefix-cache-mib", "-1"], "argument --prefix-cache-mib: expected a non-negative integer, got '-1'"),
    (["chat", "--prefix-block", "100000000"], "cannot hold one block: a block of 100000000 tokens takes"),
])
def test_bad_input_is_one_line_and_nonzero(tiny_text_model_dir, args, msg):
    if "--model" not in args:
        args += ["--model", str(tiny_text_model_dir)]
    r = run(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and ("error" in lines[-1])
    if msg:
        assert msg in r.stderr


def test_unreadable_messages_file(tiny_text_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run("generate", "--messages", str(bad), "--model", str(tiny_text_model_dir))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not valid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("generate", "--messages", str(tmp_path / "missing.json"), "--model", str(tiny_text_model_dir))
    assert r.returncode == 2 and "cannot read the messages file" in r.stderr


def test_serving_beyond_loopback_needs_a_key(tiny_text_model_dir):
    r = run("serve", "--model", str(tiny_text_model_dir), "--host", "0.0.0.0", "--port", "1")
    assert r.returncode == 2 and "needs --api-key (or --allow-no-key" in r.stderr


def test_serve_says_when_it_cannot_listen(tiny_text_model_dir):
    """`serve` runs HTTP on a thread and the engine loop on the main thread: a port in use still ends the
    command with one clear error (not a loop waiting forever)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("serve", "--model", str(tiny_text_model_dir), "--port", str(s.getsockname()[1]), timeout=120)
    assert r.returncode == 2 and "cannot listen on 127.0.0.1:" in r.stderr and "Traceback" not in r.stderr


def test_unknown_command():
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


@pytest.mark.parametrize("script,args", [("generate_ids.py", []), ("chat_stream.py", ["Reverse the list: a b c"])])
def test_examples_run(script, args):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / script
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokens per forward" in r.stdout or "stats:" in r.stdout
