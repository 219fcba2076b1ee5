"""Structured output: OpenAI's `response_format` (`json_object`, `json_schema`) as a grammar over token ids,
applied by the engine's causal verifier, so that a request's answer parses and validates.

The grammar engine is llguidance (PyPI `llguidance`, the `structured` extra): it compiles a JSON schema to
a grammar and gives, for any token prefix, the mask of tokens that keep the output completable, in tens of
microseconds at a 262K vocabulary, with rollback (the verifier looks ahead through a drafted canvas and
returns to the accepted prefix). xgrammar does the same job; llguidance was chosen because it takes the
`tokenizers` JSON of the checkpoint directly (no transformers tokenizer object), has the broader JSON
schema coverage (JSONSchemaBench) and is the engine behind OpenAI's and vLLM's structured outputs.

JSON is written compactly (no free whitespace, so a model cannot stall on whitespace forever). The
answer ends with one of the request's stop ids, which the grammar allows only once the JSON is complete:
a constrained answer never finishes with `stop` unless it is valid; one that runs out of `max_tokens` ends
with `length`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from ..engine import RequestError

ERR = "response_format"


def response_schema(response_format) -> dict | None:
    """The JSON schema a `response_format` asks for (None: free text). Raises RequestError naming the problem."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError(f"response_format must be an object, got {type(response_format).__name__}", ERR)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise RequestError("response_format.json_schema must be an object with a 'schema' object", ERR)
        if "name" in spec and not isinstance(spec["name"], str):
            raise RequestError("response_format.json_schema.name must be a string", ERR)
        return spec.get("schema", {})
    raise RequestError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", ERR)


class Grammars:
    """Compiles schemas into constraints for one tokenizer and vocabulary (the llguidance tokenizer is built
    once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, list(stop_ids)
        self._ll = None

    def _lib(self):
        try:
            import llguidance
        except ImportError:
            raise RequestError("structured output needs llguidance: pip install 'diffusiongemma[structured]'",
                               ERR) from None
        if self._ll is None:
            self._ll = llguidance.LLTokenizer(self.tokenizer.tk.to_str(), n_vocab=self.vocab_size,
                                              eos_token=self.stop_ids)
        return llguidance, self._ll

    def compile(self, schema: dict) -> str:
        """The grammar of a JSON schema; RequestError (naming the problem) when llguidance rejects it."""
        llguidance, tok = self._lib()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise RequestError(f"response_format schema is not valid: {e}", ERR) from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tok)
        if error:
            raise RequestError(f"response_format schema is not supported: {error}", ERR)
        return grammar

    def compile_tool_call(self, tools: list[dict], name: str | None) -> str:
        """The grammar of a forced tool call's continuation (`tool_grammar`); RequestError naming the problem."""
        from ..text import tokenizer as T
        from .tool_grammar import ToolGrammarError, tool_call_grammar

        llguidance, tok = self._lib()
        quote, close = self.tokenizer.token_id(T.QUOTE), self.tokenizer.token_id(T.CALL_CLOSE)
        if quote is None or close is None:
            raise RequestError("this tokenizer has no Gemma 4 call markers: tool calls cannot be constrained",
                               "tool_choice")
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(tool_call_grammar(tools, name, quote, close))
        except ToolGrammarError as e:
            raise RequestError(f"tool_choice: {e}", "tool_choice") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tok)
        if error:
            raise RequestError(f"tool_choice: the tool's parameters give no usable grammar: {error}", "tool_choice")
        return grammar

    def constraint(self, grammar: str) -> GrammarConstraint:
        llguidance, tok = self._lib()
        return GrammarConstraint(llguidance.LLMatcher(tok, grammar, log_level=0), self.vocab_size, self.stop_ids)


class GrammarConstraint:
    """The engine's `Constraint` for one request: an llguidance matcher kept at the tokens emitted so far."""

    def __init__(self, matcher, vocab_size: int, stop_ids: Sequence[int]):
        self.m, self.vocab_size, self.stop_ids = matcher, vocab_size, set(stop_ids)
        self._bits = torch.arange(32, dtype=torch.int32)
        self._after_stop = torch.zeros(vocab_size, dtype=torch.bool)
        self._after_stop[list(self.stop_ids)] = True

    def _mask(self) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self.m.compute_bitmask()), dtype=torch.int32)
        return ((words[:, None] >> self._bits) & 1).bool().flatten()[:self.vocab_size]

    def masks(self, draft: Sequence[int]) -> list[torch.Tensor]:
        out, consumed = [], 0
        for j in range(len(draft) + 1):
            mask = self._mask()
            out.append(mask)
            if j == len(draft) or not bool(mask[draft[j]]):
                break
            if draft[j] in self.stop_ids:  # an allowed stop id ends the answer: nothing after it is emitted
                out.append(self._after_stop)
                break
            if not self.m.consume_token(int(draft[j])):
                raise RuntimeError(f"grammar matcher refused an allowed token: {self.m.get_error()}")
            consumed += 1
        if consumed:
            self.m.rollback(consumed)
        return out

    def consume(self, tokens: Sequence[int]) -> None:
        tokens = [int(t) for t in tokens]
        if any(t in self.stop_ids for t in tokens):  # the answer ends here: nothing more to follow
            tokens = tokens[:next(i for i, t in enumerate(tokens) if t in self.stop_ids)]
        if tokens and not self.m.consume_tokens(tokens):
            raise RuntimeError(f"the engine emitted tokens the grammar does not allow: {self.m.get_error()}")

    @property
    def error(self) -> str | None:
        return self.m.get_error() if self.m.is_error() else None
