"""The Gemma 4 value syntax used inside tool declarations, calls and responses.

    {city:<|"|>Paris<|"|>,days:3,units:[<|"|>C<|"|>],detailed:false,extra:null}

Bare keys, strings between `<|"|>` quote tokens, bare numbers, `true`/`false`/`null`, nested
objects `{...}` and lists `[...]`. `format_value` writes it (object keys sorted, as the chat template
does); `parse_value` reads it back into JSON-compatible Python values and raises `SyntaxError_` with
the offending position on malformed input.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

QUOTE = '<|"|>'
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_KEY = re.compile(r"[^\s{}\[\]:,<]+")


class SyntaxError_(ValueError):
    """Malformed Gemma 4 value syntax."""


def format_value(value: Any) -> str:
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite number {value}")
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot write a {type(value).__name__} in Gemma value syntax")


def format_call(name: str, arguments: dict) -> str:
    return f"call:{name}{format_value(arguments)}"


def parse_value(text: str) -> Any:
    value, pos = _Parser(text).value(0)
    pos = _skip(text, pos)
    if pos != len(text):
        raise SyntaxError_(f"unexpected text at {pos}: {text[pos:pos + 20]!r}")
    return value


def parse_call(text: str) -> tuple[str, dict]:
    """`call:NAME{...}` -> (name, arguments)."""
    text = text.strip()
    if not text.startswith("call:"):
        raise SyntaxError_("a tool call must start with 'call:'")
    brace = text.find("{")
    if brace < 0:
        raise SyntaxError_("a tool call needs its arguments in {...}")
    name = text[5:brace].strip()
    if not name or not _KEY.fullmatch(name):
        raise SyntaxError_(f"invalid tool name {name!r}")
    args = parse_value(text[brace:])
    if not isinstance(args, dict):
        raise SyntaxError_("tool call arguments must be an object")
    return name, args


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class _Parser:
    def __init__(self, text: str):
        self.t = text

    def value(self, pos: int) -> tuple[Any, int]:
        t = self.t
        pos = _skip(t, pos)
        if pos >= len(t):
            raise SyntaxError_("unexpected end of input")
        if t.startswith(QUOTE, pos):
            end = t.find(QUOTE, pos + len(QUOTE))
            if end < 0:
                raise SyntaxError_(f"unterminated string at {pos}")
            return t[pos + len(QUOTE):end], end + len(QUOTE)
        c = t[pos]
        if c == "{":
            return self.obj(pos + 1)
        if c == "[":
            return self.arr(pos + 1)
        for word, val in (("true", True), ("false", False), ("null", None)):
            if t.startswith(word, pos) and not (pos + len(word) < len(t) and t[pos + len(word)].isalnum()):
                return val, pos + len(word)
        m = _NUMBER.match(t, pos)
        if m:
            s = m.group(0)
            return (float(s) if any(ch in s for ch in ".eE") else int(s)), m.end()
        raise SyntaxError_(f"unexpected {t[pos:pos + 20]!r} at {pos}")

    def obj(self, pos: int) -> tuple[dict, int]:
        t, out = self.t, {}
        pos = _skip(t, pos)
        if pos < len(t) and t[pos] == "}":
            return out, pos + 1
        while True:
            pos = _skip(t, pos)
            if t.startswith(QUOTE, pos):  # a quoted key is accepted too
                key, pos = self.value(pos)
            else:
                m = _KEY.match(t, pos)
                if not m:
                    raise SyntaxError_(f"expected a key at {pos}")
                key, pos = m.group(0), m.end()
            pos = _skip(t, pos)
            if pos >= len(t) or t[pos] != ":":
                raise SyntaxError_(f"expected ':' after key {key!r} at {pos}")
            out[key], pos = self.value(pos + 1)
            pos = _skip(t, pos)
            if pos < len(t) and t[pos] == ",":
                pos += 1
                continue
            if pos < len(t) and t[pos] == "}":
                return out, pos + 1
            raise SyntaxError_(f"expected ',' or '}}' at {pos}")

    def arr(self, pos: int) -> tuple[list, int]:
        t, out = self.t, []
        pos = _skip(t, pos)
        if pos < len(t) and t[pos] == "]":
            return out, pos + 1
        while True:
            v, pos = self.value(pos)
            out.append(v)
            pos = _skip(t, pos)
            if pos < len(t) and t[pos] == ",":
                pos += 1
                continue
            if pos < len(t) and t[pos] == "]":
                return out, pos + 1
            raise SyntaxError_(f"expected ',' or ']' at {pos}")
