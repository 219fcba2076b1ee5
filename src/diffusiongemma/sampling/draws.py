"""Random draws keyed by (request seed, canvas, step, purpose).

Every random number a request uses comes from a `torch.Generator` seeded from that key, so a
request's draws do not depend on what else shares its batch, on how many steps other requests took,
or on the order of calls. That is what makes a request's tokens the same alone or batched, and lets a
test inject the same draws into the reference implementation.

Purposes: the initial canvas, the per-position sample uniforms, the re-noising tokens; and for the
causal verifier (speculative and autoregressive decoding) the acceptance uniforms, the uniform of a
rejected position's corrected sample, and the uniform of a next-token sample.
"""

from __future__ import annotations

import torch

from .noise import uniform_tokens

INIT, SAMPLE, RENOISE, ACCEPT, CORRECT, NEXT = 1, 2, 3, 4, 5, 6
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a well-distributed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def key_seed(seed: int, canvas: int, step: int, purpose: int) -> int:
    h = _mix(seed & _MASK)
    for part in (canvas, step, purpose):
        h = _mix(h ^ (part & _MASK))
    return h & ((1 << 63) - 1)


class Draws:
    """The draws of one request. `step` counts executed denoising steps of the canvas from 0."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.seed = int(seed)
        self.device = torch.device(device)

    def generator(self, canvas: int, step: int, purpose: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(key_seed(self.seed, canvas, step, purpose))
        return g

    def tokens(self, canvas: int, step: int, purpose: int, n: int, vocab_size: int) -> torch.Tensor:
        """n tokens uniform over [0, vocab_size) (the initial canvas, or re-noising)."""
        return uniform_tokens((n,), vocab_size, self.generator(canvas, step, purpose), self.device)

    def uniforms(self, canvas: int, step: int, n: int, purpose: int = SAMPLE) -> torch.Tensor:
        """n float64 uniforms in [0, 1): one per canvas position, for inverse-CDF sampling (or `purpose`)."""
        g = self.generator(canvas, step, purpose)
        return torch.rand(n, generator=g, dtype=torch.float64, device=self.device)
