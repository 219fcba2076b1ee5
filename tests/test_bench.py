"""The benchmark command and the GPU readiness script, in their small CPU modes (so they cannot rot).
No timing is asserted: speed is measured by `diffusiongemma bench`, not by tests."""

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch

from diffusiongemma.bench.gpu import run as gpu_run


def test_gpu_readiness_script_cpu_mode():
    res = gpu_run("tiny", torch.device("cpu"), torch.bfloat16, prompt=16, repeats=2)
    for key in ("ms_decoder_forward", "ms_sampler_step", "ms_commit_forward", "projected_tok_s_at_15",
                "projected_tok_s_at_20", "bandwidth_bound_tok_s_at_15", "bandwidth_GBps", "ms_static_step"):
        assert res[key] > 0, key
    assert res["canvas"] == 32 and res["weights_GB"] > 0 and res["cuda_graph"] is False


@pytest.mark.slow
def test_bench_command_runs_both_sides(tmp_path):
    from diffusiongemma.loader.random_weights import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "tiny", "tiny", torch.bfloat16)
    r = subprocess.run([sys.executable, "-m", "diffusiongemma", "bench", "--model", str(path), "--repeats", "1",
                        "--prompts", "1", "--mode", "fixed", "--steps", "2"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])["bench"]
    for side in ("ours", "reference"):
        assert res[side]["tokens_per_s"] > 0 and res[side]["steps_per_canvas"] == 2
    assert res["ratio"]["ms_step"] > 0 and "tokens/s" in r.stdout
    # the default dtype is this CPU's faster one, measured and said once, and both sides ran in it
    from diffusiongemma.loader.host import preferred_dtype

    assert res["env"]["dtype"] == str(preferred_dtype()).removeprefix("torch.") and res["env"]["cpu_capability"]
    assert f"dtype {res['env']['dtype']} (this CPU" in r.stderr


@pytest.mark.slow
def test_bench_same_draws_gives_both_sides_the_same_forwards(tmp_path):
    """--same-draws: the reference draws the engine's keyed random numbers, so in adaptive mode (where
    different draws stop canvases after different step counts) both sides run the same forwards (fp32)."""
    from diffusiongemma.loader.random_weights import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "tiny", "tiny", torch.float32)
    r = subprocess.run([sys.executable, "-m", "diffusiongemma", "bench", "--model", str(path), "--repeats", "1",
                        "--prompts", "2", "--mode", "adaptive", "--dtype", "float32", "--same-draws"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])["bench"]
    ours, ref = res["runs"]["ours"][0], res["runs"]["reference"][0]
    assert ours["forwards"] == ref["forwards"] and ours["tokens"] == ref["tokens"]
    assert res["env"]["same_draws"] and "same draws" in r.stdout


@pytest.mark.slow
def test_head_memory_bench_shows_the_tiled_loss_holds_no_logits():
    from diffusiongemma.bench.head_memory import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["--vocab", "65536", "--rows", "256", "--hidden", "32", "--repeats", "1"])
    rows = {r["which"]: r for r in json.loads(buf.getvalue().strip().splitlines()[-1])["head_memory"]}
    assert rows["tiled"]["loss"] == pytest.approx(rows["reference"]["loss"], abs=1e-5)
    # the full-logits path keeps several [256 x 65536] fp32 tensors (64 MiB each) for its backward pass
    assert rows["reference"]["beyond_grads_MiB"] > 3 * 64
    assert rows["tiled"]["beyond_grads_MiB"] < 32


@pytest.mark.slow
def test_structured_output_bench_runs_and_every_bounded_constrained_answer_validates():
    from diffusiongemma.bench.structured import run

    rows = run(None, seeds=1, max_tokens=64)
    constrained = {r["kind"]: r for r in rows if r["constrained"]}
    assert len(constrained) == 7 and all(r["requests"] == 6 for r in constrained.values())
    for kind, r in constrained.items():
        if kind != "unbounded number":  # the model can write its digits until max_tokens runs out
            assert r["valid"] == r["requests"], r
        assert r["finish"].get("stop", 0) <= r["valid"]  # nothing invalid ever ends with stop


@pytest.mark.parametrize("curve,extra", [
    ("context", ["--contexts", "0,40,100", "--ref-max-context", "40"]),
    ("concurrency", ["--concurrency", "1,3", "--ref-max-batch", "3"]),
    ("canvases", ["--canvases", "1,2", "--repeats", "1"]),
    ("prefix", ["--system-tokens", "40", "--turn-tokens", "8", "--repeats", "1"]),
])
def test_curves_write_a_table_json_and_a_chart(tmp_path, curve, extra):
    """Each curve runs end to end on a tiny random checkpoint (both sides where it has two) and writes its JSON
    and PNG; the prefix curve's tokens are the same with and without the cache (its exit status says so)."""
    from diffusiongemma.bench.run import main
    from diffusiongemma.loader.random_weights import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "tiny", "tiny", torch.float32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["--model", str(path), "--dtype", "float32", "--curve", curve, "--steps", "1",
                   "--out", str(tmp_path / "o"), *extra])
    assert rc == 0
    rec = json.loads((tmp_path / "o" / f"{curve}.json").read_text())
    assert rec["curve"] == curve and (tmp_path / "o" / f"{curve}.png").stat().st_size > 1000
    assert json.loads(out.getvalue().strip().splitlines()[-1])["curve"] == curve
    if curve == "context":
        assert [x["context"] for x in rec["ours"]] == [0, 40, 100] and [x["context"] for x in rec["reference"]] == [0, 40]
        assert all(x["ms_step"]["median"] > 0 for x in rec["ours"] + rec["reference"])
        # the tiny model's sliding window is 64: past it only the global layer grows
        per = [x["kv_bytes_per_token"] for x in rec["ours"][1:]]
        assert per[1] < per[0]
    elif curve == "concurrency":
        assert set(rec["series"]) == {"engine", "engine packed", "reference lock-step"}
        assert all(p["tokens_per_s"] > 0 for pts in rec["series"].values() for p in pts)
    elif curve == "prefix":
        assert rec["same_tokens"] and rec["turns"][1]["cached_tokens"] >= 32
