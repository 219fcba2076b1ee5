"""Synthetic tasks with checkable answers, in chat form, from seeded generators.

Families: `arithmetic` (addition, subtraction, multiplication by one digit, with a thinking trace that
works column by column), `sort`, `reverse`, `count`, `tools` (dialogues against fake tools, the tool
result fed back), and `text` (continuation of held-apart public-domain text, scored by loss only).

Every example is a list of *turns to learn*: (messages so far, tools, thinking flag, target text),
where the target is exactly what the model must write after the chat template's generation prompt,
ending with its stop marker (`<turn|>`, or `<|tool_response>` when it hands control to a tool).
Training seeds and evaluation seeds come from disjoint ranges (`TRAIN_SEEDS`, `EVAL_SEEDS`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..text.syntax import format_call
from ..text.tokenizer import CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, RESPONSE_OPEN, TURN_CLOSE

TRAIN_SEEDS = range(0, 10**9)
EVAL_SEEDS = range(10**9, 2 * 10**9)
FAMILIES = ("arithmetic", "sort", "reverse", "count", "tools")

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


def arithmetic(rng: random.Random) -> Example:
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
    trace = "\n".join(lines)
    target = (f"{CHANNEL_OPEN}thought\n{trace}{CHANNEL_CLOSE}" if thinking else "") + answer + TURN_CLOSE
    msgs = [{"role": "user", "content": q.format(a=a, b=b)}]
    return Example("arithmetic", [Turn(msgs, target, thinking=thinking)], answer, meta={"thinking": thinking})


def sort_task(rng: random.Random) -> Example:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    desc = rng.random() < 0.25
    q = rng.choice(["Sort these numbers{o}: {xs}", "Put in order{o}: {xs}", "Sort{o}: {xs}"])
    order = " in descending order" if desc else ""
    answer = " ".join(map(str, sorted(xs, reverse=desc)))
    msgs = [{"role": "user", "content": q.format(o=order, xs=" ".join(map(str, xs)))}]
    return Example("sort", [Turn(msgs, answer + TURN_CLOSE)], answer)


def reverse_task(rng: random.Random) -> Example:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
    q = rng.choice(["Reverse the list: {w}", "Reverse: {w}", "Write these words backwards in order: {w}"])
    answer = " ".join(reversed(words))
    msgs = [{"role": "user", "content": q.format(w=" ".join(words))}]
    return Example("reverse", [Turn(msgs, answer + TURN_CLOSE)], answer)


def count_task(rng: random.Random) -> Example:
    pool = rng.sample(WORDS, 3)
    words = [rng.choice(pool) for _ in range(rng.randint(3, 10))]
    target_word = rng.choice(pool)
    n = words.count(target_word)
    if rng.random() < 0.5:
        q = f"How many times does {target_word} appear? {' '.join(words)}"
    else:
        q = f"Count the words: {' '.join(words)}"
        n = len(words)
    answer = str(n)
    return Example("count", [Turn([{"role": "user", "content": q}], answer + TURN_CLOSE)], answer)


def tools_task(rng: random.Random) -> Example:
    kind = rng.randrange(3)
    if kind == 0:
        city = rng.choice(CITIES)
        q = rng.choice(["What is the weather in {c}?", "How is the weather in {c} today?", "Weather in {c}?"])
        q = q.format(c=city)
        call = {"name": "get_weather", "arguments": {"city": city}}
        result = {"temperature": rng.randint(-10, 35), "condition": rng.choice(CONDITIONS)}
        answer = f"It is {result['temperature']} degrees and {result['condition']} in {city}."
    elif kind == 1:
        amount, src, dst = rng.randint(1, 999), *rng.sample(CURRENCIES, 2)
        q = rng.choice(["Convert {n} {s} to {d}.", "How much is {n} {s} in {d}?"]).format(n=amount, s=src, d=dst)
        call = {"name": "convert_currency", "arguments": {"amount": amount, "from": src, "to": dst}}
        value = round(amount * rng.uniform(0.2, 3.0), 2)
        result = {"result": value}
        answer = f"{amount} {src} is {value} {dst}."
    else:
        zone = rng.choice(ZONES)
        q = rng.choice(["What time is it in {z}?", "Tell me the time in {z}."]).format(z=zone)
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


def make_example(family: str, seed: int, passages: list[str] | None = None) -> Example:
    rng = random.Random(seed)
    if family == "text":
        if not passages:
            raise ValueError("the text family needs passages")
        return text_task(rng, passages)
    return GENERATORS[family](rng)
