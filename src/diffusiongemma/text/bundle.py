"""A checkpoint together with its tokenizer and chat template: messages in, prompt ids out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..loader import Checkpoint, load
from .chat import ChatTemplate, normalize_messages, validate_tools
from .tokenizer import Tokenizer


@dataclass
class TextModel:
    checkpoint: Checkpoint
    tokenizer: Tokenizer
    template: ChatTemplate

    @classmethod
    def load(cls, path: str | Path, dtype: str | torch.dtype | None = "auto") -> TextModel:
        ck = load(path, dtype=dtype)
        tok = Tokenizer.from_dir(path)
        return cls(ck, tok, ChatTemplate.from_dir(path, tok.special_tokens_map()))

    @property
    def name(self) -> str:
        return self.checkpoint.path.name

    def render(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = False,
               add_generation_prompt: bool = True) -> str:
        return self.template.render(normalize_messages(messages), validate_tools(tools),
                                    add_generation_prompt=add_generation_prompt, enable_thinking=thinking)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = False) -> list[int]:
        return self.tokenizer.encode(self.render(messages, tools, thinking))

    def text_ids(self, text: str) -> list[int]:
        """A raw prompt (no chat template): <bos> then the text."""
        return [self.tokenizer.require_id(self.tokenizer.bos_token)] + self.tokenizer.encode(text)
