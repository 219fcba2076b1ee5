"""Make the reference's `generate` draw the same random numbers as this engine.

The engine keys every random draw by (seed, canvas, step, purpose) (`sampling.draws`); the reference
draws from torch's global generator. With different draws the two sides take different paths (on an
unsure model the adaptive stopping test fires after 2 or after 48 steps), so tokens per forward, and
with them tokens/s, differ for reasons that have nothing to do with speed. `SameDraws` replaces the
reference's three random calls (initial canvas, re-noising tokens, `torch.multinomial`) by the engine's
keyed draws, one source per batch row: then both sides make the same decisions (fp32: the same tokens,
tested; bf16: the same up to rounding). Used by the tests and by `diffusiongemma bench --same-draws`.

`keep_cost=True` (the bench) still makes the reference's own random calls and throws their results away,
so its timing keeps its own sampling cost (`torch.multinomial` over the vocabulary is ~2 ms of a 15 ms
step of the shipped model on this CPU; the engine's inverse-CDF draw is cheaper): the draws change the
path, not the price of a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..sampling.draws import INIT, RENOISE, Draws
from ..sampling.sampler import inverse_cdf_sample


class SameDraws:
    def __init__(self, seeds: Sequence[int], canvas_length: int, vocab_size: int, steps: int,
                 keep_cost: bool = False):
        """steps: the generate call's max_denoising_steps (the reference counts its steps down from it)."""
        self.L, self.V, self.N, self.keep_cost = canvas_length, vocab_size, steps, keep_cost
        self.reset(seeds)

    def reset(self, seeds: Sequence[int]) -> None:
        """Start over (a new generate call) with one seed per batch row."""
        self.draws = [Draws(s) for s in seeds]
        self.canvas, self.step, self.mode = -1, 0, "init"

    def install(self, setattr_: Callable = setattr) -> None:
        """Patch transformers' DiffusionGemma generation (`setattr_`: e.g. pytest's `monkeypatch.setattr`)."""
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen

        inj = self
        orig_prepare = gen.DiffusionGemmaGenerationMixin._prepare_denoiser_inputs
        orig_step = gen.DiffusionGemmaGenerationMixin._denoising_step
        orig_init, orig_multinomial = gen.EntropyBoundSampler.initialize_canvas, gen.torch.multinomial

        def prepare(self_, *a, **k):
            inj.canvas, inj.step, inj.mode = inj.canvas + 1, 0, "init"
            return orig_prepare(self_, *a, **k)

        def step(self_, *a, cur_step, **k):
            inj.step, inj.mode = inj.N - cur_step, "renoise"
            return orig_step(self_, *a, cur_step=cur_step, **k)

        def initialize_canvas(self_, batch_size, device):
            if inj.keep_cost:
                orig_init(self_, batch_size, device)
            purpose, step = (INIT, 0) if inj.mode == "init" else (RENOISE, inj.step)
            return torch.stack([d.tokens(inj.canvas, step, purpose, inj.L, inj.V) for d in inj.draws]).to(device)

        def multinomial(probs, num_samples):
            assert num_samples == 1
            if inj.keep_cost:
                orig_multinomial(probs, num_samples)
            u = torch.cat([d.uniforms(inj.canvas, inj.step, inj.L) for d in inj.draws])
            return inverse_cdf_sample(probs, u.to(probs.device))[:, None]

        setattr_(gen.DiffusionGemmaGenerationMixin, "_prepare_denoiser_inputs", prepare)
        setattr_(gen.DiffusionGemmaGenerationMixin, "_denoising_step", step)
        setattr_(gen.EntropyBoundSampler, "initialize_canvas", initialize_canvas)
        setattr_(gen.torch, "multinomial", multinomial)
