"""The text side of one request: its output options, the commit hook that cuts canvases for stop strings and
the thinking budget, and the conversion of the engine's events into what a caller consumes.

Outputs, in order, per request:
- `DraftEvent` (the engine's): one per denoising step, when the request asked for draft frames;
- `Delta` (`text.parser`): `content`, `reasoning`, `tool_call` and `tool_call_error` pieces as canvases commit;
- `Result`: once, last: the finish reason, the whole text, reasoning and tool calls, token ids, statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..engine import CommitAction, CommitEvent, DraftEvent, Event, RequestError, RequestStats
from ..text.parser import Delta, ToolCall
from ..text.stream import TextStream
from ..text.tokenizer import Tokenizer
from .structured import response_schema


@dataclass(frozen=True)
class OutputOptions:
    """What a caller wants out of a request beyond the sampler settings (`engine.SamplingParams`)."""

    stop: tuple[str, ...] = ()  # stop strings: the answer ends before the first one (not in reasoning)
    thinking_budget: int | None = None  # the most reasoning tokens; then the thought is closed
    draft: bool = False  # a DraftEvent per denoising step (the canvas as it denoises)
    response_format: dict | None = None  # OpenAI's: {"type": "json_object"} or a json_schema (`structured`)

    def __post_init__(self):
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"stop must be a list of non-empty strings, got {self.stop!r}", "stop")
        object.__setattr__(self, "stop", tuple(stop))
        b = self.thinking_budget
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 0):
            raise RequestError(f"thinking_budget must be an integer >= 0, got {b!r}", "thinking_budget")
        if not isinstance(self.draft, bool):
            raise RequestError(f"draft must be true or false, got {self.draft!r}", "draft")
        if response_schema(self.response_format) is not None and (self.stop or self.thinking_budget is not None):
            raise RequestError("response_format cannot be combined with stop strings or a thinking budget (a cut "
                               "would leave the output unfinished)", "response_format")

    @property
    def schema(self) -> dict | None:
        """The JSON schema the answer must follow (None: free text)."""
        return response_schema(self.response_format)


@dataclass
class Result:
    """A finished request."""

    request_id: str
    finish_reason: str  # the engine's: "stop" (a stop id or string), "length", "cancelled"
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    tool_call_errors: list[str]
    token_ids: list[int]
    stats: RequestStats

    @property
    def chat_finish_reason(self) -> str:
        """The OpenAI chat finish reason: `tool_calls` when the answer ended after calling tools."""
        return "tool_calls" if self.tool_calls and self.finish_reason == "stop" else self.finish_reason

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.stats.prompt_tokens, "completion_tokens": self.stats.completion_tokens}


Output = DraftEvent | Delta | Result


@dataclass
class TextRequest:
    """One request's text: its `TextStream` (detokeniser, parser, stop strings, thinking budget) as the engine's
    commit hook, and its engine events turned into outputs."""

    request_id: str
    tokenizer: Tokenizer
    options: OutputOptions = field(default_factory=OutputOptions)
    forced: str = ""  # text the prompt forced at the start of the answer, parsed as if the model wrote it
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.stream = TextStream(self.tokenizer, self.options.stop, self.options.thinking_budget)
        self.stream.prime(self.forced)

    def hook(self, ids: Sequence[int]) -> CommitAction | None:
        """The engine's commit hook: a cut where a stop string completes or the thinking budget runs out."""
        cut = self.stream(ids)
        return None if cut is None else CommitAction(cut.keep, cut.finish_reason, cut.append)

    def outputs(self, ev: Event) -> list[Output]:
        """What the caller sees of one engine event of this request."""
        if isinstance(ev, DraftEvent):
            return [ev]
        assert isinstance(ev, CommitEvent)
        self.token_ids += ev.token_ids
        out: list[Output] = list(self.stream.take())
        if ev.finish_reason is not None:
            out += self.stream.finish()
            s = self.stream
            out.append(Result(self.request_id, ev.finish_reason, s.content, s.reasoning, list(s.calls),
                              [e.error for e in s.errors], list(self.token_ids), ev.stats))
        return out


def parse_ids(tokenizer: Tokenizer, ids: Sequence[int]) -> TextStream:
    """Generated token ids read as the engine's caller reads them (answer, reasoning, tool calls), after the
    fact: for ids that did not come through a `TextRequest` (a benchmark's reference side, say)."""
    s = TextStream(tokenizer)
    s(list(ids))
    s.finish()
    return s
