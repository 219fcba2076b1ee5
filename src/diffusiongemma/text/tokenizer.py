"""Tokenizer: `tokenizer.json` through the `tokenizers` library, plus incremental detokenisation.

Special tokens are looked up by their strings in the tokenizer (never by literal ids), so the same code
works with the release tokenizer and with a small one trained here.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

# Strings of the Gemma 4 markers this project reads and writes.
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
CHANNEL_OPEN, CHANNEL_CLOSE, THINK = "<|channel>", "<channel|>", "<|think|>"
TOOL_OPEN, TOOL_CLOSE = "<|tool>", "<tool|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
QUOTE = '<|"|>'
IMAGE_OPEN, IMAGE_TOKEN, IMAGE_CLOSE, VIDEO_TOKEN = "<|image>", "<|image|>", "<image|>", "<|video|>"


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, tk: _HFTokenizer, config: dict | None = None):
        self.tk = tk
        config = config or {}

        def name(key, default):
            v = config.get(key, default)
            return v.get("content") if isinstance(v, dict) else v

        self.bos_token = name("bos_token", BOS)
        self.eos_token = name("eos_token", EOS)
        self.pad_token = name("pad_token", PAD)
        self.unk_token = name("unk_token", "<unk>")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        f = path / "tokenizer.json"
        if not f.is_file():
            raise TokenizerError(f"{path} has no tokenizer.json")
        try:
            tk = _HFTokenizer.from_file(str(f))
        except Exception as e:  # the library raises a generic Exception on malformed files
            raise TokenizerError(f"{f} is not a valid tokenizer file: {e}") from None
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        return cls(tk, cfg)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def special_tokens_map(self) -> dict[str, str]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                "unk_token": self.unk_token}

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def require_id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise TokenizerError(f"the tokenizer has no token {token!r}")
        return i

    def encode(self, text: str) -> list[int]:
        """Text -> ids with no tokens added (chat templates write <bos> themselves)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)


class IncrementalDecoder:
    """Decode a growing id sequence chunk by chunk, never emitting a broken character.

    Text is decoded from a few tokens of context before the new ones and only the part after that
    context is emitted; if the new text ends in an incomplete UTF-8 sequence (U+FFFD), it is held
    back until the next tokens complete it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens already emitted

    def feed(self, ids) -> str:
        self.ids.extend(int(i) for i in ids)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        return new

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character comes out as U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text):]
