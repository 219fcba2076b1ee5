"""Incremental parsing of what the model writes into answer text, reasoning and tool calls.

Fed decoded text in chunks of any size (a canvas, a token, a character), it yields:
- `content` deltas: the answer, with every marker removed;
- `reasoning` deltas: the text of `<|channel>thought\\n ... <channel|>`;
- `tool_call` deltas: `<|tool_call>call:NAME{...}<tool_call|>` as a name and JSON-compatible arguments;
- `tool_call_error` deltas: a call whose syntax is malformed (or cut off), reported with the reason;
  its raw text is also returned as content, without the markers.

A chunk that ends in what could be the beginning of a marker is held back until the next chunk
decides it, so a marker split across two canvases never leaks. End markers (`<turn|>`, `<eos>`,
`<pad>`, `<|tool_response>`) are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from . import tokenizer as T
from .syntax import SyntaxError_, parse_call

DROP = (T.TURN_CLOSE, T.EOS, T.PAD, T.RESPONSE_OPEN, T.RESPONSE_CLOSE, T.BOS, T.TURN_OPEN, T.THINK,
        T.CALL_CLOSE, T.CHANNEL_CLOSE, T.TOOL_OPEN, T.TOOL_CLOSE)
MARKERS = (T.CHANNEL_OPEN, T.CHANNEL_CLOSE, T.CALL_OPEN, T.CALL_CLOSE, T.QUOTE) + DROP
THOUGHT_HEADER = "thought\n"
CALL_ENDS = (T.CALL_CLOSE, T.TURN_CLOSE, T.EOS, T.RESPONSE_OPEN, T.CALL_OPEN)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    raw: str = ""

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class Delta:
    kind: str  # "content" | "reasoning" | "tool_call" | "tool_call_error"
    text: str = ""
    call: ToolCall | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _held_prefix(buf: str, markers) -> int:
    """Length of the longest suffix of buf that is a proper prefix of some marker."""
    for k in range(min(len(buf), max(map(len, markers)) - 1), 0, -1):
        tail = buf[-k:]
        if tail[0] == "<" and any(m.startswith(tail) for m in markers):
            return k
    return 0


class OutputParser:
    def __init__(self):
        self.state = "content"  # content | reasoning | call
        self.buf = ""
        self.call_buf = ""
        self.header = None  # partial "thought\n" header being stripped after <|channel>

    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        out: list[Delta] = []
        while self.buf:
            if self.state == "call":
                ends = [(self.buf.find(m), m) for m in CALL_ENDS if m in self.buf]
                if not ends:
                    hold = _held_prefix(self.buf, CALL_ENDS)
                    self.call_buf += self.buf[:len(self.buf) - hold]
                    self.buf = self.buf[len(self.buf) - hold:]
                    break
                end, marker = min(ends)
                self.call_buf += self.buf[:end]
                if marker == T.CALL_CLOSE:
                    self.buf = self.buf[end + len(marker):]
                    out += self._close_call()
                else:  # the turn ended without <tool_call|>: keep the call if it parses
                    self.buf = self.buf[end:]
                    out += self._close_call(unterminated=True)
                continue
            if self.header is not None:  # strip "thought\n" right after <|channel>
                want = THOUGHT_HEADER[len(self.header):]
                n = 0
                while n < min(len(want), len(self.buf)) and self.buf[n] == want[n]:
                    n += 1
                if n == len(want):
                    self.buf, self.header = self.buf[n:], None
                elif n == len(self.buf):
                    self.header += self.buf
                    self.buf = ""
                    break
                else:  # not the header after all: it was reasoning text
                    self.buf, self.header = self.header + self.buf, None
                    continue
            pos, marker = self._next_marker()
            if marker is None:
                hold = _held_prefix(self.buf, MARKERS)
                emit, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
                out += self._text(emit)
                break
            out += self._text(self.buf[:pos])
            self.buf = self.buf[pos + len(marker):]
            out += self._marker(marker)
        return [d for d in out if d.kind not in ("content", "reasoning") or d.text]

    def finish(self) -> list[Delta]:
        out = []
        if self.header:
            self.buf, self.header = self.header + self.buf, None
        if self.buf:
            rest, self.buf = self.buf, ""
            if self.state == "call":
                self.call_buf += rest
            else:
                for m in MARKERS:
                    rest = rest.replace(m, "")
                out += self._text(rest)
        if self.state == "call":
            out += self._close_call(truncated=True)
        return [d for d in out if d.kind not in ("content", "reasoning") or d.text]

    # -- helpers -------------------------------------------------------------------------------
    def _next_marker(self):
        best, which = -1, None
        for m in MARKERS:
            i = self.buf.find(m)
            if i >= 0 and (best < 0 or i < best or (i == best and len(m) > len(which))):
                best, which = i, m
        return best, which

    def _text(self, s: str) -> list[Delta]:
        if not s:
            return []
        return [Delta("reasoning" if self.state == "reasoning" else "content", s)]

    def _marker(self, m: str) -> list[Delta]:
        if m == T.QUOTE:  # a stray string quote outside a call reads as a quote mark
            return self._text('"')
        if self.state == "reasoning":
            if m in (T.CHANNEL_CLOSE, T.TURN_CLOSE, T.EOS):
                self.state = "content"
            return []
        if m == T.CHANNEL_OPEN:
            self.state, self.header = "reasoning", ""
        elif m == T.CALL_OPEN:
            self.state, self.call_buf = "call", ""
        return []

    def _close_call(self, truncated: bool = False, unterminated: bool = False) -> list[Delta]:
        raw, self.call_buf, self.state = self.call_buf, "", "content"
        as_text = raw
        for m in MARKERS:
            as_text = as_text.replace(m, '"' if m == T.QUOTE else "")
        if truncated:
            return [Delta("tool_call_error", raw, error="the tool call was cut off before <tool_call|>"),
                    Delta("content", as_text)]
        try:
            name, args = parse_call(raw)
        except SyntaxError_ as e:
            why = "unterminated tool call" if unterminated else "malformed tool call"
            return [Delta("tool_call_error", raw, error=f"{why}: {e}"), Delta("content", as_text)]
        return [Delta("tool_call", call=ToolCall(name, args, raw))]
