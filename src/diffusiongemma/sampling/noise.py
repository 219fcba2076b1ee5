"""The uniform-state noise process, shared by sampling and training so they cannot drift apart.

Corruption at time t in (0, 1): each token is independently replaced, with probability t, by a
token drawn uniformly from the whole vocabulary (the replacement may equal the clean token). There
is no mask token. t = 1 is pure noise: the sampler's initial canvas and its re-noising draw from the
same uniform distribution.
"""

from __future__ import annotations

import torch


def uniform_tokens(shape, vocab_size: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    return torch.randint(0, vocab_size, tuple(shape), generator=generator, device=device)


def corrupt(clean: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator | None = None):
    """clean [B, L], t [B] -> (noisy [B, L], replaced mask [B, L])."""
    u = torch.rand(clean.shape, generator=generator, device=clean.device)
    replaced = u < t[:, None]
    noise = uniform_tokens(clean.shape, vocab_size, generator, clean.device)
    return torch.where(replaced, noise, clean), replaced


def sample_time(n: int, eps: float = 1e-3, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """t ~ U(eps, 1) per example."""
    return eps + (1 - eps) * torch.rand(n, generator=generator, device=device)
