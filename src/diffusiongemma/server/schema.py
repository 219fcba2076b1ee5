"""The request bodies the API accepts, as pydantic models: every field's JSON type, checked before anything
reads it. Strict: a number is not a string, a bool is not a number, unknown top-level fields are refused,
text may not hold lone surrogates, and free-form objects (tool parameters, JSON schemas, metadata) are
bounded in depth. Ranges and defaults of the sampler and output settings are checked where they are
defined (`engine.SETTINGS`, `generation.OutputOptions`); this module only says what shape a value has.

`validate(body, kind)` returns the raw body once it conforms, or raises `APIError` 400 naming the first
offending field the way OpenAI does (`messages[0].content`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError as _ValidationError

from .errors import APIError

MAX_DEPTH = 32  # nesting of free-form objects (schemas, tool parameters, metadata)


def _text(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds a lone surrogate (not valid Unicode)") from None
    return s


def _depth(v, limit: int = MAX_DEPTH, d: int = 0):
    if d > limit:
        raise ValueError(f"nested more than {limit} levels deep")
    if isinstance(v, dict):
        for k, x in v.items():
            _text(k)
            _depth(x, limit, d + 1)
    elif isinstance(v, list):
        for x in v:
            _depth(x, limit, d + 1)
    elif isinstance(v, str):
        _text(v)
    return v


Text = Annotated[StrictStr, AfterValidator(_text)]
Number = StrictFloat | StrictInt
JSONObject = Annotated[dict[str, Any], AfterValidator(_depth)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):  # objects clients send with fields of their own (their extras are ignored)
    model_config = ConfigDict(strict=True, extra="ignore")


class URL(_Strict):
    url: Text
    detail: Text | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: URL | Text


class ImagePart(_Strict):
    type: Literal["image"]
    image: Text


class VideoURLPart(_Strict):
    type: Literal["video_url"]
    video_url: URL | Text


class VideoPart(_Strict):
    type: Literal["video"]
    video: Text


Part = Annotated[TextPart | ImageURLPart | ImagePart | VideoURLPart | VideoPart, Field(discriminator="type")]


class CallFunction(_Strict):
    name: Text
    arguments: Text | JSONObject = "{}"


class ToolCall(_Open):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: CallFunction


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[Part] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None
    reasoning_content: Text | None = None


class FunctionDecl(_Strict):
    name: Text
    description: Text | None = None
    parameters: JSONObject | None = None
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDecl


class NamedFunction(_Strict):
    name: Text


class ToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaSpec(_Strict):
    name: Text = "response"
    description: Text | None = None
    schema_: JSONObject = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Text  # its values are checked by `generation.structured` (one message for every wrong one)
    json_schema: JSONSchemaSpec | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None
    include_draft: StrictBool | None = None


class ThinkingKwargs(_Strict):
    enable_thinking: StrictBool | None = None


class _Common(_Strict):
    model: Text | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    logprobs: StrictBool | StrictInt | None = None
    top_logprobs: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    user: Text | None = None
    metadata: JSONObject | None = None
    store: StrictBool | None = None
    # sampler extensions (their ranges: engine.SETTINGS and the server's limits)
    max_denoising_steps: StrictInt | None = None
    t_max: Number | None = None
    t_min: Number | None = None
    entropy_bound: Number | None = None
    stability_threshold: StrictInt | None = None
    confidence_threshold: Number | None = None
    schedule_steps: StrictInt | None = None
    decoding: Text | None = None
    ar_temperature: Number | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    enable_thinking: StrictBool | None = None
    chat_template_kwargs: ThinkingKwargs | None = None
    thinking_budget: StrictInt | None = None
    reasoning_effort: Text | None = None


class CompletionRequest(_Common):
    prompt: Text | list[Text]
    echo: StrictBool | None = None
    suffix: Text | None = None
    best_of: StrictInt | None = None


def _where(loc: tuple) -> str:
    out, last = "", None
    for part in loc:
        if part == last:  # a tagged union's tag (the part's type) before the field of the same name
            continue
        last = part
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[...]", "function-after[_text(), str]") or str(part).startswith(
                ("function-", "tagged-union", "union[", "list[", "dict[", "Literal[", "URL", "ToolChoice")):
            continue  # pydantic's names for the alternatives it tried
        else:
            out += ("." if out else "") + str(part)
    return out


def validate(body: Any, kind: str) -> dict:
    """The body, checked against the chat or completion request schema; APIError 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = ChatRequest if kind == "chat" else CompletionRequest
    try:
        model.model_validate(body)
    except _ValidationError as e:
        errs = e.errors(include_url=False)
        extra = next((x for x in errs if x["type"] == "extra_forbidden" and len(x["loc"]) == 1), None)
        if extra is not None:
            name = str(extra["loc"][0])
            raise APIError(400, f"unsupported parameter: {name}", param=name, code="unsupported_parameter") from None
        err = max(errs, key=lambda x: len(x["loc"]))  # the most specific (of a union's branches, the one it took)
        where = _where(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{where}: {msg}" if where else msg, param=where or None) from None
    return body
