"""`diffusiongemma generate`: one answer to a prompt or to chat messages from a file."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .common import (
    CLIError,
    DeltaPrinter,
    add_media_args,
    add_model_args,
    add_sampler_args,
    load_model,
    make_generator,
    media_parts,
    output_options,
    run_cli,
    run_request,
    sampling_params,
)


def _read_json(path: str, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise CLIError(f"cannot read the {what} file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CLIError(f"the {what} file {path} is not valid JSON: {e}") from None


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="diffusiongemma generate", description=__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("prompt", nargs="?", help="the user's message (read from stdin if absent)")
    src.add_argument("--messages", help="JSON file with a list of chat messages (OpenAI format)")
    ap.add_argument("--system", help="system prompt")
    ap.add_argument("--tools", help="JSON file with a list of tool (function) declarations")
    ap.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    ap.add_argument("--json", action="store_true", help="print one JSON object with text and statistics")
    ap.add_argument("--json-schema", help="JSON schema file: the answer is JSON that validates against it")
    ap.add_argument("--json-object", action="store_true", help="the answer is a JSON object (any)")
    add_media_args(ap)
    add_model_args(ap)
    add_sampler_args(ap)
    a = ap.parse_args(argv)

    tools = _read_json(a.tools, "tools") if a.tools else None
    if a.messages:
        messages = _read_json(a.messages, "messages")
        if not isinstance(messages, list):
            raise CLIError(f"the messages file {a.messages} must hold a JSON list of messages")
    else:
        prompt = a.prompt if a.prompt is not None else sys.stdin.read()
        if not prompt.strip():
            raise CLIError("empty prompt")
        media = media_parts(a)
        messages = [{"role": "user", "content": media + [{"type": "text", "text": prompt}] if media else prompt}]
    if a.system and not a.raw:
        messages = [{"role": "system", "content": a.system}] + messages

    params, options = sampling_params(a), output_options(a)  # bad settings fail before the model loads
    if a.json_schema or a.json_object:
        schema = _read_json(a.json_schema, "schema") if a.json_schema else None
        options = replace(options, response_format={"type": "json_schema", "json_schema": {"schema": schema}}
                          if schema is not None else {"type": "json_object"})
    gen = make_generator(a, load_model(a))
    if a.raw:
        if a.image or a.video:
            raise CLIError("--raw takes no images")
        prompt = gen.text(messages[-1]["content"])
    else:
        prompt = gen.chat(messages, tools, a.think)
    res = run_request(gen, prompt, params, options, a.show_canvas, on_deltas=None if a.json else DeltaPrinter())
    stats = res.stats
    if a.json:
        out = {"text": res.content, "reasoning": res.reasoning,
               "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in res.tool_calls],
               "tool_call_errors": res.tool_call_errors, "finish_reason": res.finish_reason, "usage": res.usage,
               "stats": stats.as_dict()}
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{res.finish_reason}] {stats.completion_tokens} tokens, {stats.decoder_forwards} decoder forwards, "
              f"{stats.tokens_per_forward:.2f} tokens/forward, {stats.total_s:.2f} s", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_cli("diffusiongemma generate", _main, argv)
