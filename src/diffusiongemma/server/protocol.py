"""OpenAI requests mapped onto the engine's settings, the server's limits, and the response shapes.

Every field of a request is either used, or accepted as metadata that cannot change the output
(`user`, `metadata`, `store`), or rejected with a 400 naming it: nothing is silently ignored. Shapes
(JSON types) are checked first (`schema`); then sampler fields (OpenAI `temperature`, `max_tokens`, `seed`
and the extensions) become `engine.SamplingParams` and output fields (`stop`, `thinking_budget`,
`response_format`, draft frames) `generation.OutputOptions`, whose checks name the field; then the
server's limits bound the work one request may ask for.

Extensions (documented in the README), passed by the OpenAI client through `extra_body`:
  max_denoising_steps, t_max, t_min, entropy_bound, stability_threshold, confidence_threshold,
  schedule_steps, decoding (diffusion | speculative | autoregressive), ar_temperature;
  enable_thinking (or chat_template_kwargs.enable_thinking), thinking_budget;
  stream_options.include_draft: add draft frames (the denoising canvas) to the stream.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from ..config import GenerationConfig
from ..engine import RequestError, SamplingParams
from ..generation import OutputOptions
from .errors import APIError

SAMPLER_FIELDS = ("max_denoising_steps", "t_max", "t_min", "entropy_bound", "stability_threshold",
                  "confidence_threshold", "schedule_steps", "decoding", "ar_temperature")
UNSUPPORTED = (("logprobs", lambda v: v in (False, None, 0)), ("top_logprobs", lambda v: v in (None, 0)),
               ("presence_penalty", lambda v: v in (None, 0)), ("frequency_penalty", lambda v: v in (None, 0)),
               ("logit_bias", lambda v: not v), ("top_p", lambda v: v in (None, 1)), ("echo", lambda v: not v),
               ("suffix", lambda v: not v), ("best_of", lambda v: v in (None, 1)),
               ("parallel_tool_calls", lambda v: v is not False), ("reasoning_effort", lambda v: v is None))


@dataclass(frozen=True)
class Limits:
    """The most work one request may ask for (each a `serve` flag)."""

    max_tokens: int = 4096
    max_denoising_steps: int = 256  # per canvas; also bounds schedule_steps
    max_stability_threshold: int = 16


@dataclass
class Parsed:
    params: SamplingParams
    options: OutputOptions
    stream: bool
    include_usage: bool
    thinking: bool = False
    tools: list | None = None
    tool_choice: Any = "auto"
    max_tokens_given: bool = False  # else the default is fitted to the context (see `fit_max_tokens`)


def _settings(cls, names: dict | None = None, **fields):
    """`cls(**fields)` (SamplingParams or OutputOptions), its RequestError as a 400 naming the field (by the
    request's own name for it, `names`: field -> request field)."""
    try:
        return cls(**{k: v for k, v in fields.items() if v is not None})
    except RequestError as e:
        raise APIError(400, str(e), param=(names or {}).get(e.param, e.param)) from None


def _limit(name: str, value, most: int, flag: str) -> None:
    if value is not None and value > most:
        raise APIError(400, f"{name} ({value}) exceeds this server's limit of {most} (serve {flag})", param=name,
                       code="limit_exceeded")


def parse_request(body: dict, kind: str, gen: GenerationConfig, model_name: str, limits: Limits) -> Parsed:
    """A request body that passed `schema.validate`, as engine settings and output options."""
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
    _limit(max_name, params.max_tokens, limits.max_tokens, "--max-tokens")
    _limit("max_denoising_steps", params.max_denoising_steps, limits.max_denoising_steps, "--max-denoising-steps")
    _limit("schedule_steps", params.schedule_steps, limits.max_denoising_steps, "--max-denoising-steps")
    _limit("stability_threshold", params.stability_threshold, limits.max_stability_threshold, "--max-stability")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > 8:
        raise APIError(400, "stop takes a string or a list of up to 8 of them", param="stop")
    stream = bool(body.get("stream"))
    opts = body.get("stream_options") or {}
    if opts and not stream:
        raise APIError(400, "stream_options requires stream: true", param="stream_options")
    options = _settings(OutputOptions, stop=stop, draft=bool(opts.get("include_draft")),
                        thinking_budget=body.get("thinking_budget") if kind == "chat" else None,
                        response_format=body.get("response_format") if kind == "chat" else None)
    parsed = Parsed(params, options, stream, bool(opts.get("include_usage")),
                    max_tokens_given=params.max_tokens is not None)
    if kind == "chat":
        ctk = body.get("chat_template_kwargs") or {}
        thinking = body.get("enable_thinking")
        parsed.thinking = bool(thinking if thinking is not None else ctk.get("enable_thinking", False))
        parsed.tools = body.get("tools")
        parsed.tool_choice = body.get("tool_choice") or "auto"
    return parsed


def fit_max_tokens(parsed: Parsed, prompt_tokens: int, max_context: int, canvas_length: int,
                   gen: GenerationConfig, limits: Limits) -> None:
    """A request that did not say how many tokens it wants gets the checkpoint's default, or as many as the
    context still holds, whichever is fewer (so a prompt that fits is never refused for a default)."""
    if parsed.max_tokens_given:
        return
    room = max_context - prompt_tokens - canvas_length
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens: no room is left in the context of "
                            f"{max_context}", param="messages", code="context_length_exceeded")
    parsed.params = replace(parsed.params, max_tokens=min(gen.max_new_tokens, room, limits.max_tokens))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats, extra: bool = True) -> dict:
    u = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
         "total_tokens": stats.prompt_tokens + stats.completion_tokens,
         "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}  # reused from the prefix cache
    if extra:
        spc = stats.steps_per_canvas
        acc = stats.accepted_per_canvas
        u["diffusion"] = {"decoder_forwards": stats.decoder_forwards, "commit_forwards": stats.commit_forwards,
                          "tokens_per_forward": round(stats.tokens_per_forward, 3),
                          "tokens_per_pass": round(stats.tokens_per_pass, 3),
                          "accepted_per_canvas": round(sum(acc) / len(acc), 2) if acc else None,
                          "steps_per_canvas": round(sum(spc) / len(spc), 2) if spc else 0.0,
                          "canvases": len(spc), "ttft_s": round(stats.ttft_s or 0.0, 4),
                          "total_s": round(stats.total_s, 4), "decoding": stats.decoding}
    return u


def now() -> int:
    return int(time.time())
