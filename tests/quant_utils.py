"""Helpers of the quantization tests."""

import torch


def logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=g)
    cache = model.new_cache()
    with torch.no_grad():
        model.encode(ids[:24], [cache])
        return model.logits(model.decode(ids[24:], [cache]))


