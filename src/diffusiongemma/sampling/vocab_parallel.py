"""The vocabulary pass over a vocabulary split across tensor-parallel ranks.

Each rank holds rows [start, start + V/N) of the tied embedding (`VocabShard`) and walks only those
(`vocab.scan`). What the full-vocabulary pass computes is then assembled from per-rank statistics:

- one all-gather of a few float64 numbers per row and rank: the shard's max logit, sum of exp(z - max),
  sum of p * z, best logit and its (global) index, and its total mass. Every rank combines them in rank order
  (= vocabulary order), so every rank gets the same logsumexp, entropy, argmax (first maximum, as one
  process) and the same draw target u * total;
- the draw: the rank whose cumulative mass passes the target finds the token inside its shard (its blocks,
  as one process does); one all-reduce of [rows] int64 shares it (the other ranks add 0);
- the self-conditioning soft embedding: each rank's fp32 accumulator rescaled to the global max, one
  all-reduce of [rows, hidden] fp32, divided by the global sum (vLLM #46177's shape of the same idea).

The uniforms are the request's keyed draws, the same on every rank, so every rank takes the same decisions.
Against one process only the order of float sums changes (the decoder's all-reduces already move logits by
ulps): the argmax and the draw agree except at exact ties, tested in fp32.
"""

from __future__ import annotations

import math

import torch

from .head import lm_head
from .vocab import VocabResult, VocabShard, locate, scan, target_scan


def _combine(stats: torch.Tensor):
    """stats [N, k, m] float64 gathered in rank order -> the global max, and each rank's factor exp(max_r - max)."""
    g_max = stats[:, 0].max(0).values
    safe = torch.where(torch.isfinite(g_max), g_max, torch.zeros_like(g_max))
    factor = torch.exp(stats[:, 0] - safe)  # [N, m]; 0 for a rank whose rows were all masked
    return g_max, torch.nan_to_num(factor, nan=0.0)


def _first_best(stats: torch.Tensor, best_row: int, idx_row: int) -> torch.Tensor:
    """The global argmax: the first rank (in vocabulary order) holding the largest logit, its index."""
    owner = stats[:, best_row].argmax(0)  # first maximum
    return stats[:, idx_row].gather(0, owner[None])[0].long()


def sharded_vocab_pass(hidden: torch.Tensor, shard: VocabShard, cap: float, temps: torch.Tensor,
                       uniforms: torch.Tensor, want_soft: bool, embed_scale: torch.Tensor, chunk: int = 8192,
                       block: int = 256) -> VocabResult:
    tp = shard.tp
    t = temps.float()[:, None]
    s = scan(hidden, shard.weight, cap, t, want_soft, chunk, block, blocks=True)
    cdf = s.cdf()  # relative to this rank's max
    mine = torch.stack([s.run_max.double(), s.run_sum.double(), s.run_pz.double(), s.best.double(),
                        (s.best_idx + shard.start).double(), cdf[:, -1]])  # [6, m]
    stats = tp.all_gather(mine, "vocabulary")  # [N, 6, m]
    g_max, factor = _combine(stats)
    total = stats[:, 1] * factor  # each rank's sum of exp(z - global max) [N, m]
    run_sum = total.sum(0)
    run_pz = (stats[:, 2] * factor).sum(0)
    entropy = (torch.log(run_sum) + g_max - run_pz / run_sum).float()
    best_idx = _first_best(stats, 3, 4)

    # the draw: u * (total mass) in global units; the rank whose cumulative mass passes it owns the token
    mass = stats[:, 5] * factor  # [N, m]
    cum = torch.cumsum(mass, 0)
    target = uniforms.double() * cum[-1]
    owner = (cum <= target[None]).sum(0).clamp_max(tp.size - 1)  # first rank with cum > target
    before = torch.where(owner > 0, cum.gather(0, (owner - 1).clamp_min(0)[None])[0], 0.0)
    local_target = (target - before) / factor[tp.rank].clamp_min(1e-300)  # back to this rank's units
    local = locate(hidden, shard.weight, cap, t, s.run_max, cdf, local_target.clamp_min(0.0), block)
    sample = torch.where(owner == tp.rank, local + shard.start, torch.zeros_like(local))
    tp.all_reduce(sample, "vocabulary")

    soft = None
    if s.soft_acc is not None:
        acc = s.soft_acc * factor[tp.rank].float()[:, None]
        tp.all_reduce(acc, "vocabulary")
        soft = (acc / run_sum.float()[:, None]).to(shard.dtype) * embed_scale
    return VocabResult(best_idx, entropy, sample, soft)


def sharded_target_logprobs(hidden: torch.Tensor, shard: VocabShard, cap: float, temps: torch.Tensor,
                            targets: torch.Tensor, chunk: int = 8192,
                            allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    tp, n = shard.tp, shard.weight.shape[0]
    local_targets = targets - shard.start
    if allowed is not None:
        allowed = allowed[:, shard.start:shard.start + n]
    best, best_idx, picked, run_max, run_sum = target_scan(hidden, shard.weight, cap, temps.float()[:, None],
                                                           local_targets, chunk, allowed)
    inside = (local_targets >= 0) & (local_targets < n)
    mine = torch.stack([run_max.double(), run_sum.double(), best.double(), (best_idx + shard.start).double(),
                        torch.where(inside, picked.double(), -math.inf)])
    stats = tp.all_gather(mine, "vocabulary")  # [N, 5, m]
    g_max, factor = _combine(stats)
    logsumexp = g_max + torch.log((stats[:, 1] * factor).sum(0))
    picked = stats[:, 4].max(0).values  # only the owner's is finite
    return _first_best(stats, 2, 3), (picked - logsumexp).float()


def sharded_row_logits(hidden: torch.Tensor, shard: VocabShard, cap: float) -> torch.Tensor:
    """One row's full logits [V]: each rank's shard, all-gathered (one row: V floats)."""
    z = lm_head(hidden[None], shard.weight, cap)[0]
    return shard.tp.all_gather(z, "vocabulary").reshape(-1)
