"""Synthetic images drawn with Pillow, with questions whose answers are checkable.

Question types: `color` (the colour of one shape), `shape` (circle, square or triangle), `count` (how
many shapes, 1 to 5) and `digit` (a digit rendered in a random place and size). 96x96 pixels on a
white background; positions, sizes and colours are random; seeds as in `tasks` (training and
evaluation ranges are disjoint).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

from ..text.tokenizer import TURN_CLOSE
from .tasks import Example, Turn

SIZE = 96
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (230, 200, 20),
          "purple": (140, 50, 170), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("color", "shape", "count", "digit")
MAX_SHAPES = 5  # count questions: 1 to MAX_SHAPES shapes
QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is this?",
             "count": "How many shapes are there?", "digit": "What digit is written?"}


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color):
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _free_boxes(rng: random.Random, n: int, lo: int, hi: int):
    boxes, tries = [], 0
    while len(boxes) < n and tries < 500:
        tries += 1
        s = rng.randint(lo, hi)
        x, y = rng.randint(2, SIZE - s - 2), rng.randint(2, SIZE - s - 2)
        box = (x, y, x + s, y + s)
        if all(box[2] + 3 < b[0] or b[2] + 3 < box[0] or box[3] + 3 < b[1] or b[3] + 3 < box[1] for b in boxes):
            boxes.append(box)
    return boxes


def make_image_example(kind: str, seed: int) -> tuple[Image.Image, str, str]:
    """(image, question, answer)."""
    rng = random.Random(seed)
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if kind in ("color", "shape"):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        box = _free_boxes(rng, 1, 28, 60)[0]
        _draw_shape(d, shape, box, COLORS[color])
        answer = color if kind == "color" else shape
    elif kind == "count":
        n = rng.randint(1, MAX_SHAPES)
        boxes = _free_boxes(rng, n, 14, 22)
        n = len(boxes)
        for box in boxes:
            _draw_shape(d, rng.choice(SHAPES), box, COLORS[rng.choice(list(COLORS))])
        answer = str(n)
    elif kind == "digit":
        digit = str(rng.randint(0, 9))
        size = rng.randint(40, 64)
        font = ImageFont.load_default(size=size)
        x, y = rng.randint(4, SIZE - size // 2 - 8), rng.randint(-4, SIZE - size - 4)
        d.text((x, y), digit, fill=(0, 0, 0), font=font)
        answer = digit
    else:
        raise ValueError(f"unknown question type {kind!r}")
    return img, QUESTIONS[kind], answer


def answers(kind: str) -> list[str]:
    """Every answer a question type can have."""
    return {"color": list(COLORS), "shape": list(SHAPES), "count": [str(n) for n in range(1, MAX_SHAPES + 1)],
            "digit": [str(n) for n in range(10)]}[kind]


def image_example(kind: str, seed: int) -> Example:
    img, question, answer = make_image_example(kind, seed)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]}]
    return Example(f"image_{kind}", [Turn(msgs, answer + TURN_CLOSE)], answer)
