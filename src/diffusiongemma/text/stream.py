"""Text out of committed token ids, one request at a time: detokenise, parse, stop, budget thinking.

`TextStream` is called with each committed canvas's new tokens (the generation layer attaches it to an
engine request as its commit hook). It feeds them one by one through the incremental detokeniser, the
output parser and the stop matcher; it cuts the canvas exactly where a stop string completes (the
request then finishes with `stop`), and when a reasoning budget is exceeded it keeps the reasoning up to
the budget and forces `<channel|>`, so the model continues with the answer in the next canvas. The
deltas it produced are collected with `take()` once the commit is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import tokenizer as T
from .parser import Delta, OutputParser
from .stops import StopMatcher
from .tokenizer import IncrementalDecoder, Tokenizer


@dataclass(frozen=True)
class Cut:
    """What to do with a committed canvas: keep its first `keep` tokens, then commit `append`, and finish with
    `finish_reason` (None: go on generating)."""

    keep: int
    finish_reason: str | None = "stop"
    append: tuple[int, ...] = ()


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = (),
                 thinking_budget: int | None = None):
        self.tok = tokenizer
        self.decoder = IncrementalDecoder(tokenizer)
        self.parser = OutputParser()
        self.stops = StopMatcher(stop)
        self.budget = thinking_budget
        self.open_id = tokenizer.token_id(T.CHANNEL_OPEN)
        self.close_id = tokenizer.token_id(T.CHANNEL_CLOSE)
        self.in_thought = False
        self.thought_tokens = 0
        self.pending: list[Delta] = []
        self.content = ""
        self.reasoning = ""
        self.calls = []
        self.errors = []
        self.stopped = False

    def prime(self, text: str) -> None:
        """Text the prompt forces at the start of the answer (e.g. `<|tool_call>call:NAME`), parsed as if
        the model had written it."""
        if text:
            self._route(self.parser.feed(text))

    def __call__(self, ids) -> Cut | None:
        """Feed a committed canvas's new token ids; None keeps them all and goes on."""
        for n, i in enumerate(ids):
            if self.budget is not None and self.in_thought and i != self.close_id and self.thought_tokens >= self.budget:
                self._feed_token(self.close_id)
                return Cut(keep=n, finish_reason=None, append=(self.close_id,))
            self._feed_token(i)
            if self.stopped:
                return Cut(keep=n + 1, finish_reason="stop")
        return None

    def _feed_token(self, i: int) -> None:
        if i == self.open_id:
            self.in_thought = True
        elif i == self.close_id:
            self.in_thought = False
        elif self.in_thought:
            self.thought_tokens += 1
        self._route(self.parser.feed(self.decoder.feed([i])))

    def _route(self, deltas: list[Delta]) -> None:
        for d in deltas:
            if self.stopped:
                return
            if d.kind == "content":
                d = Delta("content", self.stops.feed(d.text))
                self.stopped = self.stops.stopped
                if not d.text:
                    continue
                self.content += d.text
            elif d.kind == "reasoning":
                self.reasoning += d.text
            elif d.kind == "tool_call":
                self.calls.append(d.call)
            else:
                self.errors.append(d)
            self.pending.append(d)

    def finish(self) -> list[Delta]:
        """End of the request: flush what was held back; returns the remaining deltas."""
        if not self.stopped:
            self._route(self.parser.feed(self.decoder.flush()))
            self._route(self.parser.finish())
            tail = self.stops.flush()
            if tail:
                self.content += tail
                self.pending.append(Delta("content", tail))
        return self.take()

    def take(self) -> list[Delta]:
        out, self.pending = self.pending, []
        return out
