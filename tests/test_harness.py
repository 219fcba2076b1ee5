"""lm-evaluation-harness (`lm_eval --model local-chat-completions`) against the server, on tasks written
from the shipped model's generators: the same accuracy as `diffusiongemma eval` on the same items."""

import json
import os
import subprocess
import sys

import pytest

from server_utils import running_server


@pytest.mark.slow
def test_lm_eval_against_the_server_scores_as_diffusiongemma_eval(shipped_model_dir, tmp_path):
    import diffusiongemma as dg
    from diffusiongemma.training.evaluate import evaluate
    from diffusiongemma.training.harness import write_tasks

    families, n = ("sort", "reverse", "count"), 6
    names = write_tasks(tmp_path / "tasks", n=n, families=families)
    ours = evaluate(dg.load(shipped_model_dir), n, families, text_items=0, progress=False)
    with running_server(shipped_model_dir) as (url, app):
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-chat-completions",
                            "--apply_chat_template", "--include_path", str(tmp_path / "tasks"), "--tasks",
                            ",".join(names), "--output_path", str(tmp_path / "out"), "--model_args",
                            f"model={app.state.model_name},base_url={url}/v1/chat/completions,seed=0,"
                            "tokenized_requests=False,num_concurrent=2"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    scores = json.loads(result.read_text())["results"]
    for family in families:
        assert scores[f"dg_{family}"]["exact_match,none"] == pytest.approx(ours[family]["exact_match"]), family
