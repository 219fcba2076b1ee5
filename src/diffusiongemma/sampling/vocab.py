"""The vocabulary-sized work of a denoising step, without holding [canvas x vocab] fp32 logits.

Per canvas position, from the decoder's final hidden state h and the tied embedding E:
  logits = softcap(h . E^T)  (in the weight dtype, then fp32, as the reference), z = logits / T,
  argmax(z), entropy of softmax(z), one categorical sample (inverse CDF at a given uniform), and the
  self-conditioning soft embedding softmax(z) . E * embed_scale for the next step.

`vocab_pass` walks E in chunks with an online softmax (like attention with Q = h, K = V = E): a running
max, sum, sum of p*z and soft-embedding accumulator, rescaled when the max grows. The sample is drawn
exactly: per-block sums locate the block holding u * total, and only that block's logits are
recomputed. Peak extra memory is a few [rows x chunk] tensors (a few MB), never [rows x vocab].

`vocab_pass_reference` materialises the full logits as the reference does; tests check they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .head import lm_head, softcap
from .sampler import entropy_from_logits, inverse_cdf_sample


@dataclass
class VocabResult:
    argmax: torch.Tensor  # [M] long
    entropy: torch.Tensor  # [M] fp32, of the temperature-scaled distribution
    sample: torch.Tensor  # [M] long
    soft: torch.Tensor | None  # [M, D] in the weight dtype, already times embed_scale


@dataclass
class VocabShard:
    """This rank's rows of the tied embedding under tensor parallelism: weight [V/N, D] holds rows
    [start, start + V/N) of the vocabulary; `tp` is the rank's `parallel.TensorParallel`. The vocabulary functions
    below take one in place of the weight and run vocabulary-parallel (`sampling.vocab_parallel`)."""

    weight: torch.Tensor
    start: int
    tp: object

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def vocab_pass_reference(hidden: torch.Tensor, weight: torch.Tensor, cap: float, temps: torch.Tensor,
                         uniforms: torch.Tensor, want_soft: bool, embed_scale: torch.Tensor) -> VocabResult:
    """Full-logits path: what the reference computes, step by step."""
    z = lm_head(hidden, weight, cap) / temps[:, None]
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)
    soft = None
    if want_soft:  # the reference casts the processed logits to the embedding dtype first
        p = torch.softmax(z.to(weight.dtype), dim=-1, dtype=torch.float32).to(weight.dtype)
        soft = (p @ weight) * embed_scale
    return VocabResult(z.argmax(-1), entropy_from_logits(z), inverse_cdf_sample(probs, uniforms), soft)


def vocab_pass(hidden: torch.Tensor, weight, cap: float, temps: torch.Tensor,
               uniforms: torch.Tensor, want_soft: bool, embed_scale: torch.Tensor,
               chunk: int = 8192, block: int = 256) -> VocabResult:
    """Chunked online pass over the vocabulary; same results as `vocab_pass_reference`. `weight`: the embedding
    [V, D], or a `VocabShard` (this rank's rows: the vocabulary-parallel pass, `sampling.vocab_parallel`)."""
    if isinstance(weight, VocabShard):
        from .vocab_parallel import sharded_vocab_pass

        return sharded_vocab_pass(hidden, weight, cap, temps, uniforms, want_soft, embed_scale, chunk, block)
    t = temps.float()[:, None]
    s = scan(hidden, weight, cap, t, want_soft, chunk, block)
    entropy = torch.log(s.run_sum) + s.run_max - s.run_pz / s.run_sum
    soft = None
    if s.soft_acc is not None:
        soft = (s.soft_acc / s.run_sum[:, None]).to(weight.dtype) * embed_scale
    if s.last_p is not None:  # small vocabulary: p is at hand, no block search or recomputation needed
        return VocabResult(s.best_idx, entropy, inverse_cdf_sample(s.last_p, uniforms), soft)
    # exact categorical draw: locate the block containing u * total, then the token inside it
    cdf = s.cdf()
    sample = locate(hidden, weight, cap, t, s.run_max, cdf, uniforms.double() * cdf[:, -1], block)
    return VocabResult(s.best_idx, entropy, sample, soft)


@dataclass
class Scan:
    """One walk over (a shard of) the vocabulary: per row the running max, sum of exp(z - max), sum of
    p * z, the best logit and its index, the unnormalised soft-embedding accumulator (fp32), and per block
    the float64 sums of exp(z - ref) with the chunk's ref (for the exact draw)."""

    run_max: torch.Tensor
    run_sum: torch.Tensor
    run_pz: torch.Tensor
    best: torch.Tensor
    best_idx: torch.Tensor
    soft_acc: torch.Tensor | None
    block_sums: list
    block_refs: list
    last_p: torch.Tensor | None  # exp(z - max) of the one chunk, when the vocabulary was one chunk

    def cdf(self) -> torch.Tensor:
        """[m, blocks] cumulative float64 block sums, relative to run_max."""
        blocks = torch.cat([s * torch.exp((r - self.run_max).double())[:, None]
                            for s, r in zip(self.block_sums, self.block_refs)], 1)
        return torch.cumsum(blocks, dim=1)


def scan(hidden: torch.Tensor, weight: torch.Tensor, cap: float, t: torch.Tensor, want_soft: bool,
         chunk: int = 8192, block: int = 256, blocks: bool = False) -> Scan:
    """Walk weight [V', D] in chunks (online softmax). blocks=True: keep the block sums even when V' is one
    chunk (the vocabulary-parallel pass draws through them on every rank)."""
    m, d = hidden.shape
    v = weight.shape[0]
    chunk = max(block, (min(chunk, v) // block) * block)
    one_chunk = chunk >= v and not blocks  # then p of the one chunk is the whole distribution
    dev = hidden.device

    run_max = torch.full((m,), -math.inf, dtype=torch.float32, device=dev)
    run_sum = torch.zeros(m, dtype=torch.float32, device=dev)
    run_pz = torch.zeros(m, dtype=torch.float32, device=dev)
    best = torch.full((m,), -math.inf, dtype=torch.float32, device=dev)
    best_idx = torch.zeros(m, dtype=torch.long, device=dev)
    soft_acc = torch.zeros(m, d, dtype=torch.float32, device=dev) if want_soft else None
    block_sums, block_refs = [], []  # per chunk: [m, blocks] sums of exp(z - ref), and ref [m]

    for start in range(0, v, chunk):
        w = weight[start:start + chunk]
        z = lm_head(hidden, w, cap) / t  # [m, c] fp32
        cmax, cidx = z.max(dim=-1)
        better = cmax > best
        best = torch.where(better, cmax, best)
        best_idx = torch.where(better, cidx + start, best_idx)
        new_max = torch.maximum(run_max, cmax)
        rescale = torch.exp(run_max - new_max)
        p = torch.exp(z - new_max[:, None])
        run_sum = run_sum * rescale + p.sum(-1)
        run_pz = run_pz * rescale + (p * z).sum(-1)
        if soft_acc is not None:
            soft_acc.mul_(rescale[:, None]).add_((p.to(weight.dtype) @ w).float())
        run_max = new_max
        if one_chunk:
            continue
        c = p.shape[1]
        if c % block:
            p = F.pad(p, (0, block - c % block))
        block_sums.append(p.view(m, -1, block).sum(-1, dtype=torch.float64))
        block_refs.append(new_max)
    return Scan(run_max, run_sum, run_pz, best, best_idx, soft_acc, block_sums, block_refs,
                p if one_chunk else None)


def locate(hidden: torch.Tensor, weight: torch.Tensor, cap: float, t: torch.Tensor, run_max: torch.Tensor,
           cdf: torch.Tensor, target: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The token (index into weight's rows) at which each row's cumulative mass passes `target` (float64, in the
    units of `cdf`, which is relative to run_max): the block from `cdf`, then that block's logits recomputed."""
    m, v, dev = hidden.shape[0], weight.shape[0], hidden.device
    bidx = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)
    before = torch.where(bidx > 0, cdf.gather(1, (bidx - 1).clamp_min(0)[:, None]).squeeze(1), 0.0)
    sample = torch.empty(m, dtype=torch.long, device=dev)
    for r0 in range(0, m, 16):  # recompute each row's block, 16 rows at a time (a few MB)
        rs = slice(r0, r0 + 16)
        ids = (bidx[rs] * block)[:, None] + torch.arange(block, device=dev)
        rows = weight[ids.clamp_max(v - 1)]  # [16, block, d]
        zb = softcap(torch.bmm(rows, hidden[rs, :, None]).squeeze(-1), cap) / t[rs]
        pb = torch.exp(zb - run_max[rs, None]).double().masked_fill(ids >= v, 0.0)
        inside = torch.searchsorted(before[rs, None] + torch.cumsum(pb, 1), target[rs, None], right=True).squeeze(1)
        sample[rs] = (bidx[rs] * block + inside.clamp_max(block - 1)).clamp_max(v - 1)
    return sample


def target_logprobs(hidden: torch.Tensor, weight, cap: float, temps: torch.Tensor,
                    targets: torch.Tensor, chunk: int = 8192,
                    allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal verifier's view of given tokens, without [rows x vocab] logits: per row, the argmax of the
    logits and log softmax(logits / T)[target] (fp32), walking the vocabulary in chunks with an online
    logsumexp. hidden [M, D], temps [M] (> 0; 1 where only the argmax matters), targets [M] token ids;
    allowed [M, V] bool: only these tokens count (a grammar's mask; -inf log-probability for the others).
    `weight`: [V, D], or a `VocabShard` (vocabulary-parallel)."""
    if isinstance(weight, VocabShard):
        from .vocab_parallel import sharded_target_logprobs

        return sharded_target_logprobs(hidden, weight, cap, temps, targets, chunk, allowed)
    best, best_idx, picked, run_max, run_sum = target_scan(hidden, weight, cap, temps.float()[:, None], targets,
                                                           chunk, allowed)
    return best_idx, picked - (run_max + torch.log(run_sum))


def target_scan(hidden: torch.Tensor, weight: torch.Tensor, cap: float, t: torch.Tensor, targets: torch.Tensor,
                chunk: int, allowed: torch.Tensor | None):
    """(best logit, its index, the target's logit (0 where the target is not a row of weight), running max, sum of
    exp(z - max)) per row, over weight's rows; targets index weight's rows."""
    m, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    run_max = torch.full((m,), -math.inf, dtype=torch.float32, device=dev)
    run_sum = torch.zeros(m, dtype=torch.float32, device=dev)
    best = torch.full((m,), -math.inf, dtype=torch.float32, device=dev)
    best_idx = torch.zeros(m, dtype=torch.long, device=dev)
    picked = torch.zeros(m, dtype=torch.float32, device=dev)
    for start in range(0, v, chunk):
        z = lm_head(hidden, weight[start:start + chunk], cap) / t  # [m, c] fp32
        if allowed is not None:
            z = z.masked_fill(~allowed[:, start:start + z.shape[1]], -math.inf)
        cmax, cidx = z.max(dim=-1)
        better = cmax > best
        best = torch.where(better, cmax, best)
        best_idx = torch.where(better, cidx + start, best_idx)
        inside = (targets >= start) & (targets < start + z.shape[1])
        picked = torch.where(inside, z.gather(1, (targets - start).clamp(0, z.shape[1] - 1)[:, None])[:, 0], picked)
        new_max = torch.maximum(run_max, cmax)
        safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))  # a chunk wholly masked
        run_sum = run_sum * torch.exp(run_max - safe) + torch.exp(z - safe[:, None]).sum(-1)
        run_max = new_max
    return best, best_idx, picked, run_max, run_sum


def row_logits(hidden: torch.Tensor, weight, cap: float) -> torch.Tensor:
    """One row's full logits [V] fp32 (a `VocabShard`'s gathered from every rank)."""
    if isinstance(weight, VocabShard):
        from .vocab_parallel import sharded_row_logits

        return sharded_row_logits(hidden, weight, cap)
    return lm_head(hidden[None], weight, cap)[0]


def sample_row(hidden: torch.Tensor, weight, cap: float, temperature: float, uniform: torch.Tensor,
               allowed: torch.Tensor | None = None, exclude: int | None = None) -> int:
    """One token from softmax(logits / T) over the `allowed` tokens [V] bool (all when None) with `exclude`
    removed, renormalised (inverse CDF at the given uniform): a rejected draft token's correction in
    speculative sampling, or a constrained next token. One row: [vocab] fp32."""
    z = row_logits(hidden, weight, cap) / temperature
    if allowed is not None:
        z = z.masked_fill(~allowed, -math.inf)
    if exclude is not None:
        z[exclude] = -math.inf
    return int(inverse_cdf_sample(torch.softmax(z, -1)[None], uniform.reshape(1))[0])
