"""The tied, soft-capped LM head: the one function every path that needs logits calls.

logits = cap * tanh((hidden . E^T) / cap): the product in the weight dtype (what the reference's
`lm_head` returns), the soft cap in fp32. The model's full-logits path, the engine's chunked vocabulary
pass (per chunk) and the training loss's tiles (per tile) all go through it. It lives in this bottom
layer because all three of them do: the model and training sit above sampling, not below it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softcap(raw: torch.Tensor, cap: float, tanh: bool = False):
    """cap * tanh(raw / cap) in fp32; with tanh=True also the tanh itself (the cap's derivative is 1 - tanh^2)."""
    t = torch.tanh(raw.float() / cap)
    return (t * cap, t) if tanh else t * cap


def lm_head(hidden: torch.Tensor, weight: torch.Tensor, cap: float, tanh: bool = False):
    """Logits [..., V'] (fp32) of hidden [..., D] against embedding rows weight [V', D] (all of E, or a chunk)."""
    return softcap(F.linear(hidden, weight), cap, tanh)
