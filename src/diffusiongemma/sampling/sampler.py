"""The released sampler as pure tensor functions (reference-architecture.md section 5).

- `temperature`: linear schedule indexed by *remaining* steps, T = t_min + (t_max - t_min) * n / N,
  n = N..1, so it never reaches t_min. With `schedule_steps` set, the schedule has its own length and
  raising the step cap does not stretch it (steps past the schedule stay at its last value).
- `entropy_bound_accept`: sort entropies ascending, accept the k lowest while their sum minus their
  max is within the bound (always at least one).
- `renoise`: accepted positions take the new sample, every other position a uniform random token.
- `stable_and_confident`: argmax equal to each of the previous S argmax canvases and mean entropy
  strictly below the threshold.
- `finalize_canvas`: everything after the first stop id becomes pad.

The engine owns the loop and the state; these functions only compute.
"""

from __future__ import annotations

import torch


def temperature(step: int, max_steps: int, t_min: float, t_max: float, schedule_steps: int | None = None) -> float:
    """Temperature of denoising step `step` (0-based) of a canvas."""
    n_total = schedule_steps or max_steps
    remaining = max(n_total - step, 1)
    return t_min + (t_max - t_min) * (remaining / n_total)


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """entropy [..., L] -> bool mask [..., L] of accepted positions."""
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def renoise(sample: torch.Tensor, accepted: torch.Tensor, random_tokens: torch.Tensor) -> torch.Tensor:
    return torch.where(accepted, sample, random_tokens)


def stable_and_confident(argmax: torch.Tensor, history: list[torch.Tensor], window: int,
                         mean_entropy: float, threshold: float) -> bool:
    """One canvas: `history` holds the previous argmax canvases, newest last."""
    if window > 0:
        if len(history) < window:
            return False
        if not all(torch.equal(argmax, h) for h in history[-window:]):
            return False
    return mean_entropy < threshold


def finalize_canvas(tokens: torch.Tensor, stop_ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int | None]:
    """Pad everything after the first stop id. Returns (canvas, index of the stop id or None)."""
    hits = torch.isin(tokens, stop_ids).nonzero()
    if hits.numel() == 0:
        return tokens, None
    first = int(hits[0, 0])
    out = tokens.clone()
    out[first + 1:] = pad_id
    return out, first


def entropy_from_logits(z: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, fp32) of softmax(z) over the last dimension."""
    logp = torch.log_softmax(z.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Categorical draw from probs [M, V] with one uniform per row: the first index whose cumulative
    probability exceeds u * total (float64 sums)."""
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)
