"""The grammar of a Gemma 4 tool call whose arguments follow the tool's parameter schema (Lark, for llguidance).

A forced call (`tool_choice` "required" or a named function) has its opening `<|tool_call>call:` (and the
name) in the prompt; this grammar covers what the model writes next: the function name when it was not
forced, the arguments in Gemma 4 value syntax (`text.syntax`: bare keys in sorted order, strings between
`<|"|>` quote tokens, bare numbers, true/false/null, nested objects and lists), and `<tool_call|>`.

Schema keywords followed: type (string, number, integer, boolean, null, object, array, or a list of
them), enum, properties with required (optional ones may be left out; other keys are never written),
items, anyOf / oneOf, minLength / maxLength (a string without maxLength has at most 200 characters). Others
(pattern, numeric ranges, $ref ...) raise `ToolGrammarError` naming the keyword, so that a call the grammar
lets through always validates.
"""

from __future__ import annotations

import json

MAX_STRING = 200  # characters of a string argument whose schema sets no maxLength
NUMBER = r"/-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,8})?([eE][-+]?[0-9]{1,3})?/"
INTEGER = r"/-?(0|[1-9][0-9]{0,15})/"
IGNORED = {"description", "title", "default", "examples", "$schema", "additionalProperties", "strict"}
SUPPORTED = {"type", "enum", "properties", "required", "items", "anyOf", "oneOf", "minLength", "maxLength"}


class ToolGrammarError(ValueError):
    pass


class _Builder:
    def __init__(self, quote: int, close: int):
        self.q, self.close = f"<[{quote}]>", f"<[{close}]>"
        self.rules: list[str] = []

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def literal(self, value) -> str:
        if isinstance(value, str):
            if "<" in value:
                raise ToolGrammarError(f"enum value {value!r} contains '<', which a string cannot hold here")
            return f"{self.q} {json.dumps(value)} {self.q}"
        if value is True or value is False or value is None:
            return json.dumps(value)
        if isinstance(value, (int, float)):
            return json.dumps(json.dumps(value))
        raise ToolGrammarError(f"enum value {value!r} is not a string, number, boolean or null")

    def value(self, schema, where: str) -> str:
        if not isinstance(schema, dict):
            raise ToolGrammarError(f"{where} must be a schema object")
        unknown = set(schema) - SUPPORTED - IGNORED
        if unknown:
            raise ToolGrammarError(f"{where} uses {sorted(unknown)[0]!r}, which tool-call grammars do not follow")
        if "enum" in schema:
            return self.rule(" | ".join(self.literal(v) for v in schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.rule(" | ".join(self.value(s, f"{where}.{key}[{i}]") for i, s in enumerate(schema[key])))
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.rule(" | ".join(self.value({**schema, "type": k}, where) for k in kind))
        if kind == "string":  # its text: no marker can start inside it
            lo, hi = int(schema.get("minLength", 0)), int(schema.get("maxLength", MAX_STRING))
            return self.rule(f"{self.q} /[^<]{{{lo},{hi}}}/ {self.q}")
        if kind == "number":
            return self.rule(NUMBER)
        if kind == "integer":
            return self.rule(INTEGER)
        if kind == "boolean":
            return self.rule('"true" | "false"')
        if kind == "null":
            return self.rule('"null"')
        if kind == "array":
            item = self.value(schema.get("items", {"type": ["string", "number", "boolean"]}), f"{where}.items")
            return self.rule(f'"[" ({item} ("," {item})*)? "]"')
        if kind == "object" or (kind is None and "properties" in schema):
            return self.obj(schema, where)
        if kind is None:
            return self.rule(" | ".join(self.value({"type": k}, where) for k in ("string", "number", "boolean")))
        raise ToolGrammarError(f"{where}.type {kind!r} is not a JSON schema type")

    def obj(self, schema: dict, where: str) -> str:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        keys = sorted(props)  # the chat template writes keys sorted; so does the model
        items = [f'"{k}:" {self.value(props[k], f"{where}.properties.{k}")}' for k in keys]
        # after_i: the rest from key i once something was written (each item preceded by a comma);
        # first_i: the rest from key i with nothing written yet
        after, first = ['""'], ['""']
        for i in reversed(range(len(keys))):
            nxt_after, nxt_first = after[0], first[0]
            if keys[i] in required:
                after.insert(0, self.rule(f'"," {items[i]} {nxt_after}'))
                first.insert(0, self.rule(f"{items[i]} {nxt_after}"))
            else:
                after.insert(0, self.rule(f'("," {items[i]})? {nxt_after}'))
                first.insert(0, self.rule(f"{items[i]} {nxt_after} | {nxt_first}"))
        return self.rule(f'"{{" {first[0]} "}}"')


def tool_call_grammar(tools: list[dict], name: str | None, quote_id: int, close_id: int) -> str:
    """Lark grammar of the text after `<|tool_call>call:` (and after `name`, when the call's name was forced)."""
    b = _Builder(quote_id, close_id)
    calls = []
    for t in tools:
        f = t["function"]
        if name is not None and f["name"] != name:
            continue
        args = b.value(f.get("parameters") or {"type": "object", "properties": {}}, f"tools[{f['name']}].parameters")
        calls.append(f"{args} {b.close}" if name is not None else f'"{f["name"]}" {args} {b.close}')
    if not calls:
        raise ToolGrammarError(f"no declared function named {name!r}")
    return "\n".join([f"start: {' | '.join(calls)}", *b.rules])
