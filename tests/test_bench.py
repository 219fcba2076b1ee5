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
