"""The training loss of the tied, soft-capped LM head, computed tile by tile.

Per row i: z = cap * tanh(h_i . E^T / cap) (fp32), optionally plus shift_i at the row's `bump` token
(the leave-one-out variant), and loss_i = logsumexp(z) - z[target_i]. `head_cross_entropy` computes it
in tiles of rows x vocabulary entries (an online logsumexp across the vocabulary, as attention does
across keys) and recomputes each tile's logits in the backward pass from the saved logsumexp, so no
[rows x vocab] tensor outlives its tile and each tile's softcap, softmax and gradient stay in cache
(`python -m diffusiongemma.bench.head_memory`: at the real 262,144-token vocabulary, 512 rows, the
full-logits path peaks 1.75 GiB above the gradients, this one 16 MiB). `head_cross_entropy_reference`
is the plain autograd path (what `model.logits` + cross-entropy compute); tests check the two agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..sampling.head import lm_head


def _tile(h: torch.Tensor, weight: torch.Tensor, cap: float, c0: int, targets: torch.Tensor,
          bump: torch.Tensor | None, shift: torch.Tensor | None):
    """One tile: rows h against vocabulary rows weight = E[c0:c0 + C]. Returns tanh(h . E^T / cap) and the
    soft-capped (and bumped) logits [rows, C] in fp32, and the rows whose target falls in the tile with
    the target's column."""
    z, t = lm_head(h, weight, cap, tanh=True)
    if bump is not None:
        hit = ((bump >= c0) & (bump < c0 + weight.shape[0])).nonzero().squeeze(1)
        z[hit, bump[hit] - c0] += shift[hit]
    rows = ((targets >= c0) & (targets < c0 + weight.shape[0])).nonzero().squeeze(1)
    return t, z, rows, targets[rows] - c0


def _tiles(n: int, v: int, rows: int, cols: int):
    """Row slices, each with its (first vocabulary id, vocabulary slice) tiles."""
    for r0 in range(0, n, rows):
        yield slice(r0, r0 + rows), [(c0, slice(c0, c0 + cols)) for c0 in range(0, v, cols)]


def _sel(x: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if x is None else x[sl]


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, cap, rows, cols, bump, shift):
        n, v = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        picked = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for rs, chunks in _tiles(n, v, rows, cols):
            h, tg = hidden[rs], targets[rs]
            run_max = torch.full((h.shape[0],), -math.inf, dtype=torch.float32, device=h.device)
            run_sum = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
            for c0, cs in chunks:  # online logsumexp over the vocabulary
                _, z, hit, col = _tile(h, weight[cs], cap, c0, tg, _sel(bump, rs), _sel(shift, rs))
                picked[rs][hit] = z[hit, col]
                new_max = torch.maximum(run_max, z.max(-1).values)
                run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(-1)
                run_max = new_max
            lse[rs] = run_max + torch.log(run_sum)
        ctx.save_for_backward(hidden, weight, targets, lse, bump, shift)
        ctx.cap, ctx.rows, ctx.cols = cap, rows, cols
        return lse - picked

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse, bump, shift = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for rs, chunks in _tiles(hidden.shape[0], weight.shape[0], ctx.rows, ctx.cols):
            h, g = hidden[rs], grad[rs].float()
            for c0, cs in chunks:  # each tile's gradient needs only the saved logsumexp
                w = weight[cs]
                t, z, hit, col = _tile(h, w, ctx.cap, c0, targets[rs], _sel(bump, rs), _sel(shift, rs))
                p = z.sub_(lse[rs, None]).exp_()  # softmax, in place of the logits
                p[hit, col] -= 1
                dz = p.mul_(g[:, None]).mul_(t.mul_(t).neg_().add_(1))  # d(cap tanh(x/cap))/dx = 1 - tanh^2
                if want_h:
                    dh[rs] += (dz.to(w.dtype) @ w).float()
                if want_w:
                    dw[cs] += dz.t() @ h.float()
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None, None, None, None, None, None)


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                       bump: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                       block_elems: int = 1 << 20, max_cols: int = 8192) -> torch.Tensor:
    """Per-row cross-entropy [N] of the soft-capped tied head, in tiles of `block_elems` logits at most
    `max_cols` vocabulary entries wide (one tile spans the whole vocabulary when it is that small)."""
    if torch.is_autocast_enabled(hidden.device.type):  # the tiles would run outside the autocast policy
        return head_cross_entropy_reference(hidden, weight, targets, cap, bump, shift)
    cols = min(weight.shape[0], max_cols)
    rows = max(1, block_elems // cols)
    return _HeadCrossEntropy.apply(hidden, weight, targets, cap, rows, cols, bump, shift)


def head_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                                 bump: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    z = lm_head(hidden, weight, cap)
    if bump is not None:
        z = z + F.one_hot(bump, z.shape[-1]).to(z.dtype) * shift[:, None]
    return F.cross_entropy(z, targets, reduction="none")
