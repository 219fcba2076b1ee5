"""The generation layer: text on both sides of the engine. A `Generator` takes a loaded checkpoint, prompts
(chat messages with tools, images and thinking, raw text, or ids), sampler settings and output options,
and gives draft frames, content / reasoning / tool-call deltas and a final `Result` per request."""

from .generator import Generator
from .output import Output, OutputOptions, Result, TextRequest, parse_ids
from .prompt import Prompt, PromptBuilder, forced_call

__all__ = ["Generator", "Output", "OutputOptions", "Prompt", "PromptBuilder", "Result", "TextRequest",
           "forced_call", "parse_ids"]
