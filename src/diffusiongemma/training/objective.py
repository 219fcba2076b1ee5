"""The training objective the community converged on (reference-architecture.md section 4).

Per example: the response is chunked into canvases, the last filled with the end token (scored);
one canvas is chosen, t ~ U(eps, 1), each of its tokens replaced with probability t by a uniform
random token (`sampling.noise`, the sampler's own noise); with probability `suffix_prob` only a random
suffix of the canvas is corrupted (its prefix kept clean: the decoder then sees "what follows, given what
came before", the problem a confidence-ordered sampler poses once the easy tokens are fixed). The
encoder reads the prompt and the response causally; the decoder sees the prompt and the clean earlier
canvases only, plus the noisy canvas. Losses:

- diffusion: cross-entropy of the clean tokens of the chosen canvas; variants `base` (default),
  `reweighted` (times 1/(1 - t), optionally clipped) and `loo` (leave-one-out: add
  log(1 + K (1-t)/t) to the logit of each position's observed noisy token, K = vocabulary size);
- autoregressive: next-token cross-entropy of the encoder pass over prompt + response, with its own
  weight, averaged per example over positions whose token and next token are both real;
- two-pass self-conditioning with probability p per example: a first decoder pass without
  gradient, whose probabilities condition the second (examples without it get an exact zero signal).

Both cross-entropies go through the tied, soft-capped LM head a tile at a time (`training.head`), so
no [rows x vocab] logits are kept for the backward pass (`head="reference"` materialises them, as
`model.logits` does; tests check the two agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model import DiffusionGemmaText
from ..model.attention import BatchDecoderPass, BatchEncoderPass
from ..sampling.noise import corrupt, sample_time
from ..vision.placement import embed_prompt
from .head import head_cross_entropy, head_cross_entropy_reference

VARIANTS = ("base", "reweighted", "loo")
HEADS = ("tiled", "reference")


@dataclass(frozen=True)
class ObjectiveConfig:
    canvas_length: int
    loss: str = "base"
    ar_weight: float = 1.0
    self_cond_prob: float = 0.5
    t_eps: float = 1e-3
    reweight_clip: float | None = 10.0
    ar_scope: str = "all"  # "all": prompt and response (the reference); "response": response tokens only
    canvases_per_example: int = 1  # independent (canvas, t) draws per example, sharing one encoder pass
    suffix_prob: float = 0.0  # probability that a canvas keeps a random prefix clean (positions < cut, cut ~ U{0..L-1})
    head: str = "tiled"  # the LM head's loss: "tiled" (`training.head`) or "reference" (full logits)

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.loss not in VARIANTS:
            raise ValueError(f"loss must be one of {VARIANTS}, got {self.loss!r}")
        if not 0.0 <= self.suffix_prob <= 1.0:
            raise ValueError(f"suffix_prob must be in [0, 1], got {self.suffix_prob!r}")
        if self.ar_scope not in ("all", "response"):
            raise ValueError(f"ar_scope must be 'all' or 'response', got {self.ar_scope!r}")


@dataclass
class TrainBatch:
    tokens: torch.Tensor  # [B, S] prompt + response canvases, right-padded
    valid: torch.Tensor  # [B, S] bool
    context: torch.Tensor  # [R] tokens each chosen canvas may read (prompt + earlier canvases)
    canvas: torch.Tensor  # [R, L] clean tokens of the chosen canvases
    prompt_len: torch.Tensor  # [B]
    rows: torch.Tensor  # [R] the example (encoder row) of each chosen canvas
    t: torch.Tensor  # [R] noise time of each chosen canvas
    noisy: torch.Tensor  # [R, L] the chosen canvases corrupted at time t
    self_cond: torch.Tensor  # [R] bool: this canvas gets the two-pass self-conditioning
    images: list = field(default_factory=list)  # preprocessed images, in row-major order of their soft tokens

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum()) + self.canvas.numel()


def num_canvases(response_len: int, canvas_length: int) -> int:
    return max(1, math.ceil(response_len / canvas_length))


def chunk_response(response: list[int], canvas_length: int, end_id: int) -> list[list[int]]:
    """Canvases of the response; the last one filled with `end_id` up to the canvas length."""
    n = num_canvases(len(response), canvas_length)
    padded = response + [end_id] * (n * canvas_length - len(response))
    return [padded[i * canvas_length:(i + 1) * canvas_length] for i in range(n)]


def padded_length(item: tuple, canvas_length: int) -> int:
    """Encoder length of an item: its prompt plus its response chunked into whole canvases."""
    return len(item[0]) + canvas_length * num_canvases(len(item[1]), canvas_length)


def make_batch(pairs: list[tuple], cfg: ObjectiveConfig, vocab_size: int, end_id: int, pad_id: int,
               generators: torch.Generator | list[torch.Generator]) -> TrainBatch:
    """(prompt ids, response ids[, images]) items -> one batch with every random draw of the objective made:
    per example `cfg.canvases_per_example` canvases chosen uniformly, each with its time t ~ U(eps, 1), its
    corruption and its self-conditioning coin. With one generator per example the draws of an example do not
    depend on the rest of the batch, so splitting a batch into micro-batches leaves the loss unchanged."""
    L = cfg.canvas_length
    gens = generators if isinstance(generators, list) else [generators] * len(pairs)
    if len(gens) != len(pairs):
        raise ValueError(f"{len(gens)} generators for {len(pairs)} examples")
    rows, contexts, canvases, plens, owner, images = [], [], [], [], [], []
    times, noisy, self_cond = [], [], []
    for i, (item, g) in enumerate(zip(pairs, gens)):
        prompt, response = item[0], item[1]
        images += list(item[2]) if len(item) > 2 else []
        plens.append(len(prompt))
        chunks = chunk_response(response, L, end_id)
        rows.append(prompt + sum(chunks, []))
        for _ in range(cfg.canvases_per_example):
            k = int(torch.randint(len(chunks), (1,), generator=g))
            clean = torch.tensor([chunks[k]])
            t = sample_time(1, cfg.t_eps, g)
            corrupted = corrupt(clean, t, vocab_size, g)[0][0]
            if cfg.suffix_prob > 0 and bool(torch.rand((), generator=g) < cfg.suffix_prob):
                cut = int(torch.randint(L, (1,), generator=g))
                corrupted[:cut] = clean[0, :cut]
            noisy.append(corrupted)
            times.append(t[0])
            self_cond.append(bool(torch.rand((), generator=g) < cfg.self_cond_prob))
            contexts.append(len(prompt) + k * L)
            canvases.append(chunks[k])
            owner.append(i)
    s = max(map(len, rows))
    tokens = torch.full((len(rows), s), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), s, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
        valid[i, :len(r)] = True
    return TrainBatch(tokens, valid, torch.tensor(contexts), torch.tensor(canvases), torch.tensor(plens),
                      torch.tensor(owner), torch.stack(times), torch.stack(noisy), torch.tensor(self_cond), images)


def micro_batches(lengths: list[int], overhead: int = 512) -> list[list[int]]:
    """Split a batch into micro-batches of similar length: indices sorted by length, cut where it minimises
    the padded encoder tokens (each micro-batch costs n * its longest length) plus `overhead` per micro-batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: cost of the first j sorted items, the last group ending at j
        for i in range(j):
            c = best[i] + (j - i) * lengths[order[j - 1]] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def compute_loss(model: DiffusionGemmaText, batch: TrainBatch, cfg: ObjectiveConfig,
                 checkpoint: bool = False, vision=None, soft_ids: tuple[int, ...] = (),
                 any_rank=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch and its parts. any_rank(flag) -> whether any data-parallel rank's flag is set: then
    every rank runs the self-conditioning first pass (FSDP's per-layer gathers must pair up over the ranks)."""
    dev = model.device
    tokens, valid = batch.tokens.to(dev), batch.valid.to(dev)
    context, clean, owner = batch.context.to(dev), batch.canvas.to(dev), batch.rows.to(dev)
    b, s = tokens.shape
    r = clean.shape[0]  # canvases (b * canvases_per_example)
    L, V = cfg.canvas_length, model.config.vocab_size
    window = model.config.sliding_window

    # encoder: causal over prompt + response (image runs bidirectional), keeping keys/values for the decoder
    embeds, blocks = embed_prompt(model, vision, tokens.reshape(-1), batch.images, soft_ids)
    if blocks is not None:
        blocks = blocks.view(b, s)
    enc = BatchEncoderPass(valid, window, blocks)
    positions = torch.arange(s, device=dev).repeat(b)
    hidden = model.forward_tokens(embeds, positions, enc, checkpoint)
    head = head_cross_entropy if cfg.head == "tiled" else head_cross_entropy_reference

    def head_loss(h, targets, bump=None, shift=None):  # per-row cross-entropy of the soft-capped tied head
        return head(h, model.embed_tokens.weight, targets, model.config.final_logit_softcapping, bump, shift)

    parts: dict[str, float] = {}
    total = torch.zeros((), device=dev)
    if cfg.ar_weight > 0:
        pair = valid[:, :-1] & valid[:, 1:]  # predict token i+1 from position i
        if cfg.ar_scope == "response":
            pair &= torch.arange(s - 1, device=dev)[None] >= (batch.prompt_len.to(dev) - 1)[:, None]
        rows = pair.reshape(-1).nonzero().squeeze(1)  # only the scored positions reach the LM head
        ce = head_loss(hidden.view(b, s, -1)[:, :-1].reshape(-1, hidden.shape[-1])[rows],
                       tokens[:, 1:].reshape(-1)[rows])
        per_example = torch.zeros(b, device=dev, dtype=ce.dtype).index_add(0, rows // (s - 1), ce)
        ar = (per_example / pair.sum(1).clamp_min(1)).mean()
        total = total + cfg.ar_weight * ar
        parts["ar"] = ar.item()

    # decoder: the chosen canvases, corrupted at time t (drawn by make_batch)
    t, noisy = batch.t.to(dev), batch.noisy.to(dev)

    def decode(sel, soft):  # the canvases `sel` (indices into the R canvases)
        x = model.self_conditioning(model.embed(noisy[sel].reshape(-1)), soft)
        pos = (context[sel, None] + torch.arange(L, device=dev)).reshape(-1)
        mode = BatchDecoderPass(enc, context[sel], L, window, owner[sel])
        return model.forward_tokens(x, pos, mode, checkpoint)

    everything = torch.arange(r, device=dev)
    soft = None
    use_sc = batch.self_cond.to(dev)
    want = bool(use_sc.any())
    anyone = any_rank(want) if any_rank is not None else want  # every rank asks (a collective)
    if want:
        sc_rows = use_sc.nonzero().squeeze(1)
        with torch.no_grad():  # first pass only for the canvases that will be conditioned on it
            first = model.logits(decode(sc_rows, None))
        soft = torch.zeros(r * L, model.config.hidden_size, dtype=model.dtype, device=dev)
        # under bf16 autocast the soft embedding comes out bf16; the buffer keeps the weights' dtype
        soft.view(r, L, -1)[sc_rows] = model.soft_embedding(first).view(len(sc_rows), L, -1).to(soft.dtype)
    elif anyone:  # another rank conditions: pass in step with it, unused here
        with torch.no_grad():
            decode(everything[:1], None)
    bump = shift = None
    if cfg.loss == "loo":  # the logit of each position's observed noisy token, raised by log(1 + K (1-t)/t)
        alpha = (1 - t).clamp(1e-6, 1 - 1e-6)
        bump, shift = noisy.reshape(-1), torch.log1p(V * alpha / (1 - alpha)).float().repeat_interleave(L)
    ce = head_loss(decode(everything, soft), clean.reshape(-1), bump, shift).view(r, L).mean(1)
    if cfg.loss == "reweighted":
        w = 1.0 / (1.0 - t).clamp_min(1e-6)
        if cfg.reweight_clip is not None:
            w = w.clamp_max(cfg.reweight_clip)
        ce = ce * w
    diff = ce.mean()
    parts["diffusion"] = diff.item()
    total = total + diff
    parts["loss"] = total.item()
    return total, parts
