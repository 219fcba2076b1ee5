"""Prompts: chat messages (with image and video parts, tools, thinking, a forced tool call) or raw text,
turned into what the engine takes (token ids, and the preprocessed images the ids refer to)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..text import tokenizer as T
from ..text.chat import ChatError, ChatTemplate, normalize_messages, validate_tools
from ..text.media import MediaPolicy, extract_media
from ..text.tokenizer import Tokenizer


@dataclass
class Prompt:
    ids: list[int]
    images: list = field(default_factory=list)  # preprocessed images / video frames, in soft-token order
    forced: str = ""  # text the prompt forces at the start of the answer (its tokens end `ids`)
    tool_call: tuple[list, str | None] | None = None  # a forced call: (the tools, its name if forced) -> a grammar


def forced_call(tool_choice, tools: list | None) -> str:
    """The opening a `tool_choice` forces into the answer: `required` opens a call, a named function opens
    a call to it; `auto` and `none` force nothing. The choice must name a declared function."""
    if tool_choice in (None, "auto", "none"):
        return ""
    if not tools:
        raise ChatError("tool_choice needs tools")
    if tool_choice == "required":
        return T.CALL_OPEN + "call:"
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ChatError("tool_choice must be 'auto', 'none', 'required' or a function")
    if name not in {t.get("function", {}).get("name") for t in tools if isinstance(t, dict)}:
        raise ChatError(f"tool_choice names an undeclared function {name!r}")
    return T.CALL_OPEN + "call:" + name


@dataclass
class PromptBuilder:
    """Chat messages (with image/video parts) -> prompt ids and the preprocessed images they refer to."""

    tokenizer: Tokenizer
    template: ChatTemplate
    image_ids: tuple[int, int, int] | None = None  # (begin-image, image soft token, end-image); None: no vision
    processor: dict = field(default_factory=dict)  # max_soft_tokens, patch_size, pooling_kernel_size, num_frames

    @classmethod
    def of(cls, checkpoint) -> PromptBuilder:
        """The prompt builder of a loaded checkpoint (its tokenizer, template and, with a vision tower, its
        image token ids and preprocessing settings)."""
        if checkpoint.tokenizer is None:
            raise ChatError(f"{checkpoint.path} has no tokenizer.json: give the engine token ids instead")
        c = checkpoint.config
        vision = checkpoint.vision is not None
        return cls(checkpoint.tokenizer, checkpoint.template,
                   (c.boi_token_id, c.image_token_id, c.eoi_token_id) if vision else None,
                   checkpoint.processor if vision else {})

    def render(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = False,
               add_generation_prompt: bool = True) -> str:
        return self.template.render(normalize_messages(messages), validate_tools(tools),
                                    add_generation_prompt=add_generation_prompt, enable_thinking=thinking)

    def chat_inputs(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = False,
                    policy: MediaPolicy | None = None) -> tuple[list[int], list]:
        """Prompt ids with image/video placeholders expanded, and the preprocessed images (video frames
        included) in the order their soft tokens appear."""
        normalize_messages(messages)  # every message checked before any image is decoded
        messages, media = extract_media(messages, policy or MediaPolicy(), self.image_ids is not None)
        ids = self.tokenizer.encode(self.render(messages, tools, thinking))
        if not media:
            return ids, []
        from ..vision.prompt import expand_media

        return expand_media(ids, media, self.tokenizer, self.image_ids, self.processor)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = False,
             policy: MediaPolicy | None = None, tool_choice="auto") -> Prompt:
        """The prompt of a chat: `tool_choice` as OpenAI's (`none` hides the tools; `required` or a named
        function forces the opening of a call into the answer)."""
        tools = validate_tools(tools)
        forced = forced_call(tool_choice, tools)
        ids, images = self.chat_inputs(messages, tools if tool_choice != "none" else None, thinking, policy)
        call = (tools, forced.removeprefix(T.CALL_OPEN + "call:") or None) if forced else None
        return Prompt(ids + self.tokenizer.encode(forced), images, forced, call)

    def text(self, text: str) -> Prompt:
        """A raw prompt (no chat template): <bos> then the text."""
        return Prompt([self.tokenizer.require_id(self.tokenizer.bos_token)] + self.tokenizer.encode(text))
