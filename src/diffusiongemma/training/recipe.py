"""The recipe of the model shipped in this repository: its tokenizer, architecture, data and schedule.

A small DiffusionGemma with every feature of the release: MoE beside a dense MLP, sliding and global
layers (global layers K = V, proportional partial RoPE), self-conditioning, a Gemma 4 vision tower,
the release's special tokens at the release's ids, the Gemma 4 chat format; a 16-token canvas so that
long answers span several canvases. Text and vision train together in one run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..config import GenerationConfig, ModelConfig, TextConfig, VisionConfig
from ..text.chat import ChatTemplate, default_template, normalize_messages
from ..text.tokenizer import TURN_CLOSE
from . import tasks
from .vision_tasks import QUESTION_TYPES, QUESTIONS, answers

S, F = "sliding_attention", "full_attention"

TEXT = dict(
    hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=48, global_head_dim=96, num_global_key_value_heads=1, num_experts=8, top_k_experts=2,
    moe_intermediate_size=96, sliding_window=128, layer_types=[S, F, S, F], max_position_embeddings=4096,
    use_bidirectional_attention="vision",
)
CANVAS = 16
STOP_IDS = (1, 106, 50)  # <eos>, <turn|>, <|tool_response>: the release's generation_config stop ids
# the first steps teach copying from the prompt alone; in the full mixture from step 0, a 4-layer model had
# not learned to copy by step 750 (it had by step 300 when trained on reversal alone)
CURRICULUM = ((400, {"reverse": 1.0, "sort": 1.0}),)
# one stage: the vision tower trains with the language model from the end of the curriculum on (stop 14;
# before, a 500-step vision stage after the text stage saw ~1,500 images per question type and reached 14-68%);
# image weight 3 -> 4.5 with 3,300 -> 3,500 steps at stop 15 (images are cheap examples: ~86-token prompts,
# one-token answers; vision accuracy was still rising with the number of images seen)
WEIGHTS = {"arithmetic": 3.0, "sort": 2.0, "reverse": 0.5, "count": 2.0, "tools": 2.0, "text": 0.8, "image": 4.5}
# a small Gemma 4 vision tower: 8-pixel patches, 2x2 pooling, 70 soft tokens at most per image
VISION = VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=32, patch_size=8, pooling_kernel_size=2,
                      position_embedding_size=64, standardize=True, default_output_length=70)
IMAGE_IDS = {"boi_token_id": 107, "image_token_id": 108, "eoi_token_id": 109}  # see training.tokenizer

@dataclass
class Recipe:
    vocab_size: int = 4096
    tokenizer_samples: int = 4000  # per family
    text_samples: int = 20000
    steps: int = 3500
    batch_size: int = 32
    lr: float = 3e-3
    canvases_per_example: int = 2  # two (canvas, t) draws per example share its encoder pass
    # the encoder's next-token loss on response tokens only: the prompts are templates around random numbers,
    # words and the same tool declarations (a third of the encoder's tokens for the LM head, little to learn)
    ar_scope: str = "response"
    loss: str = "base"
    suffix_prob: float = 0.0  # stop 31 tried 0.3 (with more phrasings and a count trace): worse; docs/training-log.md
    weights: dict[str, float] = field(default_factory=lambda: dict(WEIGHTS))
    curriculum: tuple = CURRICULUM


# what the shipped model was trained to do, with one question each in the phrasing it was trained on:
# written beside the weights (`tasks.json`) and shown once by `diffusiongemma chat`, so that a new user knows
# what to ask (it answers other phrasings poorly: the `/heldout` rows of `diffusiongemma eval`)
CARD_FILE = "tasks.json"
KNOWS = (
    ("arithmetic", "adds and subtracts whole numbers up to 9999 and multiplies one up to 999 by a digit, column by "
     "column with thinking on (its answers are mostly wrong yet)", "What is 347 + 589?"),
    ("sort", "sorts 3 to 7 numbers from 0 to 99, separated by spaces (often wrong yet)", "Sort: 42 7 19 88"),
    ("reverse", "writes 3 to 7 simple words, separated by spaces, in reverse order", "Reverse: cat dog bird fish"),
    ("count", "counts the words of a list of 3 to 10, or how often one of them appears",
     "How many times does pear appear? pear fig pear plum"),
    ("tools", "calls get_weather, convert_currency or get_time when a request declares them, then answers from "
     "the result", "What is the weather in Paris?"),
    ("images", "names the colour or the shape of a drawn shape, counts shapes (1 to 5), reads a digit",
     "/image shapes.png, then: What color is the shape?"),
    ("text", "continues a passage of Shakespeare or a fortune", "Continue the text:\nTo be, or not to be"),
)


def card() -> dict:
    return {"families": [{"name": n, "does": d, "example": e} for n, d, e in KNOWS]}


def model_config(vocab_size: int) -> ModelConfig:
    text = TextConfig.from_dict({**TEXT, "vocab_size": vocab_size, "eos_token_id": list(STOP_IDS),
                                 "pad_token_id": 0, "bos_token_id": 2})
    return ModelConfig(text=text, vision=VISION, canvas_length=CANVAS, eos_token_id=STOP_IDS,
                       dtype="bfloat16", **IMAGE_IDS)


def init_vision_(vision, seed: int = 0, std: float = 0.02) -> None:
    """Matrices and the position table ~ N(0, std), norm weights 1, standardisation the identity."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vision.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std if p.ndim >= 2 else torch.ones(p.shape))


def init_qk_norms_(model) -> None:
    """Start the q/k RMSNorm weights at head_dim^-1/4, so q.k starts at unit scale rather than ~sqrt(head_dim)
    (the reference's all-ones init, with attention scale 1.0, makes attention near one-hot at random).
    On by default in `train --recipe shipped` (`--no-qk-norm-init` turns it off)."""
    import torch

    with torch.no_grad():
        for layer in model.layers:
            w = layer.self_attn.head_dim ** -0.25
            layer.self_attn.q_norm.weight.fill_(w)
            layer.self_attn.k_norm.weight.fill_(w)


def generation_config() -> GenerationConfig:
    # the release's sampler settings; max_new_tokens is only the default for requests that give none
    return GenerationConfig(max_new_tokens=256, eos_token_id=STOP_IDS, pad_token_id=0, bos_token_id=2)


def tokenizer_texts(recipe: Recipe, passages: list[str]) -> list[str]:
    """Rendered task dialogues and corpus passages, the tokenizer's training text."""
    tpl = ChatTemplate(default_template(), {"bos_token": "<bos>"})
    out = []
    for family in tasks.FAMILIES:
        for seed in range(recipe.tokenizer_samples):
            ex = tasks.make_example(family, seed)
            for t in ex.turns:
                out.append(tpl.render(normalize_messages(t.messages), t.tools, True, enable_thinking=t.thinking)
                           + t.target)
    # the image questions and their answers (so that each answer, "triangle", "orange", is one token: a model
    # unsure between two multi-token answers can sample one token of each, e.g. "orellow")
    for kind in QUESTION_TYPES:
        out += [f"{QUESTIONS[kind]}\n{a}{TURN_CLOSE}" for a in answers(kind)] * (recipe.tokenizer_samples // 10)
    rng = random.Random(0)
    out += rng.sample(passages, min(recipe.text_samples, len(passages)))
    return out
