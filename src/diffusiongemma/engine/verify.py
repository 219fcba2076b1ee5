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
"""

from __future__ import annotations

import torch

from ..model import DiffusionGemmaText
from ..sampling.draws import ACCEPT, CORRECT, NEXT
from ..sampling.vocab import sample_excluding, target_logprobs, vocab_pass
from .request import RequestState


def next_token(model: DiffusionGemmaText, r: RequestState, hidden: torch.Tensor, key: tuple[int, int],
               chunk: int) -> int:
    """The verifier's token after hidden [D]; `key` (canvas, step) keys the draw when sampling."""
    w, cap, t = model.embed_tokens.weight, model.config.final_logit_softcapping, r.params.ar_temperature
    if t == 0:
        best, _ = target_logprobs(hidden[None], w, cap, torch.ones(1, device=hidden.device),
                                  torch.zeros(1, dtype=torch.long, device=hidden.device), chunk)
        return int(best[0])
    u = r.draws.uniforms(key[0], key[1], 1, NEXT)
    res = vocab_pass(hidden[None], w, cap, torch.full((1,), t, device=hidden.device), u, False, model.embed_scale(),
                     chunk=chunk)
    return int(res.sample[0])


def verify(model: DiffusionGemmaText, r: RequestState, canvas: list[int], hidden: torch.Tensor,
           chunk: int) -> tuple[int, int]:
    """canvas: the drafted canvas's L tokens (the first len(r.pinned) pinned), hidden [L, D]: the encoder's
    hidden states over it (after `r.last_hidden`, the state at the last cached token). Returns (k, token):
    canvas[:k] accepted, and the verifier's token at position k (a correction, or the bonus when k == L)."""
    L, P = len(canvas), len(r.pinned)
    w, cap, t = model.embed_tokens.weight, model.config.final_logit_softcapping, r.params.ar_temperature
    dev = hidden.device
    # row j predicts canvas[j]: the state before position j
    before = hidden[P - 1:L - 1] if P else torch.cat([r.last_hidden[None], hidden[:L - 1]])
    targets = torch.tensor(canvas[P:], dtype=torch.long, device=dev)
    k = L
    if targets.numel():
        best, logp = target_logprobs(before, w, cap, torch.full((L - P,), t if t > 0 else 1.0, device=dev), targets,
                                     chunk)
        if t == 0:
            agree = best == targets
        else:
            agree = r.draws.uniforms(r.canvas_index, 0, L - P, ACCEPT) < logp.double().exp()
        rejected = (~agree).nonzero()
        if rejected.numel():
            j = int(rejected[0, 0])
            k = P + j
            if t == 0:
                return k, int(best[j])
            u = r.draws.uniforms(r.canvas_index, 0, 1, CORRECT)
            return k, sample_excluding(before[j], w, cap, t, canvas[k], u)
    return k, next_token(model, r, hidden[L - 1], (r.canvas_index, 1), chunk)
