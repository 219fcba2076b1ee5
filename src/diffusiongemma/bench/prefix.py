"""`diffusiongemma bench --curve prefix`: time to the first committed token of each turn of a chat, with the
prefix cache and without it, in one process (alternating, a fresh engine per dialogue so turn 1 always misses).

With a tokenizer (the shipped model) the dialogue is three task questions under a system prompt, answered by the
released sampler. Without one (`--size mid`), token ids: a system prompt of `--system-tokens` random ids, each
turn `--turn-tokens` more, each answer one canvas of `--steps` denoising steps. The tokens of every turn must be
the same with and without the cache in fp32 (the exit status says so; in bf16 the table says whether they were).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from .chart import environment, median_spread, report


def _dialogues(ck, a):
    """(prompt, params, text): prompt(turn, answers) gives a turn's prompt ids from the earlier turns' answers
    (text with a tokenizer, token ids without)."""
    from ..engine import SamplingParams

    if ck.tokenizer is not None:
        from ..generation import PromptBuilder
        from ..training import tasks

        builder = PromptBuilder(ck.tokenizer, ck.template)
        questions = [tasks.make_example(tasks.FAMILIES[i % 4], tasks.EVAL_SEEDS.start + 900 + i).turns[0]
                     .messages[-1]["content"] for i in range(a.turns)]

        def prompt(turn, answers):
            messages = [{"role": "system", "content": "You are a careful assistant. Answer with the result only."}]
            for i in range(turn + 1):
                messages.append({"role": "user", "content": questions[i]})
                if i < turn:
                    messages.append({"role": "assistant", "content": answers[i]})
            return builder.chat(messages).ids

        return prompt, SamplingParams(seed=7), True
    g = torch.Generator().manual_seed(0)
    vocab = ck.config.text.vocab_size
    system = torch.randint(10, vocab, (a.system_tokens,), generator=g).tolist()
    users = [torch.randint(10, vocab, (a.turn_tokens,), generator=g).tolist() for _ in range(a.turns)]

    def prompt(turn, answers):
        ids = list(system)
        for i in range(turn + 1):
            ids += users[i] + (answers[i] if i < turn else [])
        return ids

    return prompt, SamplingParams(seed=7, max_tokens=ck.config.canvas_length, max_denoising_steps=a.steps,
                                  confidence_threshold=1e-30, stop_token_ids=()), False


def _dialogue(engine, turns: int, prompt, params, text: bool, tokenizer):
    from ..generation import parse_ids

    answers, out = [], []
    for turn in range(turns):
        ids = prompt(turn, answers)
        t0 = time.perf_counter()
        c = engine.generate([ids], params)[0]
        out.append({"turn": turn + 1, "prompt_tokens": len(ids), "cached_tokens": c.stats.cached_tokens,
                    "ttft_s": c.stats.ttft_s, "prefill_s": c.stats.prefill_s, "total_s": time.perf_counter() - t0,
                    "ids": c.token_ids})
        answers.append(parse_ids(tokenizer, c.token_ids).content if text else c.token_ids)
    return out


def run(a, model_dir: Path, out: Path) -> int:
    import diffusiongemma as dg

    from ..engine import Engine

    torch.manual_seed(0)
    ck = dg.load(model_dir, dtype=getattr(torch, a.dtype), vision=False)
    prompt, params, text = _dialogues(ck, a)
    sides = {"without": {}, "with": {"prefix_cache": a.prefix_cache_mib << 20}}
    runs: dict[str, list[list[dict]]] = {s: [] for s in sides}
    Engine.from_checkpoint(ck).warm_up()  # allocator pools and first-use costs are not a turn's
    for _ in range(a.repeats):
        for side, kw in sides.items():
            runs[side].append(_dialogue(Engine.from_checkpoint(ck, **kw), a.turns, prompt, params, text, ck.tokenizer))
    same = all(x["ids"] == y["ids"] for rw, ro in zip(runs["with"], runs["without"]) for x, y in zip(rw, ro))
    rows, per_turn = [], []
    for t in range(a.turns):
        w = [r[t] for r in runs["with"]]
        o = [r[t] for r in runs["without"]]
        tw, to = median_spread([x["ttft_s"] for x in w]), median_spread([x["ttft_s"] for x in o])
        per_turn.append({"turn": t + 1, "prompt_tokens": w[0]["prompt_tokens"], "cached_tokens": w[0]["cached_tokens"],
                         "ttft_without_s": to, "ttft_with_s": tw,
                         "prefill_without_s": statistics.median(x["prefill_s"] for x in o),
                         "prefill_with_s": statistics.median(x["prefill_s"] for x in w)})
        rows.append([t + 1, w[0]["prompt_tokens"], w[0]["cached_tokens"], 1000 * to["median"], 1000 * tw["median"],
                     f"{1000 * tw['min']:.0f}-{1000 * tw['max']:.0f}", to["median"] / tw["median"]])
    title = (f"prefix cache: time to first committed token per chat turn | {model_dir} | {a.dtype} | "
             f"{a.repeats} dialogues per side | same tokens with and without: {same}")
    xs = [t + 1 for t in range(a.turns)]
    panels = [("time to first committed token (ms)",
               {"without the cache": (xs, [1000 * p["ttft_without_s"]["median"] for p in per_turn]),
                "with the cache": (xs, [1000 * p["ttft_with_s"]["median"] for p in per_turn])}),
              ("prompt tokens", {"encoded without": (xs, [p["prompt_tokens"] for p in per_turn]),
                                 "encoded with": (xs, [p["prompt_tokens"] - p["cached_tokens"] for p in per_turn])})]
    report("prefix", out, title, ["turn", "prompt", "cached", "TTFT without ms", "TTFT with ms", "with: min-max",
                                  "ratio"], rows,
           {"env": environment(model=str(model_dir), dtype=a.dtype, repeats=a.repeats), "same_tokens": same,
            "turns": per_turn}, "chat turn", panels)
    if not same and a.dtype == "float32":
        print("the tokens differ with and without the prefix cache in fp32", file=sys.stderr)
        return 1
    if not same:  # a cached prefix's suffix is encoded in other shapes than a whole prompt: bf16 rounds otherwise
        print(f"note: in {a.dtype} the tokens may differ with and without the cache (the suffix is encoded in "
              "other shapes than the whole prompt, which rounds differently); fp32 is the exactness contract",
              file=sys.stderr)
    return 0
