"""Placing images (and video frames) into a prompt.

Token side (the processor): every image placeholder the chat template wrote expands to begin-image,
one soft-token placeholder per vision vector, end-image; a video placeholder expands to one such
group per sampled frame, each preceded by its `mm:ss` timestamp, as the Gemma 4 processor writes it.

Embedding side (the encoder's input): the placeholder rows of the token embeddings are overwritten,
in order, by the projected vision vectors (not multiplied by the embedding scale), and each
contiguous run of placeholders becomes one bidirectional block. transformers 5.23.0's `generate`
applies that block in sliding *and* full-attention layers (Google's JAX Gemma 4 only in sliding
layers); we follow transformers.
"""

from __future__ import annotations

import torch

from .preprocess import ImageInput


class PlacementError(ValueError):
    pass


def expand_placeholders(ids: list[int], counts: list[int], placeholder: int, boi: int, eoi: int,
                        soft: int | None = None, prefixes: list[list[int]] | None = None) -> list[int]:
    """Expand each `placeholder` in ids into boi + counts[i] x soft + eoi (soft defaults to placeholder),
    optionally preceded by prefixes[i] (a video frame's timestamp tokens)."""
    soft = placeholder if soft is None else soft
    n = sum(1 for t in ids if t == placeholder)
    if n != len(counts):
        raise PlacementError(f"the prompt has {n} image placeholders but {len(counts)} images were given")
    out, k = [], 0
    for t in ids:
        if t != placeholder:
            out.append(t)
            continue
        out += (prefixes[k] if prefixes else []) + [boi] + [soft] * counts[k] + [eoi]
        k += 1
    return out


def block_ids(ids: torch.Tensor, soft_ids: tuple[int, ...]) -> torch.Tensor | None:
    """-1 for text; the index of its run for each contiguous run of vision soft tokens."""
    is_vision = torch.isin(ids, torch.tensor(soft_ids, device=ids.device))
    if not bool(is_vision.any()):
        return None
    starts = is_vision & ~torch.cat([torch.zeros(1, dtype=torch.bool, device=ids.device), is_vision[:-1]])
    run = torch.cumsum(starts.long(), 0) - 1
    return torch.where(is_vision, run, torch.full_like(run, -1))


def embed_prompt(model, vision, ids: torch.Tensor, images: list[ImageInput], soft_ids: tuple[int, ...]):
    """Token embeddings with the vision vectors placed; returns (embeddings [N, D], block ids or None).

    ids [N] may pack several sequences (a training batch's rows laid end to end): runs never cross a
    sequence boundary, so each run's block id is its own. Differentiable (training calls it with gradients)."""
    embeds = model.embed(ids)
    if not images:
        return embeds, None
    if vision is None:
        raise PlacementError("this model was loaded without a vision tower")
    pixels = torch.stack([im.pixel_values for im in images]).to(embeds.device)
    positions = torch.stack([im.positions for im in images]).to(embeds.device)
    features = torch.cat(vision(pixels.to(next(vision.parameters()).dtype), positions))
    mask = torch.isin(ids, torch.tensor(soft_ids, device=ids.device))
    if int(mask.sum()) != features.shape[0]:
        raise PlacementError(f"{int(mask.sum())} image soft-token placeholders for {features.shape[0]} vision vectors")
    embeds = embeds.clone()
    embeds[mask] = features.to(embeds.dtype)
    return embeds, block_ids(ids, soft_ids)
