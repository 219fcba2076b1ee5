"""OpenAI request validation and response shapes.

Every field of a request is either used, or accepted as metadata that cannot change the output
(`user`, `metadata`, `store`), or rejected with a 400 naming it: nothing is silently ignored.

Extensions (documented in the README), passed by the OpenAI client through `extra_body`:
  max_denoising_steps, t_max, t_min, entropy_bound, stability_threshold, confidence_threshold,
  schedule_steps, decoding (diffusion | speculative | autoregressive), ar_temperature: the sampler
  settings of this request;
  enable_thinking (or chat_template_kwargs.enable_thinking), thinking_budget;
  stream_options.include_draft: add draft frames (the denoising canvas) to the stream.
`response_format` json_object / json_schema constrains the answer to parse and validate (see
`generation.structured`).
Sampler fields (OpenAI `temperature`, `max_tokens`, `seed` and the extensions) are `engine.SamplingParams`
fields and output fields (`stop`, `thinking_budget`, draft frames) `generation.OutputOptions` fields: their
types, ranges and defaults are checked there, and their errors reported as they are, naming the field.
`temperature` scales the whole schedule (see `engine.params`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..config import GenerationConfig
from ..engine import RequestError, SamplingParams
from ..generation import OutputOptions


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


SAMPLER_FIELDS = ("max_denoising_steps", "t_max", "t_min", "entropy_bound", "stability_threshold",
                  "confidence_threshold", "schedule_steps", "decoding", "ar_temperature")
METADATA = ("user", "metadata", "store")
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream",
          "stream_options", "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
          "logit_bias", *METADATA, *SAMPLER_FIELDS}
CHAT_FIELDS = COMMON | {"messages", "tools", "tool_choice", "parallel_tool_calls", "response_format",
                        "enable_thinking", "chat_template_kwargs", "thinking_budget", "reasoning_effort"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "suffix", "best_of"}
UNSUPPORTED = (("logprobs", lambda v: v in (False, None, 0)), ("top_logprobs", lambda v: v in (None, 0)),
               ("presence_penalty", lambda v: v in (None, 0)), ("frequency_penalty", lambda v: v in (None, 0)),
               ("logit_bias", lambda v: not v), ("top_p", lambda v: v in (None, 1)), ("echo", lambda v: not v),
               ("suffix", lambda v: not v), ("best_of", lambda v: v in (None, 1)),
               ("parallel_tool_calls", lambda v: v is not False), ("reasoning_effort", lambda v: v is None))


@dataclass
class Parsed:
    params: SamplingParams
    options: OutputOptions
    stream: bool
    include_usage: bool
    thinking: bool = False
    tools: list | None = None
    tool_choice: Any = "auto"


def _settings(cls, names: dict | None = None, **fields):
    """`cls(**fields)` (SamplingParams or OutputOptions), its RequestError as a 400 naming the field (by the
    request's own name for it, `names`: field -> request field)."""
    try:
        return cls(**{k: v for k, v in fields.items() if v is not None})
    except RequestError as e:
        raise APIError(400, str(e), param=(names or {}).get(e.param, e.param)) from None


def parse_request(body: Any, kind: str, gen: GenerationConfig, model_name: str, max_tokens_limit: int) -> Parsed:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unsupported parameter: {unknown[0]}", param=unknown[0], code="unsupported_parameter")

    def flag(name, default=False):
        v = body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise APIError(400, f"{name} must be a boolean, got {type(v).__name__}", param=name)
        return v

    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", param="model",
                       code="model_not_found")
    if body.get("n") not in (None, 1):
        raise APIError(400, "n > 1 is not supported: send one request per completion", param="n",
                       code="unsupported_parameter")
    for name, ok in UNSUPPORTED:
        if name in body and not ok(body[name]):
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")

    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = _settings(SamplingParams, {"max_tokens": max_name}, max_tokens=body.get(max_name), seed=body.get("seed"),
                       temperature=body.get("temperature"), **{k: body.get(k) for k in SAMPLER_FIELDS})
    try:
        params.resolve(gen, seed=0)  # the schedule with the checkpoint's defaults filled in (t_max > t_min)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    if params.max_tokens is not None and params.max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens ({params.max_tokens}) exceeds this server's limit of {max_tokens_limit}",
                       param="max_tokens", code="max_tokens_too_large")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > 8:
        raise APIError(400, "stop takes a string or a list of up to 8 of them", param="stop")
    stream = flag("stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_draft"}:
        raise APIError(400, "stream_options supports include_usage and include_draft", param="stream_options")
    if opts and not stream:
        raise APIError(400, "stream_options requires stream: true", param="stream_options")
    options = _settings(OutputOptions, stop=stop, draft=bool(opts.get("include_draft")),
                        thinking_budget=body.get("thinking_budget") if kind == "chat" else None,
                        response_format=body.get("response_format") if kind == "chat" else None)

    parsed = Parsed(params, options, stream, bool(opts.get("include_usage")))
    if kind == "chat":
        ctk = body.get("chat_template_kwargs") or {}
        if not isinstance(ctk, dict) or set(ctk) - {"enable_thinking"}:
            raise APIError(400, "chat_template_kwargs supports enable_thinking only", param="chat_template_kwargs")
        if not isinstance(ctk.get("enable_thinking", False), bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be a boolean", param="chat_template_kwargs")
        parsed.thinking = flag("enable_thinking", ctk.get("enable_thinking", False))
        parsed.tools = body.get("tools")
        parsed.tool_choice = body.get("tool_choice", "auto")
    return parsed


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats, extra: bool = True) -> dict:
    u = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
         "total_tokens": stats.prompt_tokens + stats.completion_tokens}
    if extra:
        spc = stats.steps_per_canvas
        acc = stats.accepted_per_canvas
        u["diffusion"] = {"decoder_forwards": stats.decoder_forwards, "commit_forwards": stats.commit_forwards,
                          "tokens_per_forward": round(stats.tokens_per_forward, 3),
                          "tokens_per_pass": round(stats.tokens_per_pass, 3),
                          "accepted_per_canvas": round(sum(acc) / len(acc), 2) if acc else None,
                          "steps_per_canvas": round(sum(spc) / len(spc), 2) if spc else 0.0,
                          "canvases": len(spc), "ttft_s": round(stats.ttft_s or 0.0, 4),
                          "total_s": round(stats.total_s, 4)}
    return u


def now() -> int:
    return int(time.time())
