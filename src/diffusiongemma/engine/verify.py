"""The causal verifier: what the encoder, run over committed tokens, says comes next.

The encoder is a causal language model over the tokens it commits (the training objective's
next-token loss): its final hidden state at a position, through the tied LM head, is the distribution of
the next token. Speculative decoding uses that at the commit of every denoised canvas; autoregressive
decoding uses it alone, one token per pass.

- `next_token`: the verifier's token after a hidden state: the argmax (`ar_temperature` 0) or a sample at
  `ar_temperature` (keyed draw).
- `verify`: the longest prefix of a drafted canvas the verifier agrees with, and the token after it.
  Greedy: canvas token == argmax. Sampled: the draft token is the denoiser's argmax, a point mass, so the
  speculative-sampling test reduces to: accept with probability p(token), else draw from p with that token
  removed and renormalised. The output then has exactly the distribution of autoregressive sampling at
  `ar_temperature` (tested). When the whole canvas is accepted, the token after it is a bonus.
Pinned positions (already the verifier's or forced) are accepted as they are.

With a constraint (structured output) the verifier's distribution at each position is restricted to the
tokens the grammar allows there (its mask): a draft token the grammar forbids is rejected, and the
correction is the verifier's best (or sampled) allowed token.
"""

from __future__ import annotations

import torch

from ..model import DiffusionGemmaText
from ..sampling.draws import ACCEPT, CORRECT, NEXT
from ..sampling.vocab import sample_row, target_logprobs, vocab_pass
from .request import RequestState


def next_token(model: DiffusionGemmaText, r: RequestState, hidden: torch.Tensor, key: tuple[int, int],
               chunk: int) -> int:
    """The verifier's token after hidden [D]; `key` (canvas, step) keys the draw when sampling."""
    w, cap, t = model.head_weight, model.config.final_logit_softcapping, r.params.ar_temperature
    allowed = r.constraint.masks([])[0][None] if r.constraint is not None else None
    if t == 0:
        best, _ = target_logprobs(hidden[None], w, cap, torch.ones(1, device=hidden.device),
                                  torch.zeros(1, dtype=torch.long, device=hidden.device), chunk, allowed)
        return int(best[0])
    u = r.draws.uniforms(key[0], key[1], 1, NEXT)
    if allowed is not None:
        return sample_row(hidden, w, cap, t, u, allowed[0])
    res = vocab_pass(hidden[None], w, cap, torch.full((1,), t, device=hidden.device), u, False, model.embed_scale(),
                     chunk=chunk)
    return int(res.sample[0])


def verify(model: DiffusionGemmaText, r: RequestState, canvas: list[int], hidden: torch.Tensor,
           chunk: int) -> tuple[int, int]:
    """canvas: the drafted canvas's L tokens (the first len(r.pinned) pinned), hidden [L, D]: the encoder's
    hidden states over it (after `r.last_hidden`, the state at the last cached token). Returns (k, token):
    canvas[:k] accepted, and the verifier's token at position k (a correction, or the bonus when k == L)."""
    P = len(r.pinned)
    w, cap, t = model.head_weight, model.config.final_logit_softcapping, r.params.ar_temperature
    dev = hidden.device
    draft = canvas[P:]
    # row j is the state before draft[j]; the last row, after the whole canvas, gives the bonus token
    before = hidden[P - 1:] if P else torch.cat([r.last_hidden[None], hidden])
    masks = r.constraint.masks(draft) if r.constraint is not None else None
    n = len(draft) if masks is None else len(masks) - 1  # draft[:n] is allowed (draft[n] forbidden if n < len)
    rows = before[:n + 1]
    allowed = torch.stack(masks).to(dev) if masks is not None else None
    targets = torch.tensor(draft[:n] + [0], dtype=torch.long, device=dev)
    temps = torch.full((n + 1,), t if t > 0 else 1.0, device=dev)
    best, logp = target_logprobs(rows, w, cap, temps, targets, chunk, allowed)
    if t == 0:
        agree = best[:n] == targets[:n]
    else:
        agree = r.draws.uniforms(r.canvas_index, 0, n, ACCEPT) < logp[:n].double().exp()
    rejected = (~agree).nonzero()
    j = int(rejected[0, 0]) if rejected.numel() else n
    if t == 0:
        return P + j, int(best[j])
    if j == len(draft):  # all accepted: the bonus token after the canvas
        u = r.draws.uniforms(r.canvas_index, 1, 1, NEXT)
    else:  # a correction: the verifier's distribution without the rejected token (forbidden ones already out)
        u = r.draws.uniforms(r.canvas_index, 0, 1, CORRECT)
    return P + j, sample_row(rows[j], w, cap, t, u, allowed[j] if allowed is not None else None,
                             draft[j] if j < len(draft) else None)
