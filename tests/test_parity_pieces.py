"""Each piece of the text stack against its transformers 5.23.0 counterpart, CPU fp32, at 1e-5."""

import pytest
import torch
from transformers.models.diffusion_gemma import modeling_diffusion_gemma as ref

from diffusiongemma.cache import KVCache
from diffusiongemma.config import TextConfig
from diffusiongemma.model.attention import Attention, DecoderPass, EncoderPass
from diffusiongemma.model.layers import Experts, GeGLU, RMSNorm, RotaryEmbedding, Router, apply_rope
from diffusiongemma.model.text import SelfConditioning
from hf_utils import make_hf_model

TOL = dict(atol=1e-5, rtol=0)


def ours_config(hf_text_config) -> TextConfig:
    return TextConfig.from_dict(hf_text_config.to_dict())


def copy_(ours, theirs):
    sd = theirs.state_dict()
    missing = ours.load_state_dict({k: v for k, v in sd.items() if k in ours.state_dict()}, strict=False)
    assert not missing.missing_keys, missing.missing_keys


@pytest.mark.parametrize("with_scale", [True, False])
def test_rmsnorm(with_scale):
    theirs = ref.DiffusionGemmaRMSNorm(24, eps=1e-6, with_scale=with_scale)
    ours = RMSNorm(24, 1e-6, with_scale=with_scale)
    if with_scale:
        w = torch.randn(24)
        theirs.weight.data.copy_(w)
        ours.weight.data.copy_(w)
    for dtype in (torch.float32, torch.bfloat16):
        x = (3 * torch.randn(5, 7, 24)).to(dtype)
        torch.testing.assert_close(ours.to(dtype)(x), theirs.to(dtype)(x), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["sliding_attention", "full_attention"])
def test_rope_both_kinds(kind):
    hf = make_hf_model(0, global_head_dim=32, head_dim=16)
    cfg = ours_config(hf.config.text_config)
    pos = torch.tensor([0, 1, 5, 17, 1000, 4097])
    theirs = hf.model.decoder.rotary_emb
    x = torch.randn(1, 6, 4)
    cos_t, sin_t = theirs(x, pos[None], kind)
    cos_o, sin_o = RotaryEmbedding(cfg)(pos, x.dtype)[kind]
    torch.testing.assert_close(cos_o, cos_t[0], atol=0, rtol=0)
    torch.testing.assert_close(sin_o, sin_t[0], atol=0, rtol=0)
    if kind == "full_attention":  # proportional: only the first quarter of the pairs rotate
        assert (cos_o[:, 4:16] == 1).all() and (cos_o[:, 20:] == 1).all() and (cos_o[1:, :4] != 1).all()
    q = torch.randn(6, 3, cos_o.shape[-1])
    torch.testing.assert_close(apply_rope(q, cos_o, sin_o),
                               ref.apply_rotary_pos_emb(q, cos_t[0], sin_t[0], unsqueeze_dim=1), **TOL)


def test_dense_mlp_and_self_conditioning():
    hf = make_hf_model(1)
    cfg = ours_config(hf.config.text_config)
    theirs = hf.model.decoder.layers[0].mlp
    ours = GeGLU(cfg.hidden_size, cfg.intermediate_size)
    copy_(ours, theirs)
    x = torch.randn(10, cfg.hidden_size)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)

    sc_t = hf.model.decoder.self_conditioning
    sc_o = SelfConditioning(cfg)
    copy_(sc_o, sc_t)
    e, s = torch.randn(10, cfg.hidden_size), torch.randn(10, cfg.hidden_size)
    torch.testing.assert_close(sc_o(e, s), sc_t(e, s), **TOL)
    # first step: no signal is exactly the zero signal
    torch.testing.assert_close(sc_o(e, None), sc_t(e, torch.zeros_like(e)), atol=0, rtol=0)


@pytest.mark.parametrize("experts,top_k", [(4, 1), (4, 2), (8, 3), (16, 16)])
def test_moe_router_and_experts(experts, top_k):
    hf = make_hf_model(2, num_experts=experts, top_k_experts=top_k, moe_intermediate_size=12)
    cfg = ours_config(hf.config.text_config)
    layer = hf.model.decoder.layers[1]
    router, experts_o = Router(cfg), Experts(cfg)
    copy_(router, layer.router)
    copy_(experts_o, layer.experts)
    x = 4 * torch.randn(40, cfg.hidden_size)
    _, w_t, i_t = layer.router(x)
    w_o, i_o = router(x)
    torch.testing.assert_close(i_o, i_t, atol=0, rtol=0)
    torch.testing.assert_close(w_o, w_t, **TOL)
    u = layer.pre_feedforward_layernorm_2(x)
    want = layer.experts(u, i_t, w_t)
    torch.testing.assert_close(experts_o(u, i_o, w_o), want, **TOL)
    torch.testing.assert_close(experts_o.forward_reference(u, i_o, w_o), want, **TOL)


def test_moe_grouped_path_matches_reference_in_bf16():
    hf = make_hf_model(3, num_experts=8, top_k_experts=2, hidden_size=64, moe_intermediate_size=16)
    cfg = ours_config(hf.config.text_config)
    experts = Experts(cfg)
    copy_(experts, hf.model.decoder.layers[0].experts)
    experts = experts.to(torch.bfloat16)
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    index = torch.randint(0, 8, (64, 2))
    w = torch.rand(64, 2)
    fast, slow = experts(x, index, w), experts.forward_reference(x, index, w)
    torch.testing.assert_close(fast.float(), slow.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_dense_path_equals_grouped_path_and_reference(dtype, monkeypatch):
    """A small bf16/fp16 step without gradients runs every expert on every row (`forward_dense`); it must
    give the grouped path's numbers and the reference's (fp32 always takes the grouped path)."""
    hf = make_hf_model(5, num_experts=8, top_k_experts=3, hidden_size=64, moe_intermediate_size=16)
    experts = Experts(ours_config(hf.config.text_config))
    copy_(experts, hf.model.decoder.layers[0].experts)
    experts = experts.to(dtype).requires_grad_(False)
    x = 4 * torch.randn(40, 64).to(dtype)
    index = torch.stack([torch.randperm(8)[:3] for _ in range(40)])
    w = torch.rand(40, 3)
    dense = experts(x, index, w)  # 40 rows x 8 experts <= DENSE_LIMIT: the dense path
    torch.testing.assert_close(dense, experts.forward_dense(x, index, w), atol=0, rtol=0)
    monkeypatch.setattr(Experts, "DENSE_LIMIT", 0)
    grouped = experts(x, index, w)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dense.float(), grouped.float(), **tol)
    torch.testing.assert_close(dense.float(), experts.forward_reference(x, index, w).float(), **tol)
    monkeypatch.setattr(Experts, "DENSE_LIMIT", 4096)
    monkeypatch.setattr(Experts, "forward_dense", lambda *a: pytest.fail("fp32 took the dense path"))
    experts.float()(x.float(), index, w)


def _attention_pair(hf, layer_idx):
    cfg = ours_config(hf.config.text_config)
    enc_t = hf.model.encoder.language_model.layers[layer_idx].self_attn
    dec_t = hf.model.decoder.layers[layer_idx].self_attn
    ours = Attention(cfg, layer_idx)
    copy_(ours, dec_t)
    return cfg, ours, enc_t, dec_t


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["sliding", "full"])
def test_attention_encoder_and_decoder_masks(layer_idx):
    """Encoder: causal (+ sliding window) over a prompt longer than the window, written to the cache;
    decoder: bidirectional over [cache ; canvas], cache untouched."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    hf = make_hf_model(4, sliding_window=6)
    cfg, ours, enc_t, dec_t = _attention_pair(hf, layer_idx)
    kind = cfg.layer_types[layer_idx]
    n, d = 11, cfg.hidden_size
    x = torch.randn(1, n, d)
    pos = torch.arange(n)
    rope_t = hf.model.decoder.rotary_emb(x, pos[None], kind)
    cache_t = DynamicCache(config=hf.config.text_config)
    make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    mask = make(config=hf.config.text_config, inputs_embeds=x, attention_mask=None, past_key_values=cache_t,
                position_ids=pos[None])
    want, _ = enc_t(x, rope_t, mask, past_key_values=cache_t)

    cache = KVCache(cfg)
    rope = RotaryEmbedding(cfg)(pos, x.dtype)[kind]
    mode = EncoderPass([cache], [n], pos, cfg.sliding_window)
    got = ours(x[0], rope, mode)
    mode.finish()
    torch.testing.assert_close(got, want[0], **TOL)
    k, v = cache.layer(layer_idx)
    torch.testing.assert_close(k, cache_t.layers[layer_idx].keys[0], **TOL)
    torch.testing.assert_close(v, cache_t.layers[layer_idx].values[0], **TOL)

    canvas = torch.randn(1, 5, d)
    cpos = torch.arange(n, n + 5)
    want, _ = dec_t(canvas, hf.model.decoder.rotary_emb(canvas, cpos[None], kind), None, past_key_values=cache_t)
    before = [t.clone() for t in cache.layer(layer_idx)]
    got = ours(canvas[0], RotaryEmbedding(cfg)(cpos, x.dtype)[kind], DecoderPass([cache], [5]))
    torch.testing.assert_close(got, want[0], **TOL)
    for a, b in zip(before, cache.layer(layer_idx)):
        assert torch.equal(a, b)  # read-only


def test_global_layers_take_values_from_keys():
    hf = make_hf_model(5)
    cfg = ours_config(hf.config.text_config)
    assert Attention(cfg, 1).v_proj is None and Attention(cfg, 0).v_proj is not None
    assert hf.model.decoder.layers[1].self_attn.v_proj is None
