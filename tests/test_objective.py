"""The objective's draws and its LM-head loss: chunking, corruption (and suffix corruption), what a canvas
may read, the tiled head against full logits, micro-batching by length."""

import pytest
import torch

from diffusiongemma.sampling.noise import corrupt, sample_time
from diffusiongemma.training.head import head_cross_entropy, head_cross_entropy_reference
from diffusiongemma.training.objective import ObjectiveConfig, chunk_response, make_batch, micro_batches


def test_chunking_fills_the_last_canvas_with_the_end_token():
    assert chunk_response([5, 6, 7], 4, 1) == [[5, 6, 7, 1]]
    assert chunk_response([5, 6, 7, 8], 4, 1) == [[5, 6, 7, 8]]
    assert chunk_response(list(range(10, 15)), 4, 1) == [[10, 11, 12, 13], [14, 1, 1, 1]]


def test_corruption_rate_follows_t():
    g = torch.Generator().manual_seed(0)
    clean = torch.zeros(4, 4000, dtype=torch.long)
    noisy, replaced = corrupt(clean, torch.tensor([0.0, 0.25, 0.5, 1.0]), 1000, g)
    rates = replaced.float().mean(1)
    torch.testing.assert_close(rates, torch.tensor([0.0, 0.25, 0.5, 1.0]), atol=0.03, rtol=0)
    assert ((noisy != 0) == replaced).float().mean() > 0.99  # replacements are uniform over the vocabulary


def test_suffix_corruption_keeps_a_clean_prefix_and_leaves_the_other_draws_alone():
    """suffix_prob 1: each canvas is the ordinary corruption with a random prefix put back clean; suffix_prob 0 (the
    default) draws exactly what the objective always drew."""
    L, n = 64, 64
    pairs = [([2, 3], list(range(10, 10 + L)))] * n
    clean = torch.tensor(pairs[0][1])

    def draw(cfg):
        return make_batch(pairs, cfg, 4096, 1, 0, [torch.Generator().manual_seed(i) for i in range(n)]).noisy

    plain, suffix = draw(ObjectiveConfig(L)), draw(ObjectiveConfig(L, suffix_prob=1.0))
    for row in range(n):
        cuts = [c for c in range(L + 1) if torch.equal(suffix[row], torch.cat([clean[:c], plain[row, c:]]))]
        assert cuts, row  # a clean prefix, then the same noise as without the option
    assert (suffix != plain).any(1).float().mean() > 0.5  # the prefixes do put noised tokens back
    ref = []
    for i in range(n):  # the objective's draws without the option: the canvas, t, the corruption
        g = torch.Generator().manual_seed(i)
        torch.randint(1, (1,), generator=g)
        ref.append(corrupt(clean[None], sample_time(1, 1e-3, g), 4096, g)[0][0])
    assert torch.equal(plain, torch.stack(ref))
    with pytest.raises(ValueError, match="suffix_prob"):
        ObjectiveConfig(L, suffix_prob=1.5)


def test_batch_reads_only_the_prompt_and_earlier_canvases():
    g = torch.Generator().manual_seed(1)
    b = make_batch([([2, 3, 4], list(range(10, 30)))], ObjectiveConfig(8), 100, 1, 0, g)
    k = (int(b.context[0]) - 3) // 8
    assert int(b.context[0]) == 3 + 8 * k and b.canvas[0].tolist() == (list(range(10, 30)) + [1] * 4)[8 * k:8 * k + 8]


def _head_inputs(n=37, d=16, v=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.5,
            torch.randint(v, (n,), generator=g), torch.randint(v, (n,), generator=g), torch.rand(n, generator=g) * 5)


@pytest.mark.parametrize("loo", [False, True])
@pytest.mark.parametrize("max_cols", [8192, 128])  # one tile across the vocabulary (300), or three (the last short)
def test_tiled_head_loss_and_gradients_match_the_full_logits(loo, max_cols):
    hidden, weight, targets, bump, shift = _head_inputs()
    upstream = torch.rand(hidden.shape[0])
    extra = (bump, shift) if loo else ()
    out = []
    for f in (lambda h, w: head_cross_entropy_reference(h, w, targets, 3.0, *extra),
              lambda h, w: head_cross_entropy(h, w, targets, 3.0, *extra, block_elems=2048, max_cols=max_cols)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = f(h, w)
        (loss * upstream).sum().backward()
        out.append((loss.detach(), h.grad, w.grad))
    assert 2048 // min(300, max_cols) < hidden.shape[0]  # several row blocks
    for ref, tiled in zip(*out):
        torch.testing.assert_close(tiled, ref, atol=1e-5, rtol=1e-5)


def test_tiled_head_keeps_no_vocabulary_sized_activation():
    """The full-logits path saves [rows x vocab] tensors for its backward pass; the tiled one only its
    inputs and one number per row."""
    hidden, weight, targets, _, _ = _head_inputs(n=64, v=500)
    w = weight.requires_grad_()
    for f, expect in ((head_cross_entropy_reference, True), (head_cross_entropy, False)):
        saved: list[tuple] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, seen=saved: seen.append(tuple(t.shape)) or t,
                                                      lambda t: t):
            f(hidden.requires_grad_(), w, targets, 3.0)
        assert any(s == (64, 500) for s in saved) == expect, saved


def test_micro_batches_partition_the_batch_by_length():
    lengths = [40, 300, 35, 280, 42, 310, 38]
    groups = micro_batches(lengths, overhead=50)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[35, 38, 40, 42], [280, 300, 310]]
    assert micro_batches([50] * 5) == [[0, 1, 2, 3, 4]]
