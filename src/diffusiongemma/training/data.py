"""Training data: task mixtures and chat-format JSONL, rendered with the chat template into
(prompt ids, response ids) pairs. Batches are a function of (seed, step), so a resumed run sees
exactly the data the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from ..generation import PromptBuilder
from ..sampling.draws import key_seed
from ..text.chat import ChatTemplate, normalize_messages, validate_tools
from ..text.syntax import format_call
from ..text.tokenizer import CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, RESPONSE_OPEN, TURN_CLOSE, Tokenizer
from . import tasks


class DataError(ValueError):
    pass


def render_turn(template: ChatTemplate, tok: Tokenizer, turn: tasks.Turn) -> tuple[list[int], list[int]]:
    prompt = template.render(normalize_messages(turn.messages), turn.tools, add_generation_prompt=True,
                             enable_thinking=turn.thinking)
    return tok.encode(prompt), tok.encode(turn.target)


def render_item(builder: PromptBuilder, turn: tasks.Turn) -> tuple[list[int], list[int], list]:
    """A turn to learn as (prompt ids, response ids, images), images expanded into soft tokens."""
    prompt, images = builder.chat_inputs(turn.messages, turn.tools, turn.thinking)
    return prompt, builder.tokenizer.encode(turn.target), images


class TaskMixture:
    """Weighted mixture of task families, text passages and (with a vision tower) image questions."""

    def __init__(self, builder: PromptBuilder, weights: dict[str, float],
                 passages: Sequence[str] | None = None, seed: int = 0, max_tokens: int = 512,
                 curriculum: Sequence[tuple[int, dict[str, float]]] = ()):
        """curriculum: (until step, weights) phases used before `weights` (e.g. copying tasks first)."""
        used = {f for w in [weights, *(w for _, w in curriculum)] for f in w if w[f] > 0}
        unknown = used - set(tasks.GENERATORS) - {"text", "image"}
        if unknown:
            raise DataError(f"unknown task families {sorted(unknown)}")
        if "text" in used and not passages:
            raise DataError("the text family needs passages (the corpus)")
        if "image" in used and builder.image_ids is None:
            raise DataError("the image family needs a model with a vision tower")
        self.builder, self.passages = builder, list(passages or [])
        self.phases = [(until, w) for until, w in curriculum] + [(None, weights)]
        self.seed, self.max_tokens = seed, max_tokens

    def weights_at(self, step: int) -> dict[str, float]:
        return next(w for until, w in self.phases if until is None or step < until)

    def batch(self, step: int, size: int) -> list[tuple[list[int], list[int], list]]:
        rng = random.Random(key_seed(self.seed, step, 0, 7))
        weights = self.weights_at(step)
        families = [f for f in weights if weights[f] > 0]
        out = []
        while len(out) < size:
            family = rng.choices(families, [weights[f] for f in families])[0]
            seed = rng.randrange(tasks.TRAIN_SEEDS.stop)
            if family == "image":
                from .vision_tasks import QUESTION_TYPES, image_example

                ex = image_example(rng.choice(QUESTION_TYPES), seed)
            else:
                ex = tasks.make_example(family, seed, self.passages)
            prompt, response, images = render_item(self.builder, rng.choice(ex.turns))
            if len(prompt) + len(response) <= self.max_tokens:
                out.append((prompt, response, images))
        return out


def assistant_target(message: dict, thinking: bool) -> str:
    """What the model writes for an assistant message: optional thought, content, tool calls, and the
    stop marker (`<|tool_response>` after calls, which hands control to the tools; else `<turn|>`)."""
    out = ""
    reasoning = message.get("reasoning_content") or message.get("reasoning") or message.get("thinking")
    if thinking and reasoning:
        out += f"{CHANNEL_OPEN}thought\n{reasoning}{CHANNEL_CLOSE}"
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    out += (content or "").strip()
    calls = message.get("tool_calls") or []
    for c in calls:
        f = c["function"]
        out += CALL_OPEN + format_call(f["name"], f["arguments"]) + CALL_CLOSE
    return out + (RESPONSE_OPEN if calls else TURN_CLOSE)


class JsonlData:
    """Chat-format JSONL: one object per line with `messages` (OpenAI shape), optional `tools` and
    `enable_thinking`. Every assistant message becomes a turn to learn, its prompt being everything
    before it rendered with the generation prompt."""

    def __init__(self, path: str | Path, tok: Tokenizer, template: ChatTemplate, seed: int = 0,
                 max_tokens: int = 1024):
        self.pairs: list[tuple[list[int], list[int]]] = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                raise DataError(f"{path}:{n}: each line needs a 'messages' list")
            thinking = bool(obj.get("enable_thinking"))
            tools = validate_tools(obj.get("tools"))
            raw = obj["messages"]
            msgs = normalize_messages(raw)
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                prompt = template.render(msgs[:i], tools, add_generation_prompt=True, enable_thinking=thinking)
                p, r = tok.encode(prompt), tok.encode(assistant_target({**raw[i], **m}, thinking))
                if len(p) + len(r) <= max_tokens:
                    self.pairs.append((p, r, []))
        if not self.pairs:
            raise DataError(f"{path}: no assistant turns to learn")
        self.seed = seed

    def batch(self, step: int, size: int) -> list[tuple[list[int], list[int]]]:
        rng = random.Random(key_seed(self.seed, step, 0, 8))
        return [rng.choice(self.pairs) for _ in range(size)]
