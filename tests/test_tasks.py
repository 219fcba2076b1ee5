"""The task generators: every answer right (checked here from the question, not by the generator's own
arithmetic), the held-out phrasings and lengths never drawn for training, separators mirrored."""

import re

import pytest

from diffusiongemma.text.tokenizer import CALL_OPEN, TURN_CLOSE
from diffusiongemma.training import tasks

N = 400


def _examples(family, heldout, n=N):
    start = tasks.EVAL_SEEDS.start if heldout else 0
    return [tasks.make_example(family, start + i, heldout=heldout) for i in range(n)]


def _question(ex):
    return ex.turns[0].messages[-1]["content"]


def _sep(items_text: str) -> str:
    return ", " if ", " in items_text else "," if "," in items_text else " "


@pytest.mark.parametrize("heldout", [False, True])
def test_arithmetic_answers_are_right(heldout):
    for ex in _examples("arithmetic", heldout):
        a, op, b, c = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", ex.answer).groups()
        assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert sorted(re.findall(r"\d+", _question(ex))) == sorted([a, b])  # "Subtract b from a"
        assert ex.turns[0].target.endswith(ex.answer + TURN_CLOSE)


@pytest.mark.parametrize("heldout", [False, True])
def test_sort_answers_are_right_with_the_question_s_separator(heldout):
    seps = set()
    for ex in _examples("sort", heldout):
        q = _question(ex)
        xs = [int(x) for x in re.findall(r"\d+", q)]
        desc = any(k.strip() in q for k in tasks.HELD_ORDER[True])
        items = re.search(r"\d[\d ,]*\d|\d", q).group(0)
        seps.add(_sep(items))
        assert ex.answer == _sep(items).join(map(str, sorted(xs, reverse=desc))), q
        assert (len(xs) > 7) == heldout, q  # held-out lists are longer than any in training
    assert seps == ({" ", ", ", ","} if heldout else {" "})


@pytest.mark.parametrize("heldout", [False, True])
def test_reverse_and_count_answers_are_right(heldout):
    for ex in _examples("reverse", heldout):
        q = _question(ex)
        words = [w for w in re.findall(r"[a-z]+", q.lower()) if w in tasks.WORDS]
        assert ex.answer.replace(",", " ").split() == words[::-1], q
        assert (len(words) > 7) == heldout
    for ex in _examples("count", heldout):
        q, listed, word = _question(ex), ex.meta["items"], ex.meta["word"]
        assert any(sep.join(listed) in q for sep in tasks.SEPARATORS), q
        if word is None:
            want = len(listed)
        else:  # the asked-for word is named once besides its occurrences in the list
            assert len(re.findall(rf"\b{word}\b", q)) == listed.count(word) + 1, q
            want = listed.count(word)
        assert ex.answer == str(want), q
        assert (len(listed) > 10) == heldout, q


def _literal(template: str) -> str:
    """The fixed words a template starts with, lower-cased ('' when it starts with a placeholder)."""
    return template.split("{")[0].lower().strip(" ,.?")


@pytest.mark.parametrize("family,keys", [("arithmetic", "+-*"), ("sort", ["sort"]), ("reverse", ["reverse"]),
                                         ("count", ["count_word", "count_all"]),
                                         ("tools", ["weather", "currency", "time"])])
def test_held_out_phrasings_never_appear_in_training(family, keys):
    starts = [s for k in keys for s in map(_literal, tasks.HELD_TEMPLATES[k]) if len(s) > 2]
    assert starts
    train = [_question(ex).lower() for ex in _examples(family, False, 2000)]
    assert not [q for q in train if any(q.startswith(s) for s in starts)]
    held = [_question(ex).lower() for ex in _examples(family, True, 200)]
    assert sum(any(q.startswith(s) for s in starts) for q in held) > len(held) // 2
    assert not set(held) & set(train)


def test_tool_calls_and_answers_follow_the_result():
    for ex in _examples("tools", False, 100) + _examples("tools", True, 100):
        assert ex.turns[0].target.startswith(CALL_OPEN + "call:" + ex.call["name"])
        for v in ex.meta["result"].values():
            assert str(v) in ex.answer
