"""Held-out evaluation of a model on the task families, with the default sampler (`diffusiongemma eval`).

Per family (items from evaluation seeds never used in training), once phrased as in training and
once with the held-out phrasings and lengths (`sort/heldout`): exact-match accuracy of the answer,
tokens per forward and steps per canvas; for `tools`, the valid-tool-call rate (one call that parses,
with the expected name and arguments) and the exact match of the answer given the tool's result; and
the held-out loss on the text corpus (diffusion loss and the encoder's next-token loss).
Prints one table and one JSON line.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from ..engine import SamplingParams
from ..generation import Generator, Result
from . import tasks
from .vision_tasks import QUESTION_TYPES, image_example


def _generate(gen: Generator, turns, params: SamplingParams) -> list[Result]:
    """Many single-turn generations batched together; their results in order."""
    return gen.run([gen.chat(t.messages, t.tools, t.thinking) for t in turns], params)


def evaluate(ck, n: int = 50, families=tasks.EVAL_FAMILIES, seed: int = 0, max_tokens: int = 256,
             text_items: int = 64, progress: bool = True, decoding: str = "diffusion") -> dict:
    """ck: a `load()`ed checkpoint with its tokenizer; decoding: the requests' decoding mode."""
    gen = Generator(ck, max_batch=16)
    results: dict[str, dict] = {}
    if ck.vision is not None and not any(f.startswith("image_") for f in families):
        families = list(families) + [f"image_{q}" for q in QUESTION_TYPES]
    for family in families:
        t0 = time.perf_counter()
        seeds = [tasks.EVAL_SEEDS.start + seed * 100_000 + i for i in range(n)]
        if family.startswith("image_"):
            examples = [image_example(family.removeprefix("image_"), s) for s in seeds]
        else:
            name = family.removesuffix(tasks.HELDOUT)
            examples = [tasks.make_example(name, s, heldout=name != family) for s in seeds]
        params = lambda i: SamplingParams(max_tokens=max_tokens, seed=seed * 1_000_003 + i,  # noqa: E731
                                          decoding=decoding)
        first = _generate(gen, [ex.turns[0] for ex in examples], params(0))
        done = list(first)
        row: dict = {"n": n}
        if family.startswith("tools"):
            valid = [len(r.tool_calls) == 1 and not r.tool_call_errors and r.tool_calls[0].name == ex.call["name"]
                     and r.tool_calls[0].arguments == ex.call["arguments"] for r, ex in zip(first, examples)]
            second = _generate(gen, [ex.turns[1] for ex in examples], params(1))
            done += second
            correct = [r.content.strip() == ex.answer for r, ex in zip(second, examples)]
            row["valid_tool_calls"] = sum(valid) / n
            row["exact_match"] = sum(correct) / n
            row["exact_match_end_to_end"] = sum(v and c for v, c in zip(valid, correct)) / n
        else:
            row["exact_match"] = sum(r.content.strip() == ex.answer for r, ex in zip(first, examples)) / n
        spc = [x for r in done for x in r.stats.steps_per_canvas]
        acc = [x for r in done for x in r.stats.accepted_per_canvas]
        row["tokens_per_forward"] = statistics.mean(r.stats.tokens_per_forward for r in done)
        row["tokens_per_pass"] = statistics.mean(r.stats.tokens_per_pass for r in done)
        row["answer_tokens_mean"] = statistics.mean(r.stats.completion_tokens for r in done)
        row["steps_per_canvas_mean"] = statistics.mean(spc) if spc else 0.0
        row["steps_per_canvas_median"] = statistics.median(spc) if spc else 0.0
        row["accepted_per_canvas"] = statistics.mean(acc) if acc else None
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results[family] = row
        if progress:
            print(f"  {family}: {row}", file=sys.stderr)
    results["text"] = text_loss(ck, text_items, seed)
    return results


@torch.no_grad()
def text_loss(ck, items: int, seed: int) -> dict:
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
    model, tok = ck.model, ck.tokenizer
    pairs = [render_turn(ck.template, tok, tasks.make_example("text", i, passages).turns[0])
             for i in range(tasks.EVAL_SEEDS.start, tasks.EVAL_SEEDS.start + items)]
    # the next-token loss of the continuation (the response), not of the prompt's opening words
    cfg = ObjectiveConfig(ck.config.canvas_length, self_cond_prob=0.0, ar_scope="response")
    diff, ar = [], []
    for i in range(0, len(pairs), 16):
        g = torch.Generator().manual_seed(seed + i)
        batch = make_batch(pairs[i:i + 16], cfg, model.config.vocab_size, tok.require_id("<eos>"),
                           tok.require_id("<pad>"), g)
        _, parts = compute_loss(model, batch, cfg)
        diff.append(parts["diffusion"])
        ar.append(parts["ar"])
    return {"items": len(pairs), "diffusion_loss": statistics.mean(diff), "ar_loss": statistics.mean(ar)}


def format_table(res: dict) -> str:
    lines = [f"{'family':18} {'exact match':>11} {'valid calls':>11} {'tok/forward':>11} {'tok/pass':>8} "
             f"{'accepted':>8} {'steps/canvas':>13}"]
    for fam, r in res.items():
        if fam == "text":
            continue
        vc = f"{r['valid_tool_calls']:.1%}" if "valid_tool_calls" in r else "-"
        acc = f"{r['accepted_per_canvas']:.1f}" if r.get("accepted_per_canvas") is not None else "-"
        lines.append(f"{fam:18} {r['exact_match']:>11.1%} {vc:>11} {r['tokens_per_forward']:>11.2f} "
                     f"{r['tokens_per_pass']:>8.2f} {acc:>8} "
                     f"{r['steps_per_canvas_mean']:>7.1f} (med {r['steps_per_canvas_median']:.0f})")
    t = res.get("text", {})
    if "diffusion_loss" in t:
        lines.append(f"held-out text ({t['items']} passages): diffusion loss {t['diffusion_loss']:.3f}, "
                     f"next-token loss {t['ar_loss']:.3f}")
    return "\n".join(lines)


def format_side_by_side(by_mode: dict[str, dict]) -> str:
    """Exact match and tokens per pass of several decoding modes, one row per family."""
    modes = list(by_mode)
    head = f"{'family':18}" + "".join(f" {m[:14]:>14} {'tok/pass':>8}" for m in modes)
    lines = [head]
    for fam in next(iter(by_mode.values())):
        if fam == "text":
            continue
        lines.append(f"{fam:18}" + "".join(f" {by_mode[m][fam]['exact_match']:>14.1%} "
                                           f"{by_mode[m][fam]['tokens_per_pass']:>8.2f}" for m in modes))
    return "\n".join(lines)
