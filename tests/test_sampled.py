"""Sampled targets (bayeskd.posterior.sampled): unbiased for the full distribution's forward-KL gradient."""
import pytest
import torch

from bayeskd.losses import sparse_kd_loss
from bayeskd.posterior.sampled import _unlisted, sample_targets
from bayeskd.core.sparse import SparseDist


def _target(g, n, v, k):
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    top, idx = lp.topk(k, 1)
    top[-1, k - 2:] = float("-inf")  # a padded row
    idx = idx.int()
    idx[-1, k - 2:] = -1
    tail = 1 - torch.where(idx >= 0, top.exp(), 0).sum(1)
    return SparseDist(idx, top.float(), tail.float(), v)


def _grad(logits, target):
    z = logits.clone().requires_grad_(True)
    sparse_kd_loss(z, target).sum().backward()
    return z.grad


def test_unlisted_enumerates_the_tokens_a_row_does_not_list():
    idx = torch.tensor([[5, 1, 3, -1], [0, 9, 2, 8]], dtype=torch.int32)
    u = torch.arange(6)[None].expand(2, 6)
    assert _unlisted(idx, u).tolist() == [[0, 2, 4, 6, 7, 8], [1, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("keep_top,samples", [(0, 4), (3, 2)])
def test_sampled_gradient_is_unbiased_for_the_full_distribution(keep_top, samples):
    seed = 1234 + keep_top
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    n, v, k, draws = 6, 40, 8, 20000
    target = _target(g, n, v, k)
    logits = torch.randn(n, v, generator=g)
    dense = target.to_dense(torch.float64)  # the full distribution: tail spread uniformly, as the sampler draws it
    full = torch.softmax(logits.double(), -1) - dense  # d KL(dense || softmax(z)) / dz
    one = sample_targets(target, samples, keep_top, generator=g)  # the loss's gradient is s - w (tail 0) ...
    assert torch.allclose(_grad(logits.double(), one), torch.softmax(logits.double(), -1) - one.to_dense(torch.float64))
    # ... so the draws are scored through that formula, all of them in one call (each row repeated `draws` times)
    many = sample_targets(target[torch.arange(n).repeat(draws)], samples, keep_top, generator=g)
    grads = (torch.softmax(logits.double(), -1).repeat(draws, 1) - many.to_dense(torch.float64)).view(draws, n, v)
    mean, se = grads.mean(0), grads.std(0) / draws**0.5
    # 5 standard errors; the exactly kept head has se 0 and float32 log-probabilities
    assert ((mean - full).abs() <= 5 * se + 1e-6).all(), ((mean - full).abs() / (se + 1e-12)).max()
    biased = _grad(logits.double(), target)  # the top-K target with its tail bucket is not the full gradient
    assert ((biased - full).abs() > 5 * se + 1e-6).any()


def test_sampled_rows_are_valid_sparse_dists_with_the_head_kept_exactly():
    g = torch.Generator().manual_seed(7)
    target = _target(g, 5, 30, 6)
    out = sample_targets(target, 5, keep_top=2, generator=g)
    out.validate("sampled")
    assert out.k == 7 and torch.equal(out.tail, torch.zeros(5))
    assert torch.allclose(torch.where(out.indices >= 0, out.logprobs.double().exp(), 0).sum(1),
                          torch.ones(5, dtype=torch.float64), atol=1e-5)  # weights sum to the row's whole mass
    for r in range(5):  # the two largest entries are listed with their own probability
        row = dict(zip(out.indices[r].tolist(), out.logprobs[r].tolist()))
        for j in range(2):
            assert row[int(target.indices[r, j])] == pytest.approx(float(target.logprobs[r, j]), abs=1e-6)
    with pytest.raises(ValueError, match="samples"):
        sample_targets(target, 0)


def test_unsorted_rows_keep_their_largest_entries_as_the_head():
    """SparseDist rows need not be sorted: the head is the row's largest entries wherever they sit, and the draws
    are those of the same rows sorted (same generator seed, same result)."""
    g = torch.Generator().manual_seed(11)
    target = _target(g, 6, 30, 6)
    # reversed columns put the padding first and the smallest entries where a sorted row has its head
    flipped = SparseDist(target.indices.flip(1), target.logprobs.flip(1), target.tail, target.vocab_size)
    got = sample_targets(flipped, 4, keep_top=2, generator=torch.Generator().manual_seed(5))
    want = sample_targets(target, 4, keep_top=2, generator=torch.Generator().manual_seed(5))
    for r in range(6):
        row = dict(zip(got.indices[r].tolist(), got.logprobs[r].tolist()))
        for j in range(2):
            assert row[int(target.indices[r, j])] == float(target.logprobs[r, j])
    assert torch.equal(got.indices, want.indices) and torch.equal(got.logprobs, want.logprobs)
