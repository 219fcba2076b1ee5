"""The DiffusionGemma network (text stack in encoder and decoder modes)."""

from .text import DiffusionGemmaText, SelfConditioning, TextLayer

__all__ = ["DiffusionGemmaText", "SelfConditioning", "TextLayer"]
