"""bayeskd.evaluation.metrics: hand-computed V=4 cases, a random check against dense float64 via to_dense(), and
errors."""
import math

import pytest
import torch

from bayeskd.evaluation.metrics import kl_teacher_to_estimate, smoothed_one_hot, summarize, top1_match, topk_mass_coverage
from bayeskd.core.sparse import SparseDist

L = math.log
TEACHER = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()  # one row, V = 4


def sd(rows, tails, v=4, k=None):
    """SparseDist from [(index, prob), ...] per row (padded to k with -1 / -inf)."""
    k = k or max(len(r) for r in rows)
    idx = torch.full((len(rows), k), -1, dtype=torch.int32)
    lp = torch.full((len(rows), k), -math.inf)
    for i, r in enumerate(rows):
        for j, (t, p) in enumerate(r):
            idx[i, j], lp[i, j] = t, L(p) if p > 0 else -math.inf
    return SparseDist(idx, lp, torch.tensor(tails, dtype=torch.float32), v).validate()


# ---------------------------------------------------------------- KL
def test_kl_hand_computed_sparse_and_dense():
    est = sd([[(0, 0.5), (1, 0.3)]], [0.2])  # unlisted tokens 2, 3 get 0.1 each
    want = 0.5 * L(0.5 / 0.5) + 0.25 * L(0.25 / 0.3) + 2 * 0.125 * L(0.125 / 0.1)
    assert kl_teacher_to_estimate(TEACHER, est).item() == pytest.approx(want, abs=1e-6)
    dense = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
    assert kl_teacher_to_estimate(TEACHER, dense).item() == pytest.approx(want, abs=1e-6)


def test_kl_zero_estimate_mass_is_inf_unless_floored():
    est = sd([[(0, 0.5), (1, 0.5)]], [0.0])  # tau = 0 on tokens 2, 3 where the teacher has 0.25
    assert kl_teacher_to_estimate(TEACHER, est).item() == math.inf
    want = 0.25 * L(0.25 / 0.5) + 2 * 0.125 * L(0.125 / 1e-3)
    assert kl_teacher_to_estimate(TEACHER, est, floor=1e-3).item() == pytest.approx(want, abs=1e-6)
    # a listed -inf entry where the teacher has mass is also +inf
    est2 = sd([[(1, 0.0), (0, 0.6)]], [0.4])
    assert kl_teacher_to_estimate(TEACHER, est2).item() == math.inf
    # but zero estimate mass where the teacher has none is fine: 0 log 0 = 0
    t = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).log()
    assert kl_teacher_to_estimate(t, est).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_teacher_to_estimate(t, torch.tensor([[0.5, 0.5, 0.0, 0.0]]).log()).item() == pytest.approx(0, abs=1e-7)


def test_kl_all_tokens_listed():
    est = sd([[(3, 0.1), (2, 0.2), (1, 0.3), (0, 0.4)]], [0.0])
    want = 0.5 * L(0.5 / 0.4) + 0.25 * L(0.25 / 0.3) + 0.125 * L(0.125 / 0.2) + 0.125 * L(0.125 / 0.1)
    assert kl_teacher_to_estimate(TEACHER, est).item() == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------- top-1
def test_top1_hand_computed():
    teacher = torch.tensor([[0.1, 0.2, 0.6, 0.1],   # argmax 2
                            [0.4, 0.1, 0.1, 0.4],   # tie 0/3 -> 0
                            [0.1, 0.5, 0.2, 0.2],   # argmax 1
                            [0.1, 0.2, 0.3, 0.4]]).log()  # argmax 3
    est = sd([[(2, 0.4)],                 # tau = 0.2 < 0.4 -> 2: match
              [(3, 0.2)],                 # tau = 0.8/3 > 0.2 -> lowest unlisted 0: match
              [(3, 0.3), (1, 0.3)],       # listed tie 1/3 -> 1 (tau 0.2): match
              [(2, 0.45)]], [0.6, 0.8, 0.4, 0.55])  # -> 2: no match
    assert top1_match(teacher, est).tolist() == [True, True, True, False]
    dense = torch.tensor([[0.2, 0.2, 0.4, 0.2], [0.8 / 3, 0.8 / 3, 0.8 / 3, 0.2],
                          [0.2, 0.3, 0.2, 0.3], [0.55 / 3, 0.55 / 3, 0.45, 0.55 / 3]]).log()
    assert top1_match(teacher, dense).tolist() == [True, True, True, False]


# ---------------------------------------------------------------- top-k coverage
def test_topk_coverage_hand_computed():
    est = sd([[(3, 0.6), (0, 0.3)]], [0.1])  # dense [0.3, 0.05, 0.05, 0.6]; teacher [.5, .25, .125, .125]
    dense = torch.tensor([[0.3, 0.05, 0.05, 0.6]]).log()
    for e in (est, dense):
        assert topk_mass_coverage(TEACHER, e, 1).item() == pytest.approx(0.125 / 0.5)
        assert topk_mass_coverage(TEACHER, e, 2).item() == pytest.approx((0.125 + 0.5) / 0.75)
        # third is the lowest-index unlisted token (1, tied with 2 at 0.05)
        assert topk_mass_coverage(TEACHER, e, 3).item() == pytest.approx((0.125 + 0.5 + 0.25) / 0.875)
        assert topk_mass_coverage(TEACHER, e, 4).item() == pytest.approx(1.0)
    # tau beats the listed entry: tokens 0, 1, 3 at 0.3 each, token 2 at 0.1
    est = sd([[(2, 0.1)]], [0.9])
    assert topk_mass_coverage(TEACHER, est, 1).item() == pytest.approx(1.0)
    assert topk_mass_coverage(TEACHER, est, 2).item() == pytest.approx(1.0)
    assert topk_mass_coverage(TEACHER, est, 3).item() == pytest.approx(0.875 / 0.875)
    est = sd([[(0, 0.1)]], [0.9])  # tokens 1, 2, 3 at 0.3: top-2 = {1, 2}
    assert topk_mass_coverage(TEACHER, est, 2).item() == pytest.approx(0.375 / 0.75)


# ---------------------------------------------------------------- smoothed one-hot
def test_smoothed_one_hot():
    est = smoothed_one_hot(torch.tensor([2, 0]), 4, eps=0.1).validate()
    d = est.to_dense(torch.float64)
    assert torch.allclose(d.sum(1), torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(d[0], torch.tensor([0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3], dtype=torch.float64), atol=1e-6)
    want = 0.5 * L(0.5 / 0.9) + 0.25 * L(0.25 / (0.1 / 3)) + 2 * 0.125 * L(0.125 / (0.1 / 3))
    kl = kl_teacher_to_estimate(TEACHER.expand(2, 4), est)
    assert kl[1].item() == pytest.approx(want, abs=1e-6)
    assert top1_match(TEACHER.expand(2, 4), est).tolist() == [False, True]
    assert torch.allclose(smoothed_one_hot(torch.tensor([1]), 4, eps=0.0).to_dense(), torch.tensor([[0., 1, 0, 0]]))


# ---------------------------------------------------------------- identical distributions
def test_identical_distributions():
    est = sd([[(1, 0.5), (3, 0.2)], [(0, 0.7)], [(2, 0.25), (0, 0.25), (1, 0.25), (3, 0.25)]], [0.3, 0.3, 0.0])
    teacher = est.to_dense(torch.float64).log()
    assert torch.allclose(kl_teacher_to_estimate(teacher, est), torch.zeros(3, dtype=torch.float64), atol=1e-7)
    assert top1_match(teacher, est).all()
    for k in range(1, 5):
        assert torch.allclose(topk_mass_coverage(teacher, est, k), torch.ones(3, dtype=torch.float64))
        assert torch.allclose(topk_mass_coverage(teacher, teacher, k), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(kl_teacher_to_estimate(teacher, teacher), torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------- random vs dense float64
def _random_sparse(n, v, k, g):
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]).to(torch.int32)
    w = torch.rand(n, k + 1, generator=g) + 0.05
    w = w / w.sum(1, keepdim=True)
    lp = w[:, :k].log()
    nlisted = torch.randint(0, k + 1, (n,), generator=g)
    pad = torch.arange(k)[None] >= nlisted[:, None]
    idx[pad], lp[pad] = -1, -math.inf
    tail = 1 - torch.where(pad, torch.zeros(()), w[:, :k]).sum(1)
    return SparseDist(idx, lp, tail.float(), v).validate()


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_random_against_dense(chunk_rows):
    g = torch.Generator().manual_seed(0)
    n, v, k = 37, 50, 7
    est = _random_sparse(n, v, k, g)
    teacher = torch.log_softmax(3 * torch.randn(n, v, generator=g), dim=1)
    q = est.to_dense(torch.float64)
    p = teacher.double().exp()
    want_kl = (p * (teacher.double() - q.log())).sum(1)
    got = kl_teacher_to_estimate(teacher, est, chunk_rows=chunk_rows)
    assert got.dtype == torch.float64 and got.shape == (n,)
    assert torch.allclose(got, want_kl, atol=1e-9)
    assert torch.allclose(kl_teacher_to_estimate(teacher, q.log(), chunk_rows=chunk_rows), want_kl, atol=1e-9)
    want_top1 = q.argmax(1) == teacher.argmax(1)
    assert torch.equal(top1_match(teacher, est, chunk_rows=chunk_rows), want_top1)
    assert torch.equal(top1_match(teacher, q.log(), chunk_rows=chunk_rows), want_top1)
    for kk in (1, 3, 7, 12, v):  # 12 > K: unlisted tokens (tied at tau) enter in index order
        top = torch.sort(q, dim=1, descending=True, stable=True).indices[:, :kk]
        want = p.gather(1, top).sum(1) / p.topk(kk, dim=1).values.sum(1)
        assert torch.allclose(topk_mass_coverage(teacher, est, kk, chunk_rows=chunk_rows), want, atol=1e-12)
        assert torch.allclose(topk_mass_coverage(teacher, q.log(), kk, chunk_rows=chunk_rows), want, atol=1e-12)


# ---------------------------------------------------------------- summarize
def test_summarize():
    m = {"kl": torch.tensor([1.0, 2.0, math.inf, 4.0]), "top1": torch.tensor([True, False, True, True])}
    assert summarize(m) == {"kl": math.inf, "top1": 0.75}
    s = summarize(m, mask=torch.tensor([True, True, False, False]))
    assert s == {"kl": 1.5, "top1": 0.5}
    assert math.isnan(summarize(m, mask=torch.zeros(4, dtype=torch.bool))["kl"])


# ---------------------------------------------------------------- errors
def test_errors():
    est = sd([[(0, 0.5)]], [0.5])
    with pytest.raises(ValueError, match="vocabulary size V=4, teacher has V=5"):
        kl_teacher_to_estimate(torch.zeros(1, 5), est)
    with pytest.raises(ValueError, match="estimate has 1 rows, teacher has 2"):
        top1_match(torch.zeros(2, 4), est)
    with pytest.raises(ValueError, match="rows"):
        topk_mass_coverage(torch.zeros(2, 4), torch.zeros(3, 4), 1)
    with pytest.raises(ValueError, match="V=3"):
        kl_teacher_to_estimate(TEACHER, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        kl_teacher_to_estimate(torch.zeros(4), est)
    with pytest.raises(ValueError, match="k must be"):
        topk_mass_coverage(TEACHER, est, 5)
    with pytest.raises(ValueError, match="NaN"):
        kl_teacher_to_estimate(torch.full((1, 4), math.nan), est)
    with pytest.raises(ValueError, match="eps"):
        smoothed_one_hot(torch.tensor([0]), 4, eps=1.0)
    with pytest.raises(ValueError, match="outside"):
        smoothed_one_hot(torch.tensor([-100]), 4)
    with pytest.raises(ValueError, match="shape"):
        summarize({"kl": torch.zeros(3)}, mask=torch.ones(4, dtype=torch.bool))
