"""Train a small byte-level BPE tokenizer that keeps the release's special tokens at the release's ids.

Ids 0-106 hold the Gemma 4 special tokens where the release has them (`<pad>` 0, `<eos>` 1,
`<bos>` 2, tool tokens 46-52, `<|think|>` 98, channel 100/101, turn 105/106) and `<unusedN>`
placeholders elsewhere; the image/video markers follow; the learned vocabulary comes after. Digits
are split one per token (as Gemma's tokenizer does). Byte-level, so any text round-trips.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..text import tokenizer as T
from ..text.chat import default_template

RELEASE_SPECIALS = {
    0: T.PAD, 1: T.EOS, 2: T.BOS, 3: "<unk>", 4: "<mask>",
    46: T.TOOL_OPEN, 47: T.TOOL_CLOSE, 48: T.CALL_OPEN, 49: T.CALL_CLOSE, 50: T.RESPONSE_OPEN,
    51: T.RESPONSE_CLOSE, 52: T.QUOTE, 98: T.THINK, 100: T.CHANNEL_OPEN, 101: T.CHANNEL_CLOSE,
    105: T.TURN_OPEN, 106: T.TURN_CLOSE,
}
EXTRA_SPECIALS = [T.IMAGE_OPEN, T.IMAGE_TOKEN, T.IMAGE_CLOSE, T.VIDEO_TOKEN]


def special_tokens() -> list[str]:
    first = [RELEASE_SPECIALS.get(i, f"<unused{i}>") for i in range(max(RELEASE_SPECIALS) + 1)]
    return first + EXTRA_SPECIALS


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens(), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    for i, s in RELEASE_SPECIALS.items():
        assert tk.token_to_id(s) == i, (s, tk.token_to_id(s), i)
    return tk


def save_tokenizer(tk: Tokenizer, path: str | Path, chat_template: str | None = None) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, as the release ships them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": T.BOS, "eos_token": T.EOS,
           "pad_token": T.PAD, "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
           "padding_side": "left", "model_max_length": 1_000_000}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(chat_template or default_template())
