"""Synthetic tasks with checkable answers, in chat form, from seeded generators.

Families: `arithmetic` (addition, subtraction, multiplication by one digit, with a thinking trace that
works column by column), `sort`, `reverse`, `count`, `tools` (dialogues against fake tools, the tool
result fed back), and `text` (continuation of held-apart public-domain text, scored by loss only).

Every example is a list of *turns to learn*: (messages so far, tools, thinking flag, target text),
where the target is exactly what the model must write after the chat template's generation prompt,
ending with its stop marker (`<turn|>`, or `<|tool_response>` when it hands control to a tool).
Training seeds and evaluation seeds come from disjoint ranges (`TRAIN_SEEDS`, `EVAL_SEEDS`).
`make_example(..., heldout=True)` rephrases the same items as a person might (templates the training
never uses, commas between list items, casing, trailing punctuation, lists 1-3 items longer than in
training): `eval` reports these as their own rows (`sort/heldout`). The training draws are unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..text.syntax import format_call
from ..text.tokenizer import CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, RESPONSE_OPEN, TURN_CLOSE

TRAIN_SEEDS = range(0, 10**9)
EVAL_SEEDS = range(10**9, 2 * 10**9)
FAMILIES = ("arithmetic", "sort", "reverse", "count", "tools")
HELDOUT = "/heldout"  # `eval` rows phrased with the held-out templates and lengths: "sort/heldout"
EVAL_FAMILIES = FAMILIES + tuple(f + HELDOUT for f in FAMILIES)
SEPARATORS = (" ", ", ", ",")  # between held-out list items; the answer keeps the question's separator
HELD_TEMPLATES = {
    "+": ["How much is {a} + {b}?", "Find the sum of {a} and {b}.", "Work out {a}+{b}.", "{a} plus {b}"],
    "-": ["How much is {a} - {b}?", "Take {b} away from {a}.", "Work out {a}-{b}.", "{a} minus {b}"],
    "*": ["How much is {a} * {b}?", "Find the product of {a} and {b}.", "Work out {a}x{b}.", "{a} times {b}"],
    "sort": ["Arrange{o}: {xs}", "Rank these numbers{o}: {xs}", "Please order the following{o}: {xs}"],
    "reverse": ["Give these words in reverse order: {w}", "List them last to first: {w}", "Backwards, please: {w}"],
    "count_word": ["Number of times {x} shows up in {w}?", "Tally {x}: {w}", "In {w}, how many are {x}?"],
    "count_all": ["How long is this list: {w}", "Tell me how many words: {w}", "What is the word count of {w}?"],
    "weather": ["Any idea what the weather is doing in {c}?", "Weather report for {c}, please."],
    "currency": ["Exchange {n} {s} for {d}.", "How many {d} do I get for {n} {s}?"],
    "time": ["Time in {z} right now?", "Do you know the time in {z}?"],
}
HELD_ORDER = {False: ["", " in ascending order", " from smallest to largest"],
              True: [" in descending order", " from largest to smallest"]}


def _dress(rng: random.Random, q: str) -> str:
    """Casing and trailing punctuation as a person might type them."""
    if rng.random() < 0.3:
        q = q[0].lower() + q[1:]
    if q[-1].isalnum() and rng.random() < 0.5:
        q += rng.choice(".?")
    return q


def _held_list(rng: random.Random, items: list, hi: int) -> list:
    """The training list, made 1-3 items longer than the training lengths reach (up to hi + 3)."""
    return items + [rng.choice(items) for _ in range(hi + rng.randint(1, 3) - len(items))]

WORDS = ("apple pear fig plum lime kiwi mango grape lemon peach cherry melon olive date "
         "red blue green gold black white pink gray cat dog bird fish frog wolf bear deer "
         "sun moon star rain snow wind cloud river stone tree leaf rose oak pine").split()
CITIES = ("Paris London Tokyo Lisbon Cairo Lima Oslo Rome Berlin Madrid Dublin Vienna Prague Seoul "
          "Delhi Sydney Toronto Nairobi Athens Warsaw").split()
CURRENCIES = ("USD EUR GBP JPY CHF CAD").split()
CONDITIONS = ("sunny cloudy rainy windy snowy foggy").split()
ZONES = ("UTC CET JST EST PST IST").split()

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["amount", "from", "to"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}},
]


@dataclass
class Turn:
    messages: list[dict]
    target: str  # what the model writes after the generation prompt, stop marker included
    tools: list[dict] | None = None
    thinking: bool = False


@dataclass
class Example:
    family: str
    turns: list[Turn]
    answer: str = ""  # the expected final answer text (content), for exact match
    call: dict | None = None  # the expected tool call {"name", "arguments"}
    meta: dict = field(default_factory=dict)


def _digits(n: int) -> list[int]:
    return [int(c) for c in str(n)][::-1]


def arithmetic(rng: random.Random, heldout: bool = False) -> Example:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(10, 999), rng.randint(2, 9)
        lines, carry = [], 0
        for d in _digits(a):
            v = d * b + carry
            lines.append(f"{d}*{b}+{carry}={v}, write {v % 10} carry {v // 10}")
            carry = v // 10
        if carry:
            lines.append(f"write {carry}")
        c, q = a * b, rng.choice(["What is {a} times {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}."])
        sym = "*"
    else:
        a, b = rng.randint(10, 9999), rng.randint(10, 9999)
        if op == "-" and b > a:
            a, b = b, a
        da, db = _digits(a), _digits(b) + [0] * 8
        lines, carry = [], 0
        for i, d in enumerate(da):
            if op == "+":
                v = d + db[i] + carry
                lines.append(f"{d}+{db[i]}+{carry}={v}, write {v % 10} carry {v // 10}")
                carry = v // 10
            else:
                v = d - db[i] - carry
                borrow = 1 if v < 0 else 0
                lines.append(f"{d}-{db[i]}-{carry}={v}, write {v + 10 * borrow} borrow {borrow}")
                carry = borrow
        if op == "+" and carry:
            lines.append(f"write {carry}")
        if op == "+":
            c, q = a + b, rng.choice(["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}."])
        else:
            c, q = a - b, rng.choice(["What is {a} - {b}?", "Compute {a} minus {b}.", "Subtract {b} from {a}."])
        sym = op
    answer = f"{a} {sym} {b} = {c}"
    thinking = rng.random() < 0.85
    if heldout:
        q = _dress(rng, rng.choice(HELD_TEMPLATES[sym]))
    trace = "\n".join(lines)
    target = (f"{CHANNEL_OPEN}thought\n{trace}{CHANNEL_CLOSE}" if thinking else "") + answer + TURN_CLOSE
    msgs = [{"role": "user", "content": q.format(a=a, b=b)}]
    return Example("arithmetic", [Turn(msgs, target, thinking=thinking)], answer, meta={"thinking": thinking})


def sort_task(rng: random.Random, heldout: bool = False) -> Example:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    desc = rng.random() < 0.25
    q = rng.choice(["Sort these numbers{o}: {xs}", "Put in order{o}: {xs}", "Sort{o}: {xs}"])
    order = " in descending order" if desc else ""
    sep = " "
    if heldout:
        xs = _held_list(rng, xs, 7)
        q, order, sep = _dress(rng, rng.choice(HELD_TEMPLATES["sort"])), rng.choice(HELD_ORDER[desc]), rng.choice(SEPARATORS)
    answer = sep.join(map(str, sorted(xs, reverse=desc)))
    msgs = [{"role": "user", "content": q.format(o=order, xs=sep.join(map(str, xs)))}]
    return Example("sort", [Turn(msgs, answer + TURN_CLOSE)], answer)


def reverse_task(rng: random.Random, heldout: bool = False) -> Example:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
    q = rng.choice(["Reverse the list: {w}", "Reverse: {w}", "Write these words backwards in order: {w}"])
    sep = " "
    if heldout:
        words = _held_list(rng, words, 7)
        q, sep = _dress(rng, rng.choice(HELD_TEMPLATES["reverse"])), rng.choice(SEPARATORS)
    answer = sep.join(reversed(words))
    msgs = [{"role": "user", "content": q.format(w=sep.join(words))}]
    return Example("reverse", [Turn(msgs, answer + TURN_CLOSE)], answer)


def count_task(rng: random.Random, heldout: bool = False) -> Example:
    pool = rng.sample(WORDS, 3)
    words = [rng.choice(pool) for _ in range(rng.randint(3, 10))]
    target_word = rng.choice(pool)
    if heldout:
        words = _held_list(rng, words, 10)
    by_word = rng.random() < 0.5
    q = f"How many times does {target_word} appear? {' '.join(words)}" if by_word else \
        f"Count the words: {' '.join(words)}"
    if heldout:
        sep = rng.choice(SEPARATORS)
        q = _dress(rng, rng.choice(HELD_TEMPLATES["count_word" if by_word else "count_all"]))
        q = q.format(x=target_word, w=sep.join(words))
    answer = str(words.count(target_word) if by_word else len(words))
    return Example("count", [Turn([{"role": "user", "content": q}], answer + TURN_CLOSE)], answer,
                   meta={"items": words, "word": target_word if by_word else None})


def tools_task(rng: random.Random, heldout: bool = False) -> Example:
    kind = rng.randrange(3)
    if kind == 0:
        city = rng.choice(CITIES)
        q = rng.choice(["What is the weather in {c}?", "How is the weather in {c} today?", "Weather in {c}?"])
        q = (rng.choice(HELD_TEMPLATES["weather"]) if heldout else q).format(c=city)
        call = {"name": "get_weather", "arguments": {"city": city}}
        result = {"temperature": rng.randint(-10, 35), "condition": rng.choice(CONDITIONS)}
        answer = f"It is {result['temperature']} degrees and {result['condition']} in {city}."
    elif kind == 1:
        amount, src, dst = rng.randint(1, 999), *rng.sample(CURRENCIES, 2)
        q = rng.choice(["Convert {n} {s} to {d}.", "How much is {n} {s} in {d}?"])
        q = (rng.choice(HELD_TEMPLATES["currency"]) if heldout else q).format(n=amount, s=src, d=dst)
        call = {"name": "convert_currency", "arguments": {"amount": amount, "from": src, "to": dst}}
        value = round(amount * rng.uniform(0.2, 3.0), 2)
        result = {"result": value}
        answer = f"{amount} {src} is {value} {dst}."
    else:
        zone = rng.choice(ZONES)
        q = rng.choice(["What time is it in {z}?", "Tell me the time in {z}."])
        q = (rng.choice(HELD_TEMPLATES["time"]) if heldout else q).format(z=zone)
        call = {"name": "get_time", "arguments": {"zone": zone}}
        h, m = rng.randint(0, 23), rng.randint(0, 59)
        result = {"time": f"{h:02d}:{m:02d}"}
        answer = f"It is {h:02d}:{m:02d} in {zone}."
    tools = list(TOOLS)
    rng.shuffle(tools)
    user = [{"role": "user", "content": q}]
    call_text = CALL_OPEN + format_call(call["name"], call["arguments"]) + CALL_CLOSE + RESPONSE_OPEN
    assistant = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]}
    tool_msg = {"role": "tool", "tool_call_id": "call_0", "name": call["name"], "response": result}
    turns = [Turn(user, call_text, tools), Turn(user + [assistant, tool_msg], answer + TURN_CLOSE, tools)]
    return Example("tools", turns, answer, call=call, meta={"result": result})


def text_task(rng: random.Random, passages: list[str]) -> Example:
    p = rng.choice(passages)
    words = p.split(" ")
    cut = max(3, min(len(words) // 3, 24))
    head, tail = " ".join(words[:cut]), " ".join(words[cut:cut + 48])
    q = rng.choice(["Continue the text:\n{h}", "Continue:\n{h}"]).format(h=head)
    return Example("text", [Turn([{"role": "user", "content": q}], tail + TURN_CLOSE)], tail)


GENERATORS = {"arithmetic": arithmetic, "sort": sort_task, "reverse": reverse_task, "count": count_task,
              "tools": tools_task}


def make_example(family: str, seed: int, passages: list[str] | None = None, heldout: bool = False) -> Example:
    """heldout: the same item phrased with the held-out templates, separators and lengths."""
    rng = random.Random(seed)
    if family == "text":
        if not passages:
            raise ValueError("the text family needs passages")
        return text_task(rng, passages)
    return GENERATORS[family](rng, heldout)
