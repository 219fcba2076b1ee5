"""lm-evaluation-harness tasks over the shipped model's task families, from local data (no download).

    python -m diffusiongemma.training.harness /tmp/dg-tasks --n 100      # writes dg_<family>.{jsonl,yaml}
    diffusiongemma serve &
    lm_eval --model local-chat-completions --apply_chat_template --include_path /tmp/dg-tasks \\
        --tasks dg_sort,dg_reverse,dg_count,dg_arithmetic \\
        --model_args model=diffusiongemma-tiny,base_url=http://127.0.0.1:8000/v1/chat/completions,seed=0,tokenized_requests=False

The items are those `diffusiongemma eval` scores (the same evaluation seeds), the harness sends each with
seed 0 and temperature 1 (the released schedule), and scores exact match after trimming whitespace, as
`eval` does: the two give the same accuracy on the same items (tested).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import tasks

FAMILIES = ("arithmetic", "sort", "reverse", "count")  # single-turn, answered in text


def items(family: str, n: int, seed: int = 0) -> list[dict]:
    """The held-out items `evaluate` scores for a family (same seeds), as question / answer / thinking."""
    out = []
    for i in range(n):
        ex = tasks.make_example(family, tasks.EVAL_SEEDS.start + seed * 100_000 + i)
        turn = ex.turns[0]
        (msg,) = turn.messages
        out.append({"question": msg["content"], "answer": ex.answer, "thinking": turn.thinking})
    return out


def write_tasks(out: str | Path, n: int = 100, seed: int = 0, families=FAMILIES) -> list[str]:
    """dg_<family>.jsonl (the items) and dg_<family>.yaml (the task) for each family; returns the task names."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for family in families:
        rows = items(family, n, seed)
        data = out / f"dg_{family}.jsonl"
        data.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
        gen = {"until": [], "max_gen_toks": 256, "temperature": 1.0, "enable_thinking": rows[0]["thinking"]}
        task = {
            "task": f"dg_{family}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}", "generation_kwargs": gen,
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
            "metadata": {"version": 1.0},
        }
        (out / f"dg_{family}.yaml").write_text(json.dumps(task, indent=2) + "\n")  # JSON is YAML
        names.append(f"dg_{family}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="directory to write the tasks into")
    ap.add_argument("--n", type=int, default=100, help="items per family")
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (as diffusiongemma eval --seed)")
    a = ap.parse_args(argv)
    names = write_tasks(a.out, a.n, a.seed)
    print(f"wrote {', '.join(names)} to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
