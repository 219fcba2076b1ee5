"""The model shipped in the repository: release layout, loadable by transformers with the same logits,
small enough, and it answers held-out task items."""

import json

import pytest
import torch

import diffusiongemma as dg
from diffusiongemma.engine import Engine, SamplingParams
from diffusiongemma.text.bundle import TextModel
from diffusiongemma.text.stream import TextStream
from diffusiongemma.training import tasks
from diffusiongemma.training.tokenizer import RELEASE_SPECIALS
from diffusiongemma.training.vision_tasks import make_image_example


def test_release_layout_and_size(shipped_model_dir):
    names = {p.name for p in shipped_model_dir.iterdir()}
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "preprocessor_config.json"):
        assert f in names, f
    assert sum(p.stat().st_size for p in shipped_model_dir.iterdir()) < 25 * 2**20
    gen = json.loads((shipped_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106, 50] and gen["max_denoising_steps"] == 48
    tm = TextModel.load(shipped_model_dir)
    for i, s in RELEASE_SPECIALS.items():
        assert tm.tokenizer.token_id(s) == i
    cfg = tm.checkpoint.config
    assert "full_attention" in cfg.text.layer_types and "sliding_attention" in cfg.text.layer_types
    assert cfg.text.num_experts > 1 and cfg.vision is not None and tm.sees


def test_loads_in_transformers_with_the_same_logits(shipped_model_dir):
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(str(shipped_model_dir), dtype=torch.float32).eval()
    tm = TextModel.load(shipped_model_dir, dtype="float32")
    img, q, _ = make_image_example("color", 3)
    ids, images = tm.chat_inputs([{"role": "user", "content": [{"type": "image", "image": img},
                                                               {"type": "text", "text": q}]}])
    ids_t = torch.tensor(ids)
    model, cache = tm.checkpoint.model, tm.checkpoint.model.new_cache()
    from diffusiongemma.vision.placement import embed_prompt

    cfg = tm.checkpoint.config
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
        embeds, blocks = embed_prompt(model, tm.checkpoint.vision, ids_t, images, (cfg.image_token_id,))
        hidden = model.encode(None, [cache], inputs_embeds=embeds, block_ids=blocks)
        torch.testing.assert_close(hidden, out.last_hidden_state[0], atol=1e-4, rtol=0)
        canvas = torch.randint(0, cfg.text.vocab_size, (1, cfg.canvas_length))
        want = ref(decoder_input_ids=canvas, past_key_values=cache_t).logits[0]
        torch.testing.assert_close(model.logits(model.decode(canvas[0], [cache])), want, atol=1e-4, rtol=0)


def _held_out_right(model_dir, families, n=4):
    """Exact answers on a fixed handful of held-out items with fixed seeds (the full evaluation is
    `diffusiongemma eval`; its table is in the README)."""
    tm = TextModel.load(model_dir)
    engine = Engine.from_checkpoint(tm.checkpoint, extra_soft_ids=tm.engine_soft_ids())
    right = total = 0
    for family in families:
        for i in range(n):
            ex = tasks.make_example(family, tasks.EVAL_SEEDS.start + 50_000 + i)
            turn = ex.turns[0]
            ids, images = tm.chat_inputs(turn.messages, turn.tools, turn.thinking)
            s = TextStream(tm.tokenizer)
            engine.generate([ids], SamplingParams(max_tokens=128, seed=i), hooks=[s])
            s.finish()
            if family == "tools":  # the first turn is the call
                right += len(s.calls) == 1 and s.calls[0].name == ex.call["name"] \
                    and s.calls[0].arguments == ex.call["arguments"]
            else:
                right += s.content.strip() == ex.answer
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
