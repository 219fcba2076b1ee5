"""Whole-model parity with transformers 5.23.0 on random checkpoints saved in the release format.

Checkpoints are built and saved by the reference (`DiffusionGemmaForBlockDiffusion.save_pretrained`),
loaded by our loader, and compared on CPU in fp32 (max abs difference <= 1e-5) or bf16 (within bf16
rounding: 0.05 absolute on logits bounded by the softcap of 30, i.e. a few bf16 ulps), in one thread
(conftest `one_thread`).
"""

import pytest
import torch
from transformers import DynamicCache

import diffusiongemma as dg
from hf_utils import make_hf_model, save_hf

TOL = dict(atol=1e-5, rtol=0)
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "tiny": {},
    "window-3-layers": dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                               "full_attention"], sliding_window=5),
    "full-first": dict(num_hidden_layers=4, layer_types=["full_attention", "sliding_attention",
                                                         "sliding_attention", "full_attention"],
                       num_experts=8, top_k_experts=3, head_dim=16, global_head_dim=8),
    "mqa-many-experts": dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                             num_global_key_value_heads=2, num_experts=16, top_k_experts=1,
                             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                             hidden_size=48, head_dim=12, global_head_dim=24, moe_intermediate_size=12),
    "default-pattern-7": dict(num_hidden_layers=7, layer_types=None, num_experts=6, top_k_experts=6,
                              sliding_window=4),
}


def load_pair(tmp_path, name="tiny", dtype="float32", seed=0, **extra):
    hf = make_hf_model(seed, **{**CONFIGS[name], **extra})
    save_hf(hf, tmp_path / name)
    ck = dg.load(tmp_path / name, dtype=dtype)
    if dtype != "float32":  # as a user would load it (rotary buffers stay fp32)
        from transformers import DiffusionGemmaForBlockDiffusion

        hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / name, dtype=getattr(torch, dtype)).eval()
    return hf, ck.model


def hf_logits(hf, hidden):
    return hf.lm_head(hidden).float().div(30.0).tanh().mul(30.0)


def assert_cache_equal(ours, theirs, row_slice=None, **tol):
    for i, layer in enumerate(theirs.layers):
        k, v = ours.layer(i)
        tk, tv = layer.keys, layer.values
        if row_slice is not None:
            tk, tv = tk[row_slice], tv[row_slice]
        else:
            tk, tv = tk[0], tv[0]
        n = k.shape[1]
        assert n == min(tk.shape[1], n) and n > 0
        torch.testing.assert_close(k, tk[:, -n:], **(tol or TOL))
        torch.testing.assert_close(v, tv[:, -n:], **(tol or TOL))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_decode_commit_decode(tmp_path, name):
    """Encoder prefill (hidden, logits, every layer's cache), decoder with and without
    self-conditioning, commit of the canvas, decoder pass of the next canvas."""
    hf, model = load_pair(tmp_path, name)
    cfg = hf.config.text_config
    L = hf.config.canvas_length
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    cache_t, cache = DynamicCache(config=cfg), model.new_cache()
    with torch.no_grad():
        enc = hf.model.encoder(input_ids=ids, past_key_values=cache_t)
        hidden = model.encode(ids[0], [cache])
        torch.testing.assert_close(hidden, enc.last_hidden_state[0], **TOL)
        torch.testing.assert_close(model.logits(hidden), hf_logits(hf, enc.last_hidden_state)[0], **TOL)
        assert_cache_equal(cache, cache_t)

        canvas = torch.randint(0, cfg.vocab_size, (1, L))
        want = hf(decoder_input_ids=canvas, past_key_values=cache_t).logits[0]
        got = model.logits(model.decode(canvas[0], [cache]))
        torch.testing.assert_close(got, want, **TOL)

        sc = 3 * torch.randn(1, L, cfg.vocab_size)
        want = hf(decoder_input_ids=canvas, past_key_values=cache_t, self_conditioning_logits=sc).logits[0]
        got = model.logits(model.decode(canvas[0], [cache], model.soft_embedding(sc[0])))
        torch.testing.assert_close(got, want, **TOL)

        # commit the canvas (encoder), then the next canvas's decoder pass
        hf.model.encoder(input_ids=canvas, past_key_values=cache_t)
        model.encode(canvas[0], [cache])
        assert cache.length == 9 + L
        assert_cache_equal(cache, cache_t)
        nxt = torch.randint(0, cfg.vocab_size, (1, L))
        want = hf(decoder_input_ids=nxt, past_key_values=cache_t, self_conditioning_logits=sc).logits[0]
        got = model.logits(model.decode(nxt[0], [cache], model.soft_embedding(sc[0])))
        torch.testing.assert_close(got, want, **TOL)


def test_prompt_longer_than_sliding_window(tmp_path):
    hf, model = load_pair(tmp_path, "tiny", sliding_window=6)
    cfg = hf.config.text_config
    ids = torch.randint(0, cfg.vocab_size, (1, 23))
    cache_t, cache = DynamicCache(config=cfg), model.new_cache()
    with torch.no_grad():
        enc = hf.model.encoder(input_ids=ids, past_key_values=cache_t)
        torch.testing.assert_close(model.encode(ids[0], [cache]), enc.last_hidden_state[0], **TOL)
        assert cache.layer(0)[0].shape[1] == 5 and cache.layer(1)[0].shape[1] == 23  # window - 1 / all
        assert_cache_equal(cache, cache_t)
        canvas = torch.randint(0, cfg.vocab_size, (1, 16))
        want = hf(decoder_input_ids=canvas, past_key_values=cache_t).logits[0]
        torch.testing.assert_close(model.logits(model.decode(canvas[0], [cache])), want, **TOL)
        # a commit that crosses the window again, then decode
        hf.model.encoder(input_ids=canvas, past_key_values=cache_t)
        model.encode(canvas[0], [cache])
        assert_cache_equal(cache, cache_t)
        want = hf(decoder_input_ids=canvas, past_key_values=cache_t).logits[0]
        torch.testing.assert_close(model.logits(model.decode(canvas[0], [cache])), want, **TOL)


def test_left_padded_batch_of_three(tmp_path):
    """Three prompts of different lengths, left-padded for the reference, packed for us with the
    reference's (padded) positions; hidden states, caches and decoder logits agree row by row."""
    hf, model = load_pair(tmp_path, "window-3-layers")
    cfg = hf.config.text_config
    L = hf.config.canvas_length
    lens = [11, 4, 8]
    S = max(lens)
    ids = torch.randint(3, cfg.vocab_size, (3, S))
    mask = torch.zeros(3, S, dtype=torch.bool)
    for b, n in enumerate(lens):
        mask[b, S - n:] = True
        ids[b, : S - n] = 0
    cache_t = DynamicCache(config=cfg)
    caches = [model.new_cache() for _ in lens]
    pos = torch.arange(S).expand(3, S)
    with torch.no_grad():
        enc = hf.model.encoder(input_ids=ids, attention_mask=mask.long(), past_key_values=cache_t)
        hidden = model.encode(ids[mask], caches, lengths=lens, positions=pos[mask])
        torch.testing.assert_close(hidden, enc.last_hidden_state[mask], **TOL)
        for b in range(len(lens)):
            for i, layer in enumerate(cache_t.layers):
                k, _ = caches[b].layer(i)
                valid = mask[b, -layer.keys.shape[2]:]
                torch.testing.assert_close(k, layer.keys[b][:, valid], **TOL)

        dmask = torch.nn.functional.pad(mask, (0, L), value=True)
        canvas = torch.randint(0, cfg.vocab_size, (3, L))
        sc = 2 * torch.randn(3, L, cfg.vocab_size)
        want = hf(decoder_input_ids=canvas, past_key_values=cache_t, decoder_attention_mask=dmask,
                  self_conditioning_logits=sc).logits
        soft = model.soft_embedding(sc.reshape(3 * L, -1))
        got = model.logits(model.decode(canvas.reshape(-1), caches, soft, lengths=[L] * 3))
        torch.testing.assert_close(got, want.reshape(3 * L, -1), **TOL)

        # commit, then the next canvas
        hf.model.encoder(input_ids=canvas, attention_mask=dmask.long(), past_key_values=cache_t)
        model.encode(canvas.reshape(-1), caches, lengths=[L] * 3)
        dmask = torch.nn.functional.pad(dmask, (0, L), value=True)
        want = hf(decoder_input_ids=canvas, past_key_values=cache_t, decoder_attention_mask=dmask).logits
        got = model.logits(model.decode(canvas.reshape(-1), caches, lengths=[L] * 3))
        torch.testing.assert_close(got, want.reshape(3 * L, -1), **TOL)


def test_bf16_within_bf16_tolerance(tmp_path):
    hf, model = load_pair(tmp_path, "full-first", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    cfg = hf.config.text_config
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    cache_t, cache = DynamicCache(config=cfg), model.new_cache()
    with torch.no_grad():
        hf.model.encoder(input_ids=ids, past_key_values=cache_t)
        model.encode(ids[0], [cache])
        canvas = torch.randint(0, cfg.vocab_size, (1, 16))
        sc = torch.randn(1, 16, cfg.vocab_size)
        want = hf(decoder_input_ids=canvas, past_key_values=cache_t,
                  self_conditioning_logits=sc.to(torch.bfloat16)).logits[0]
        got = model.logits(model.decode(canvas[0], [cache], model.soft_embedding(sc[0].to(torch.bfloat16))))
    # bf16 has 8 bits of mantissa: logits of magnitude <= 30 are exact to ~0.06 after a few roundings
    torch.testing.assert_close(got, want, atol=0.06, rtol=0)
    assert (got - want).abs().mean() < 0.01
