"""`diffusiongemma eval`: held-out evaluation of a model on the task families, with the default sampler.

Per family (items from evaluation seeds never used in training): exact-match accuracy of the
answer, tokens per forward and steps per canvas; for `tools`, the valid-tool-call rate (one call that
parses, with the expected name and arguments) and the exact match of the answer given the tool's
result; and the held-out loss on the text corpus (diffusion loss and the encoder's next-token loss).
Prints one table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ..engine import CommitEvent, Engine, SamplingParams
from ..text.bundle import TextModel
from ..text.stream import TextStream
from . import tasks
from .vision_tasks import QUESTION_TYPES, image_example


def _generate(engine: Engine, tm: TextModel, turns, params: SamplingParams) -> list[tuple[TextStream, object]]:
    """Run many single-turn generations through the engine together; returns (stream, stats) per turn."""
    streams, ids = [], []
    for turn in turns:
        s = TextStream(tm.tokenizer)
        prompt, images = tm.chat_inputs(turn.messages, turn.tools, turn.thinking)
        ids.append(engine.add(prompt, params, hook=s, images=images))
        streams.append(s)
    stats = {}
    for ev in engine.stream():
        if isinstance(ev, CommitEvent) and ev.finish_reason is not None:
            stats[ev.request_id] = ev.stats
    for s in streams:
        s.finish()
    return [(s, stats[i]) for s, i in zip(streams, ids)]


def evaluate(tm: TextModel, n: int = 50, families=tasks.FAMILIES, seed: int = 0, max_tokens: int = 256,
             text_items: int = 64, progress: bool = True) -> dict:
    engine = Engine.from_checkpoint(tm.checkpoint, extra_soft_ids=tm.engine_soft_ids(), max_batch=16)
    results: dict[str, dict] = {}
    if tm.sees and not any(f.startswith("image_") for f in families):
        families = list(families) + [f"image_{q}" for q in QUESTION_TYPES]
    for family in families:
        t0 = time.perf_counter()
        seeds = [tasks.EVAL_SEEDS.start + seed * 100_000 + i for i in range(n)]
        if family.startswith("image_"):
            examples = [image_example(family.removeprefix("image_"), s) for s in seeds]
        else:
            examples = [tasks.make_example(family, s) for s in seeds]
        params = lambda i: SamplingParams(max_tokens=max_tokens, seed=seed * 1_000_003 + i)  # noqa: E731
        first = _generate(engine, tm, [ex.turns[0] for ex in examples], params(0))
        tpf = [st.tokens_per_forward for _, st in first]
        spc = [x for _, st in first for x in st.steps_per_canvas]
        row: dict = {"n": n}
        if family == "tools":
            valid = [len(s.calls) == 1 and not s.errors and s.calls[0].name == ex.call["name"]
                     and s.calls[0].arguments == ex.call["arguments"] for (s, _), ex in zip(first, examples)]
            second = _generate(engine, tm, [ex.turns[1] for ex in examples], params(1))
            tpf += [st.tokens_per_forward for _, st in second]
            spc += [x for _, st in second for x in st.steps_per_canvas]
            correct = [s.content.strip() == ex.answer for (s, _), ex in zip(second, examples)]
            row["valid_tool_calls"] = sum(valid) / n
            row["exact_match"] = sum(correct) / n
            row["exact_match_end_to_end"] = sum(v and c for v, c in zip(valid, correct)) / n
        else:
            row["exact_match"] = sum(s.content.strip() == ex.answer for (s, _), ex in zip(first, examples)) / n
        row["tokens_per_forward"] = statistics.mean(tpf)
        row["steps_per_canvas_mean"] = statistics.mean(spc)
        row["steps_per_canvas_median"] = statistics.median(spc)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results[family] = row
        if progress:
            print(f"  {family}: {row}", file=sys.stderr)
    results["text"] = text_loss(tm, text_items, seed)
    return results


@torch.no_grad()
def text_loss(tm: TextModel, items: int, seed: int) -> dict:
    """Mean diffusion loss and next-token loss of held-out continuations (seeded noise draws)."""
    if items <= 0:
        return {}
    from .corpus import CorpusError, split_corpus
    from .data import render_turn
    from .objective import ObjectiveConfig, compute_loss, make_batch

    try:
        passages = split_corpus()["eval"]
    except CorpusError as e:
        return {"error": str(e)}
    model = tm.checkpoint.model
    pairs = [render_turn(tm.template, tm.tokenizer, tasks.make_example("text", i, passages).turns[0])
             for i in range(tasks.EVAL_SEEDS.start, tasks.EVAL_SEEDS.start + items)]
    # the next-token loss of the continuation (the response), not of the prompt's opening words
    cfg = ObjectiveConfig(tm.checkpoint.config.canvas_length, self_cond_prob=0.0, ar_scope="response")
    diff, ar = [], []
    for i in range(0, len(pairs), 16):
        g = torch.Generator().manual_seed(seed + i)
        batch = make_batch(pairs[i:i + 16], cfg, model.config.vocab_size, tm.tokenizer.require_id("<eos>"),
                           tm.tokenizer.require_id("<pad>"), g)
        _, parts = compute_loss(model, batch, cfg)
        diff.append(parts["diffusion"])
        ar.append(parts["ar"])
    return {"items": len(pairs), "diffusion_loss": statistics.mean(diff), "ar_loss": statistics.mean(ar)}


def format_table(res: dict) -> str:
    lines = [f"{'family':12} {'exact match':>11} {'valid calls':>11} {'tok/forward':>11} {'steps/canvas':>13}"]
    for fam, r in res.items():
        if fam == "text":
            continue
        vc = f"{r['valid_tool_calls']:.1%}" if "valid_tool_calls" in r else "-"
        lines.append(f"{fam:12} {r['exact_match']:>11.1%} {vc:>11} {r['tokens_per_forward']:>11.2f} "
                     f"{r['steps_per_canvas_mean']:>7.1f} (med {r['steps_per_canvas_median']:.0f})")
    t = res.get("text", {})
    if "diffusion_loss" in t:
        lines.append(f"held-out text ({t['items']} passages): diffusion loss {t['diffusion_loss']:.3f}, "
                     f"next-token loss {t['ar_loss']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from ..cli.common import add_model_args, load_text_model, positive_int, run_cli

    def _main(argv):
        ap = argparse.ArgumentParser(prog="diffusiongemma eval", description=__doc__.split("\n\n")[0])
        add_model_args(ap)
        ap.add_argument("--n", type=positive_int, default=50, help="held-out items per family")
        ap.add_argument("--families", default=",".join(tasks.FAMILIES), help="comma-separated families")
        ap.add_argument("--seed", type=int, default=0, help="evaluation seed (items and sampling)")
        a = ap.parse_args(argv)
        fams = [f for f in a.families.split(",") if f]
        bad = set(fams) - set(tasks.FAMILIES) - {f"image_{q}" for q in QUESTION_TYPES}
        if bad:
            ap.error(f"unknown families: {sorted(bad)}")
        tm = load_text_model(a)
        res = evaluate(tm, a.n, fams, a.seed)
        print(format_table(res))
        print(json.dumps({"eval": res, "model": str(tm.checkpoint.path)}))
        return 0

    return run_cli("diffusiongemma eval", _main, argv)
