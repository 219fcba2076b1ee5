"""The model shipped in the repository: release layout, loadable by transformers with the same logits,
small enough, and it answers held-out task items."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffusiongemma as dg
from diffusiongemma.engine import SamplingParams
from diffusiongemma.generation import Generator
from diffusiongemma.training import tasks
from diffusiongemma.training.tokenizer import RELEASE_SPECIALS
from diffusiongemma.training.vision_tasks import make_image_example

REPO = Path(__file__).resolve().parents[1]


def test_release_layout_and_size(shipped_model_dir):
    names = {p.name for p in shipped_model_dir.iterdir()}
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "preprocessor_config.json"):
        assert f in names, f
    assert sum(p.stat().st_size for p in shipped_model_dir.iterdir()) < 25 * 2**20
    gen = json.loads((shipped_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106, 50] and gen["max_denoising_steps"] == 48
    ck = dg.load(shipped_model_dir)
    for i, s in RELEASE_SPECIALS.items():
        assert ck.tokenizer.token_id(s) == i
    cfg = ck.config
    assert "full_attention" in cfg.text.layer_types and "sliding_attention" in cfg.text.layer_types
    assert cfg.text.num_experts > 1 and cfg.vision is not None and ck.vision is not None


def test_loads_in_transformers_with_the_same_logits(shipped_model_dir):
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(str(shipped_model_dir), dtype=torch.float32).eval()
    ck = dg.load(shipped_model_dir, dtype="float32")
    img, q, _ = make_image_example("color", 3)
    prompt = Generator(ck).chat([{"role": "user", "content": [{"type": "image", "image": img},
                                                             {"type": "text", "text": q}]}])
    ids, images = prompt.ids, prompt.images
    ids_t = torch.tensor(ids)
    model, cache = ck.model, ck.model.new_cache()
    from diffusiongemma.vision.placement import embed_prompt

    cfg = ck.config
    tt = (ids_t == cfg.image_token_id).long()[None]
    cache_t = DynamicCache(config=ref.config.text_config)
    pos = torch.arange(len(ids))[None]
    masks = ref.model.encoder.create_masks_for_generate(
        config=ref.config, inputs_embeds=torch.empty(1, len(ids), 0), attention_mask=torch.ones(1, len(ids), dtype=torch.bool),
        past_key_values=cache_t, position_ids=pos, mm_token_type_ids=tt)
    with torch.no_grad():
        out = ref.model.encoder(input_ids=ids_t[None], attention_mask=masks, past_key_values=cache_t, position_ids=pos,
                                pixel_values=torch.stack([im.pixel_values for im in images]),
                                image_position_ids=torch.stack([im.positions for im in images]), mm_token_type_ids=tt)
        embeds, blocks = embed_prompt(model, ck.vision, ids_t, images, (cfg.image_token_id,))
        hidden = model.encode(None, [cache], inputs_embeds=embeds, block_ids=blocks)
        torch.testing.assert_close(hidden, out.last_hidden_state[0], atol=1e-4, rtol=0)
        canvas = torch.randint(0, cfg.text.vocab_size, (1, cfg.canvas_length))
        want = ref(decoder_input_ids=canvas, past_key_values=cache_t).logits[0]
        torch.testing.assert_close(model.logits(model.decode(canvas[0], [cache])), want, atol=1e-4, rtol=0)


def _held_out_right(model_dir, families, n=4):
    """Exact answers on a fixed handful of held-out items with fixed seeds (the full evaluation is
    `diffusiongemma eval`; its table is in the README)."""
    gen = Generator(dg.load(model_dir))
    right = total = 0
    for family in families:
        for i in range(n):
            ex = tasks.make_example(family, tasks.EVAL_SEEDS.start + 50_000 + i)
            turn = ex.turns[0]
            r = gen.run([gen.chat(turn.messages, turn.tools, turn.thinking)], SamplingParams(max_tokens=128, seed=i))[0]
            if family == "tools":  # the first turn is the call
                right += len(r.tool_calls) == 1 and r.tool_calls[0].name == ex.call["name"] \
                    and r.tool_calls[0].arguments == ex.call["arguments"]
            else:
                right += r.content.strip() == ex.answer
            total += 1
    return right, total


def test_answers_held_out_items(shipped_model_dir):
    """The families the shipped model has learned (README table: reverse 100%, count 64%, valid tool calls 100%)."""
    right, total = _held_out_right(shipped_model_dir, ("reverse", "count", "tools"))
    assert right >= 3 * total // 4, f"{right}/{total}"
    assert dg.load(shipped_model_dir).config.canvas_length == 16


@pytest.mark.xfail(strict=True, reason="the shipped model has not learned sorting or arithmetic (37% and 0% in the README "
                   "table, issue 5); strict: this flags when a retrained model passes")
def test_answers_held_out_sort_and_arithmetic(shipped_model_dir):
    right, total = _held_out_right(shipped_model_dir, ("sort", "arithmetic"))
    assert right >= total // 2, f"{right}/{total}"


# `make demo`'s question (the Makefile's DEMO line) and its right answer, as the model writes it
DEMO_ANSWERS = {"What is 347 + 589?": "347 + 589 = 936"}


def _demo_question() -> str:
    makefile = (REPO / "Makefile").read_text()
    m = re.search(r"^DEMO \?= (.+)$", makefile, re.M)
    assert m, "the Makefile has no DEMO question"
    assert '"$(DEMO)" --think --show-canvas' in makefile
    return m.group(1).strip()


@pytest.mark.xfail(strict=True, reason="the shipped model's sums are wrong (arithmetic 0% in the README table, issue 25: "
                   "stop 31's retrain did not fix it); strict: this flags when a retrained model passes")
def test_make_demo_answers_right_for_seeds_0_to_9(shipped_model_dir, capsys):
    """`make demo`'s command, run as the user runs it (seed 0 in a subprocess, seeds 1-9 through the same
    entry point in this process): the right answer every time, the thinking shown apart from it."""
    from diffusiongemma.cli.generate import main

    q = _demo_question()
    want = DEMO_ANSWERS[q]
    r = subprocess.run([sys.executable, "-m", "diffusiongemma", "generate", q, "--think", "--show-canvas", "--seed",
                        "0", "--model", str(shipped_model_dir)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert want in r.stdout and "tokens/forward" in r.stderr, (r.stdout, r.stderr)
    answers = {}
    for seed in range(1, 10):
        assert main([q, "--think", "--seed", str(seed), "--json", "--model", str(shipped_model_dir)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["reasoning"], out  # the thinking, parsed apart from the answer
        answers[seed] = out["text"].strip()
    assert all(a == want for a in answers.values()), answers


def test_chat_tells_a_new_user_once_what_the_model_knows(shipped_model_dir, tmp_path):
    from diffusiongemma.cli.chat import describe
    from diffusiongemma.training.recipe import KNOWS

    r = subprocess.run([sys.executable, "-m", "diffusiongemma", "chat", "--model", str(shipped_model_dir)],
                       input="/think on\n/reset\n/quit\n", capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("trained on these tasks") == 1, r.stderr
    for name, _, example in KNOWS:
        assert f"  {name}: " in r.stderr and example.splitlines()[0] in r.stderr
    assert describe(tmp_path) is None  # no card: nothing said
    (tmp_path / "tasks.json").write_text('{"families": [{"name": "x"}]}')
    assert "unreadable: KeyError" in describe(tmp_path)
    (tmp_path / "tasks.json").write_text("{not json")
    assert "unreadable: JSONDecodeError" in describe(tmp_path)
