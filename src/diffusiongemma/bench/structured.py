"""Structured output, measured: constrained requests over several schemas and forced tool calls, every
answer parsed and validated with the `jsonschema` library, beside the same requests unconstrained.

    python -m diffusiongemma.bench.structured                 # the shipped model, 8 seeds x 6 schemas x 2 temps x 3 modes
    python -m diffusiongemma.bench.structured --seeds 2       # smaller

Per (kind, constrained or not): requests, parsed, valid, finish reasons, tokens per pass, seconds.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMAS = {
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "numbers with ranges": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 9},
        "x": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}},
        "required": ["n", "x"], "additionalProperties": False},
    "unbounded number": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
                         "required": ["x"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 5}},
        "required": ["items"], "additionalProperties": False},
    "nested with required": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "weather": {"type": "object", "properties": {"temp": {"type": "integer", "minimum": -50, "maximum": 60},
                                                     "rain": {"type": "boolean"}},
                    "required": ["temp", "rain"], "additionalProperties": False}},
        "required": ["city", "weather"], "additionalProperties": False},
}
QUESTION = "What is the weather in Oslo? Answer in JSON."


def run(model: str | None, seeds: int, max_tokens: int) -> list[dict]:
    import jsonschema

    import diffusiongemma as dg

    from ..engine import SamplingParams
    from ..generation import Generator, OutputOptions
    from ..loader import default_model_dir
    from ..training.tasks import TOOLS

    gen = Generator(dg.load(model or default_model_dir(), dtype="float32"), max_batch=16)
    grid = [(mode, t, s) for mode in ("diffusion", "speculative", "autoregressive") for t in (0.0, 1.0)
            for s in range(seeds)]
    params = [SamplingParams(max_tokens=max_tokens, seed=s, decoding=m, ar_temperature=t) for m, t, s in grid]
    rows = []

    def record(kind, constrained, results, check):
        valid = parsed = 0
        for r in results:
            ok_parse, ok_valid = check(r)
            parsed += ok_parse
            valid += ok_valid
        reasons = {}
        for r in results:
            reasons[r.chat_finish_reason] = reasons.get(r.chat_finish_reason, 0) + 1
        rows.append({"kind": kind, "constrained": constrained, "requests": len(results), "parsed": parsed,
                     "valid": valid, "finish": reasons,
                     "tokens_per_pass": statistics.mean(r.stats.tokens_per_pass for r in results)})

    prompt = gen.chat([{"role": "user", "content": QUESTION}])
    for name, schema in SCHEMAS.items():
        def check(r, schema=schema):
            try:
                value = json.loads(r.content)
            except ValueError:
                return False, False
            try:
                jsonschema.validate(value, schema)
                return True, True
            except jsonschema.ValidationError:
                return True, False

        fmt = OutputOptions(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
        for constrained in (True, False):
            t0 = time.perf_counter()
            results = gen.run([prompt] * len(params), params, fmt if constrained else None)
            record(name, constrained, results, check)
            rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)

    def check_call(r):
        if len(r.tool_calls) != 1 or r.tool_call_errors:
            return False, False
        c = r.tool_calls[0]
        tool = next((t["function"] for t in TOOLS if t["function"]["name"] == c.name), None)
        if tool is None:
            return True, False
        try:
            jsonschema.validate(c.arguments, tool["parameters"])
            return True, True
        except jsonschema.ValidationError:
            return True, False

    msgs = [{"role": "user", "content": "Tell me something about the sea."}]  # a question no tool answers
    for choice, label in (("required", "tool call (required)"),
                          ({"type": "function", "function": {"name": "convert_currency"}}, "tool call (named)")):
        for constrained in (True, False):
            t0 = time.perf_counter()
            if constrained:
                prompts = [gen.chat(msgs, TOOLS, tool_choice=choice)] * len(params)
            else:  # the same forced opening, the arguments left to the model
                p = gen.chat(msgs, TOOLS, tool_choice=choice)
                p.tool_call = None
                prompts = [p] * len(params)
            record(label, constrained, gen.run(prompts, params), check_call)
            rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per (schema, temperature, decoding mode)")
    ap.add_argument("--max-tokens", type=int, default=96)
    a = ap.parse_args(argv)
    rows = run(a.model, a.seeds, a.max_tokens)
    print(f"{'kind':24} {'constrained':>11} {'requests':>8} {'parse':>7} {'valid':>7} {'tok/pass':>8}  finish")
    for r in rows:
        n = r["requests"]
        print(f"{r['kind']:24} {str(r['constrained']):>11} {n:>8} {r['parsed'] / n:>7.1%} {r['valid'] / n:>7.1%} "
              f"{r['tokens_per_pass']:>8.2f}  {r['finish']}")
    total = sum(r["requests"] for r in rows if r["constrained"])
    print(f"constrained requests: {total}, valid: {sum(r['valid'] for r in rows if r['constrained'])}")
    print(json.dumps({"structured": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
