"""Helpers that build random reference (transformers 5.23.0) checkpoints for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TEXT = dict(
    vocab_size=99, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=24,
    moe_intermediate_size=8, num_experts=4, top_k_experts=2, num_hidden_layers=2,
    layer_types=["sliding_attention", "full_attention"], head_dim=8, global_head_dim=16,
    num_global_key_value_heads=1, sliding_window=8, use_bidirectional_attention="vision",
    pad_token_id=0, bos_token_id=2, eos_token_id=1,
)
TINY_VISION = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                   intermediate_size=37, patch_size=5, pooling_kernel_size=2, head_dim=4)


def hf_config(canvas_length: int = 16, vision: bool = True, **text):
    from transformers import DiffusionGemmaConfig

    tc = {**TINY_TEXT, **text}
    kw = dict(text_config=tc, canvas_length=canvas_length, image_token_id=4, boi_token_id=5, eoi_token_id=6)
    if vision:
        kw["vision_config"] = TINY_VISION
    return DiffusionGemmaConfig(**kw)


def randomize_(model, seed: int = 0, scale: float = 1.0) -> None:
    """Give every tensor a random value, including norm weights and scalars the reference
    initialises to one, so that parity tests see each of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or "embed_scale" in name:
                continue
            if name.endswith("layer_scalar"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            elif p.ndim == 1 or "norm" in name or name.endswith(("scale", "per_expert_scale", "std_bias")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "position_embedding_table" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(scale * torch.randn(p.shape, generator=g) / fan_in**0.5)
        # the release stores the encoder's layer_scalar equal to the decoder's
        enc = model.model.encoder.language_model.layers
        dec = model.model.decoder.layers
        for e, d in zip(enc, dec):
            e.layer_scalar.copy_(d.layer_scalar)


def make_hf_model(seed: int = 0, canvas_length: int = 16, vision: bool = True, scale: float = 1.0,
                  logit_gain: float = 1.0, sc_gain: float = 1.0, **text):
    """A random reference model.

    For sampler-level tests, `logit_gain` scales the final norm (peaked distributions, so adaptive
    stopping and stop ids happen) and `sc_gain` damps the self-conditioning output: with random
    weights the step-to-step self-conditioning loop is expansive, so rounding-level differences
    (1e-7) grow without bound over 48 steps; damped, they stay at rounding level, as in a trained
    model whose denoising converges.
    """
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(hf_config(canvas_length, vision, **text)).eval()
    randomize_(model, seed, scale)
    with torch.no_grad():
        model.model.decoder.norm.weight.mul_(logit_gain)
        model.model.decoder.self_conditioning.down_proj.weight.mul_(sc_gain)
    return model


def save_hf(model, path: Path, generation: dict | None = None) -> Path:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    g = dict(max_new_tokens=256, max_denoising_steps=48, t_min=0.4, t_max=0.8, stability_threshold=1,
             confidence_threshold=0.005, eos_token_id=[1], pad_token_id=0, entropy_bound=0.1)
    g.update(generation or {})
    bound = g.pop("entropy_bound")
    model.generation_config = DiffusionGemmaGenerationConfig(
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=bound), **g)
    model.save_pretrained(str(path))
    return path
