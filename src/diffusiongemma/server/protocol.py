"""OpenAI request validation and response shapes.

Every field of a request is either used, or accepted as metadata that cannot change the output
(`user`, `metadata`, `store`), or rejected with a 400 naming it: nothing is silently ignored.

Extensions (documented in the README), passed by the OpenAI client through `extra_body`:
  max_denoising_steps, t_max, t_min, entropy_bound, stability_threshold, confidence_threshold,
  schedule_steps: the sampler settings of this request;
  enable_thinking (or chat_template_kwargs.enable_thinking), thinking_budget;
  stream_options.include_draft: add draft frames (the denoising canvas) to the stream.
OpenAI `temperature` scales the whole temperature schedule: t_max = temperature * (checkpoint t_max),
t_min = temperature * (checkpoint t_min); temperature 0 is taken as 0.01 (practically greedy).
Explicit t_max / t_min win over temperature.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..config import GenerationConfig
from ..engine import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


SAMPLER_FIELDS = {"max_denoising_steps": int, "t_max": float, "t_min": float, "entropy_bound": float,
                  "stability_threshold": int, "confidence_threshold": float, "schedule_steps": int}
METADATA = ("user", "metadata", "store")
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream",
          "stream_options", "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
          "logit_bias", *METADATA, *SAMPLER_FIELDS}
CHAT_FIELDS = COMMON | {"messages", "tools", "tool_choice", "parallel_tool_calls", "response_format",
                        "enable_thinking", "chat_template_kwargs", "thinking_budget", "reasoning_effort"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "suffix", "best_of"}


def _type_ok(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


@dataclass
class Parsed:
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    include_draft: bool
    thinking: bool = False
    thinking_budget: int | None = None
    tools: list | None = None
    tool_choice: Any = "auto"
    body: dict = field(default_factory=dict)


def parse_request(body: Any, kind: str, gen: GenerationConfig, model_name: str, max_tokens_limit: int) -> Parsed:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unsupported parameter: {unknown[0]}", param=unknown[0], code="unsupported_parameter")

    def get(name, kind_, default=None, check=None, why=""):
        if name not in body or body[name] is None:
            return default
        v = body[name]
        if not _type_ok(v, kind_):
            raise APIError(400, f"{name} must be {getattr(kind_, '__name__', kind_)}, got {type(v).__name__}",
                           param=name)
        if check is not None and not check(v):
            raise APIError(400, f"{name} {why}", param=name)
        return v

    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", param="model",
                       code="model_not_found")
    n = get("n", int, 1)
    if n != 1:
        raise APIError(400, "n > 1 is not supported: send one request per completion", param="n",
                       code="unsupported_parameter")
    for name, ok in (("logprobs", lambda v: v in (False, None, 0)), ("top_logprobs", lambda v: v in (None, 0)),
                     ("presence_penalty", lambda v: v in (None, 0)), ("frequency_penalty", lambda v: v in (None, 0)),
                     ("logit_bias", lambda v: not v), ("top_p", lambda v: v in (None, 1)),
                     ("echo", lambda v: not v), ("suffix", lambda v: not v), ("best_of", lambda v: v in (None, 1)),
                     ("parallel_tool_calls", lambda v: v is not False), ("reasoning_effort", lambda v: v is None)):
        if name in body and not ok(body[name]):
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if "response_format" in body and body["response_format"] not in (None, {"type": "text"}):
        raise APIError(400, "response_format other than text is not supported", param="response_format",
                       code="unsupported_parameter")

    max_tokens = get("max_completion_tokens", int) or get("max_tokens", int)
    if max_tokens is not None and max_tokens <= 0:
        raise APIError(400, "max_tokens must be a positive integer", param="max_tokens")
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens ({max_tokens}) exceeds this server's limit of {max_tokens_limit}",
                       param="max_tokens", code="max_tokens_too_large")
    temperature = get("temperature", float, None, lambda v: 0 <= v <= 2, "must be between 0 and 2")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 8 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of up to 8 of them", param="stop")
    seed = get("seed", int)
    stream = get("stream", bool, False)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_draft"}:
        raise APIError(400, "stream_options supports include_usage and include_draft", param="stream_options")
    if opts and not stream:
        raise APIError(400, "stream_options requires stream: true", param="stream_options")

    sampler = {k: get(k, t) for k, t in SAMPLER_FIELDS.items()}
    if temperature is not None:
        scale = max(temperature, 0.01)
        sampler["t_max"] = sampler["t_max"] if sampler["t_max"] is not None else gen.t_max * scale
        sampler["t_min"] = sampler["t_min"] if sampler["t_min"] is not None else gen.t_min * scale
    try:
        params = SamplingParams(max_tokens=max_tokens, seed=seed, draft=bool(opts.get("include_draft")),
                                **{k: v for k, v in sampler.items() if v is not None})
    except ValueError as e:
        name = str(e).split()[0]
        raise APIError(400, str(e), param=name if name in SAMPLER_FIELDS or name == "max_tokens" else None) from None
    if params.t_max is not None and params.t_min is None and not params.t_max > gen.t_min:
        raise APIError(400, f"t_max must be greater than t_min ({gen.t_min})", param="t_max")
    if params.t_min is not None and params.t_max is None and not gen.t_max > params.t_min:
        raise APIError(400, f"t_min must be less than t_max ({gen.t_max})", param="t_min")

    parsed = Parsed(params, stop, stream, bool(opts.get("include_usage")), bool(opts.get("include_draft")), body=body)
    if kind == "chat":
        ctk = body.get("chat_template_kwargs") or {}
        if not isinstance(ctk, dict) or set(ctk) - {"enable_thinking"}:
            raise APIError(400, "chat_template_kwargs supports enable_thinking only", param="chat_template_kwargs")
        parsed.thinking = bool(get("enable_thinking", bool, ctk.get("enable_thinking", False)))
        parsed.thinking_budget = get("thinking_budget", int, None, lambda v: v >= 0, "must be >= 0")
        parsed.tools = body.get("tools")
        choice = body.get("tool_choice", "auto")
        if choice not in ("auto", "none", "required") and not (
                isinstance(choice, dict) and choice.get("type") == "function"
                and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)):
            raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or a function", param="tool_choice")
        if choice not in ("auto", "none") and not parsed.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if isinstance(choice, dict) and choice["function"]["name"] not in {
                t.get("function", {}).get("name") for t in parsed.tools if isinstance(t, dict)}:
            raise APIError(400, f"tool_choice names an undeclared function {choice['function']['name']!r}",
                           param="tool_choice")
        parsed.tool_choice = choice
    return parsed


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats, extra: bool = True) -> dict:
    u = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
         "total_tokens": stats.prompt_tokens + stats.completion_tokens}
    if extra:
        spc = stats.steps_per_canvas
        u["diffusion"] = {"decoder_forwards": stats.decoder_forwards, "commit_forwards": stats.commit_forwards,
                          "tokens_per_forward": round(stats.tokens_per_forward, 3),
                          "steps_per_canvas": round(sum(spc) / len(spc), 2) if spc else 0.0,
                          "canvases": len(spc), "ttft_s": round(stats.ttft_s or 0.0, 4),
                          "total_s": round(stats.total_s, 4)}
    return u


def now() -> int:
    return int(time.time())
