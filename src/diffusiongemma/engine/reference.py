"""The slow reference generator: the most obvious use of the model, one request at a time.

No incremental cache (every canvas re-encodes the prompt and everything generated so far), the
full-vocabulary logits, the sampler written out inline. It uses the same keyed draws as the engine,
so for the same seed the engine must produce exactly these tokens (fp32, CPU); a test checks it.
"""

from __future__ import annotations

import torch

from ..model import DiffusionGemmaText
from ..sampling.draws import INIT, RENOISE, Draws
from ..sampling.sampler import (
    entropy_bound_accept,
    entropy_from_logits,
    finalize_canvas,
    inverse_cdf_sample,
    renoise,
    stable_and_confident,
    temperature,
)
from .params import ResolvedParams


@torch.no_grad()
def reference_generate(model: DiffusionGemmaText, prompt: list[int], p: ResolvedParams, canvas_length: int,
                       pad_id: int = 0) -> tuple[list[int], str]:
    L, V = canvas_length, model.config.vocab_size
    draws = Draws(p.seed)
    generated: list[int] = []
    stop_ids = torch.tensor(p.stop_token_ids or [-1])
    for c in range(10**9):
        cache = model.new_cache()
        model.encode(torch.tensor(prompt + generated), [cache])
        if c == 0 and p.initial_canvas is not None:
            x = torch.tensor(p.initial_canvas)
        else:
            x = draws.tokens(c, 0, INIT, L, V)
        sc_logits, history = None, []
        for s in range(p.max_denoising_steps):
            soft = model.soft_embedding(sc_logits) if sc_logits is not None else None
            logits = model.logits(model.decode(x, [cache], soft))
            z = logits / temperature(s, p.max_denoising_steps, p.t_min, p.t_max, p.schedule_steps)
            argmax = z.argmax(-1)
            entropy = entropy_from_logits(z)
            sample = inverse_cdf_sample(torch.softmax(z, -1), draws.uniforms(c, s, L))
            accepted = entropy_bound_accept(entropy, p.entropy_bound)
            x = renoise(sample, accepted, draws.tokens(c, s, RENOISE, L, V))
            done = stable_and_confident(argmax, history, p.stability_threshold, float(entropy.mean()),
                                        p.confidence_threshold)
            history.append(argmax)
            sc_logits = z.to(model.dtype)
            if done:
                break
        canvas, stop_at = finalize_canvas(argmax, stop_ids, pad_id)
        new = canvas[: stop_at + 1].tolist() if stop_at is not None else canvas.tolist()
        room = p.max_tokens - len(generated)
        if len(new) >= room and (stop_at is None or stop_at >= room):
            return generated + new[:room], "length"
        generated += new
        if stop_at is not None:
            return generated, "stop"
    raise AssertionError("unreachable")
