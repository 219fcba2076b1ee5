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


def vocab_pass(hidden: torch.Tensor, weight: torch.Tensor, cap: float, temps: torch.Tensor,
               uniforms: torch.Tensor, want_soft: bool, embed_scale: torch.Tensor,
               chunk: int = 8192, block: int = 256) -> VocabResult:
    """Chunked online pass over the vocabulary; same results as `vocab_pass_reference`."""
    m, d = hidden.shape
    v = weight.shape[0]
    chunk = max(block, (min(chunk, v) // block) * block)
    one_chunk = chunk >= v  # then p of the one chunk is the whole distribution: sampled from directly
    t = temps.float()[:, None]
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

    entropy = torch.log(run_sum) + run_max - run_pz / run_sum
    soft = None
    if soft_acc is not None:
        soft = (soft_acc / run_sum[:, None]).to(weight.dtype) * embed_scale
    if one_chunk:  # small vocabulary: p is at hand, no block search or recomputation needed
        return VocabResult(best_idx, entropy, inverse_cdf_sample(p, uniforms), soft)
    # exact categorical draw: locate the block containing u * total, then the token inside it
    blocks = torch.cat([s * torch.exp((r - run_max).double())[:, None] for s, r in zip(block_sums, block_refs)], 1)
    cdf = torch.cumsum(blocks, dim=1)
    target = uniforms.double() * cdf[:, -1]
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
    return VocabResult(best_idx, entropy, sample, soft)



def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, cap: float, temps: torch.Tensor,
                    targets: torch.Tensor, chunk: int = 8192,
                    allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal verifier's view of given tokens, without [rows x vocab] logits: per row, the argmax of the
    logits and log softmax(logits / T)[target] (fp32), walking the vocabulary in chunks with an online
    logsumexp. hidden [M, D], temps [M] (> 0; 1 where only the argmax matters), targets [M] token ids;
    allowed [M, V] bool: only these tokens count (a grammar's mask; -inf log-probability for the others)."""
    m, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    t = temps.float()[:, None]
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
    return best_idx, picked - (run_max + torch.log(run_sum))


def sample_row(hidden: torch.Tensor, weight: torch.Tensor, cap: float, temperature: float, uniform: torch.Tensor,
               allowed: torch.Tensor | None = None, exclude: int | None = None) -> int:
    """One token from softmax(logits / T) over the `allowed` tokens [V] bool (all when None) with `exclude`
    removed, renormalised (inverse CDF at the given uniform): a rejected draft token's correction in
    speculative sampling, or a constrained next token. One row: [vocab] fp32."""
    z = lm_head(hidden[None], weight, cap)[0] / temperature
    if allowed is not None:
        z = z.masked_fill(~allowed, -math.inf)
    if exclude is not None:
        z[exclude] = -math.inf
    return int(inverse_cdf_sample(torch.softmax(z, -1)[None], uniform.reshape(1))[0])
