"""Conditioning on revealed probabilities (`bayeskd.core.condition`) against a dense float64 reference.

The reference builds the full [N, V] posterior and applies docs/MATH.md's rule by brute force: the ε -> 0 limit
is taken literally (r + ε on every token outside the exact entries, ε at most 1e-18 and 1e-12 of the row's
smallest positive r) and c is found by bisection on
log c, over dense vectors; the relaxation is applied where no c exists. Random rows cover odd V, K in {1, 4, 16},
0..6 evidence entries (exact and lower-bound, listed or not by the posterior) and the regimes of the rule (the cap
binding on the tail group, zero-weight spreading, relaxation, tail-0 posteriors, rounding above 1). The seed is
printed (the `rng` fixture).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bayeskd.core.combine import combine
from bayeskd.core.condition import MASS_TOL, UNREVEALED_MIN, condition, evidence_only
from bayeskd.core.sparse import SparseDist

EPS = 1e-18
KINDS = ("none", "teacher", "random", "cap_tail", "relax", "relax_lower", "only_evidence", "tail0_partial",
         "near_one", "zero_prob")


# ---------------------------------------------------------------------------------------------------- random rows

def _evidence_probs(rng, e: int, total: float, m: float | None = None) -> np.ndarray:
    """e probabilities summing to `total`, the smallest `m` when given (the others larger)."""
    if m is None:
        return rng.dirichlet(np.ones(e)) * total
    extra = rng.dirichlet(np.ones(e)) * max(total - e * m, 0.0)
    out = m + extra
    out[rng.integers(e)] = m
    return out


def _row(rng, v: int, k: int, kind: str):
    """(posterior tokens, probs, tail, evidence [(token, prob, lower)]) of one row of the given kind."""
    e = int(rng.integers(1, 7))
    n_listed = k if rng.random() < 0.7 else int(rng.integers(0, k + 1))
    tokens = rng.permutation(v)
    tail = float(rng.uniform(0, 0.5)) if rng.random() < 0.8 else 0.0
    if kind == "cap_tail":  # listed entries below the tail's per-token mass: the tail group hits the cap first
        n_listed, tail = k, 1 - k * float(rng.uniform(0.002, 0.02))
    if kind in ("only_evidence", "tail0_partial"):
        tail = 0.0
    listed = tokens[:n_listed]
    tail = 1.0 if n_listed == 0 else tail
    probs = rng.dirichlet(np.full(n_listed, rng.choice([0.3, 1.0, 3.0]))) * (1 - tail) if n_listed else np.zeros(0)
    if n_listed > 1 and rng.random() < 0.1:
        probs[0], probs[-1] = probs[0] + probs[-1], 0.0  # a listed entry with probability 0 (combine keeps those)

    pool = list(rng.permutation(np.concatenate([listed[: max(1, n_listed // 2)], tokens[n_listed:]])))
    ev_tokens = [int(t) for t in pool[:e]]
    e = len(ev_tokens)
    low = list(rng.random(e) < 0.35)
    if kind == "none":
        return listed, probs, tail, []
    if kind == "teacher":  # a sharp or flat teacher, its top-e revealed (lower bounds below the truth)
        t = rng.dirichlet(np.full(v, rng.choice([0.05, 0.2, 1.0])))
        top = np.argsort(-t)[:e]
        vals = [float(t[j]) * (rng.uniform(0.3, 1.0) if lo else 1.0) for j, lo in zip(top, low)]
        return listed, probs, tail, [(int(j), float(p), bool(lo)) for j, p, lo in zip(top, vals, low)]
    if kind == "random":
        vals = _evidence_probs(rng, e, float(rng.uniform(0.2, 1.0)))
    elif kind == "cap_tail":  # without lower bounds: m just above M / (tokens outside E), so the cap holds
        total = float(rng.uniform(0.1, 0.5))
        low = low if rng.random() < 0.5 else [False] * e
        m = (1 - total) / (v - e) * float(rng.uniform(1.0, 1.05)) if not any(low) else \
            float(rng.uniform(0.05, 0.5)) * (1 - total) / v
        vals = _evidence_probs(rng, e, max(total, e * m), m)
    elif kind in ("relax", "relax_lower"):
        low = [False] * e if kind == "relax" else [i == 0 for i in range(e)]
        vals = rng.uniform(0.1, 0.5, e) / v
    elif kind == "only_evidence":  # the posterior lists (some of) the evidence tokens only, tail 0
        n = min(k, e)
        listed, probs = np.array(ev_tokens[:n]), rng.dirichlet(np.ones(n))
        vals = _evidence_probs(rng, e, float(rng.uniform(0.2, 0.9)))
    elif kind == "tail0_partial":  # tail 0 and few non-evidence entries: they hit the cap, the rest goes to r = 0
        m = float(rng.uniform(0.02, 0.1))
        vals = _evidence_probs(rng, e, float(rng.uniform(e * m, max(e * m, 0.6))), m)
    elif kind == "near_one":
        vals = _evidence_probs(rng, e, 1 + float(rng.uniform(-1e-7, 5e-5)))
    elif kind == "zero_prob":
        vals = _evidence_probs(rng, e, float(rng.uniform(0.2, 0.9)))
        vals[rng.integers(e)] = 0.0
    return listed, probs, tail, [(t, float(p), bool(lo)) for t, p, lo in zip(ev_tokens, vals, low)]


def make_rows(rng, n: int, v: int, k: int, kinds=KINDS):
    """(posterior SparseDist sorted like combine's output, ev_indices, ev_probs, ev_lower, row kinds)."""
    rows = [(kind := kinds[i % len(kinds)], _row(rng, v, k, kind)) for i in range(n)]
    idx = torch.full((n, k), -1, dtype=torch.int32)
    lp = torch.full((n, k), float("-inf"))
    tail = torch.zeros(n)
    e_max = max(len(r[3]) for _, r in rows) or 1
    ei = torch.full((n, e_max), -1, dtype=torch.int32)
    ep = torch.zeros(n, e_max)
    el = torch.zeros(n, e_max, dtype=torch.bool)
    for i, (_, (listed, probs, t, ev)) in enumerate(rows):
        order = np.argsort(-probs, kind="stable")
        idx[i, : len(listed)] = torch.tensor(listed[order].astype(np.int64), dtype=torch.int32)
        lp[i, : len(listed)] = torch.tensor(probs[order]).log().float()
        tail[i] = t
        for j, (tok, p, lo) in enumerate(ev):
            ei[i, j], ep[i, j], el[i, j] = tok, p, lo
    return SparseDist(idx, lp, tail, v), ei, ep, el, [kind for kind, _ in rows]


# ---------------------------------------------------------------------------------------------------- the reference

def reference(post: SparseDist, ei, ep, el):
    """Dense float64 conditioning: (q [N, V], relaxed [N], tail cap binding [N], zero-weight spreading [N])."""
    r = post.to_dense(torch.float64)
    n, v = r.shape
    rows = torch.arange(n)[:, None].expand_as(ei)
    valid = ei >= 0
    val = torch.zeros(n, v, dtype=torch.float64)
    X = torch.zeros(n, v, dtype=torch.bool)
    L = torch.zeros(n, v, dtype=torch.bool)
    val[rows[valid], ei[valid].long()] = ep[valid].double()
    X[rows[valid], ei[valid].long()] = ~el[valid]
    L[rows[valid], ei[valid].long()] = el[valid]
    E = X | L
    A = val.sum(1)
    room = 1 - UNREVEALED_MIN * (E.sum(1) < v).double()  # some token unrevealed: keep it possible
    val = torch.where((A > room)[:, None], val * (room / A)[:, None], val)
    M = (1 - val.sum(1)).clamp(min=0)
    m = torch.where(E, val, torch.full_like(val, float("inf"))).amin(1)
    # ε per row, far below its smallest positive r: a lower bound with a tiny r may take c ~ M / r, and c·ε must
    # stay negligible there (a fixed 1e-18 gave zero-weight tokens 1e-6 each beside an r of 7e-13)
    r_min = torch.where(~X & (r > 0), r, torch.full_like(r, float("inf"))).amin(1)
    eps = (1e-12 * r_min).clamp(min=1e-60, max=EPS)[:, None]
    rr = torch.where(~X, r + eps, torch.zeros_like(r))
    out = ~E

    def f(c):
        return (torch.minimum(c[:, None] * rr, m[:, None]) * out).sum(1) + (c[:, None] * rr * L).sum(1)

    lo, hi = torch.full((n,), -80.0, dtype=torch.float64), torch.full((n,), 160.0, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 200 rounds of tiny ops: threads only add synchronisation (20x slower on a busy box)
    try:
        for _ in range(200):
            mid = (lo + hi) / 2
            big = f(mid.exp()) >= M
            hi, lo = torch.where(big, mid, hi), torch.where(big, lo, mid)
    finally:
        torch.set_num_threads(threads)
    c = torch.where(M > 0, hi.exp(), torch.zeros_like(hi))
    q = torch.where(X, val, torch.where(out, torch.minimum(c[:, None] * rr, m[:, None]), val + c[:, None] * rr))
    n_out = out.sum(1)
    relaxed = (L.sum(1) == 0) & (m * n_out < M) & E.any(1)
    share = torch.where(out, rr, torch.zeros_like(rr))
    share = share / share.sum(1, keepdim=True).clamp(min=1e-300)
    q_relax = torch.where(out, m[:, None] + (M - m * n_out)[:, None] * share, val)
    q = torch.where(relaxed[:, None], q_relax, q)
    q = torch.where(E.any(1)[:, None], q, r)
    unlisted = torch.ones(n, v, dtype=torch.bool)
    listed = post.indices >= 0
    unlisted[torch.arange(n)[:, None].expand_as(post.indices)[listed], post.indices[listed].long()] = False
    binds = (unlisted & out & (r > 0) & (c[:, None] * rr > m[:, None] * (1 + 1e-9))).any(1) & ~relaxed & E.any(1)
    zero_spread = (c * eps[:, 0] > 1e-9) & ~relaxed & E.any(1)
    return q, relaxed, binds, zero_spread


def _dense(d: SparseDist) -> torch.Tensor:
    return d.to_dense(torch.float64)


# ---------------------------------------------------------------------------------------------------- against it

@pytest.mark.parametrize("v", [37, 101])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_condition_matches_dense_reference(rng, v, k):
    post, ei, ep, el, kinds = make_rows(rng, 400, v, k)
    got = condition(post, ei, ep, el)
    got.validate("conditioned")
    q, relaxed, binds, zero_spread = reference(post, ei, ep, el)
    err = (_dense(got) - q).abs().amax(1)
    bad = int(err.argmax())
    assert err.max() < 1e-6, f"row {bad} ({kinds[bad]}): max |condition - reference| = {err.max():.3g}"
    # the regimes of the rule all occurred (a failure here is the generator's, not the rule's)
    assert relaxed.sum() >= 10 and zero_spread.sum() >= 10, (int(relaxed.sum()), int(zero_spread.sum()))
    if k == 16 and v == 37:
        assert binds.sum() >= 5, int(binds.sum())


def test_properties(rng):
    for v, k in ((37, 4), (101, 16), (37, 1)):
        post, ei, ep, el, kinds = make_rows(rng, 600, v, k)
        got = condition(post, ei, ep, el)
        d = _dense(got)
        q, relaxed, _, _ = reference(post, ei, ep, el)
        assert torch.allclose(d.sum(1), torch.ones(len(d), dtype=torch.float64), atol=1e-5)
        valid = ei >= 0
        rows = torch.arange(len(d))[:, None].expand_as(ei)
        at = d[rows[valid], ei[valid].long()]
        p = ep[valid].double()
        a = torch.where(valid, ep.double(), torch.zeros(())).sum(1)
        room = torch.where(valid.sum(1) < d.shape[1], 1 - UNREVEALED_MIN, 1.0).double()
        p = p * (room / a.clamp(min=room))[:, None].expand_as(ei)[valid]  # rounding to 1: some mass kept for the rest
        exact = ~el[valid]
        assert torch.allclose(at[exact], p[exact], rtol=1e-6, atol=1e-12), "exact entries changed"
        assert (at[~exact] >= p[~exact] * (1 - 1e-6) - 1e-12).all(), "a lower bound lost mass"
        ev_mask = torch.zeros_like(d, dtype=torch.bool)
        ev_mask[rows[valid], ei[valid].long()] = True
        m = torch.where(valid, ep.double() / a.clamp(min=1)[:, None], torch.full_like(ep, 2.0, dtype=torch.float64))
        m = m.amin(1)
        has = valid.any(1)
        over = (torch.where(ev_mask, torch.zeros_like(d), d).amax(1) > m * (1 + 1e-6) + 1e-12) & has
        assert not (over & ~relaxed).any(), "a non-evidence token above the smallest evidence probability"
        assert relaxed.any()
        # rows without evidence: the posterior's row bit for bit
        none = ~has
        assert none.sum() > 0
        assert torch.equal(got.indices[none, : post.k], post.indices[none])
        assert torch.equal(got.logprobs[none, : post.k], post.logprobs[none])
        assert torch.equal(got.tail[none], post.tail[none])
        assert (got.indices[none, post.k:] == -1).all() and torch.isneginf(got.logprobs[none, post.k:]).all()


@pytest.mark.parametrize("v,k", [(37, 16), (101, 4)])
def test_top_k_truncation(rng, v, k):
    post, ei, ep, el, _ = make_rows(rng, 300, v, k)
    full = condition(post, ei, ep, el)
    assert full.k >= post.k
    q, *_ = reference(post, ei, ep, el)
    has = (ei >= 0).any(1)
    for top_k in (1, 3, k + 2):
        got = condition(post, ei, ep, el, top_k=top_k)
        assert got.k == top_k
        kk = min(top_k, full.k)
        # the evidence rows: the first top_k entries of the full result, the rest in the tail
        assert torch.equal(got.indices[has, :kk], full.indices[has, :kk])
        assert torch.equal(got.logprobs[has, :kk], full.logprobs[has, :kk])
        dropped = full.logprobs[has, kk:].double().exp().sum(1)
        assert torch.allclose(got.tail[has].double(), full.tail[has].double() + dropped, atol=1e-6)
        # listed entries equal the reference; everything sums to 1
        listed = got.indices >= 0
        rows = torch.arange(len(q))[:, None].expand_as(got.indices)
        assert torch.allclose(got.logprobs[listed].double().exp(), q[rows[listed], got.indices[listed].long()],
                              atol=1e-6)
        mass = torch.where(listed, got.logprobs.double().exp(), torch.zeros(())).sum(1) + got.tail.double()
        assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)
        # rows without evidence: unchanged when their entries fit, else truncated like combine
        fits = ~has & ~(post.indices[:, top_k:] >= 0).any(1) if top_k < k else ~has
        if top_k < k:
            assert torch.equal(got.indices[fits], post.indices[fits, :top_k])
            assert torch.equal(got.logprobs[fits], post.logprobs[fits, :top_k])
            assert torch.equal(got.tail[fits], post.tail[fits])
            cut = ~has & ~fits
            assert cut.any()
            assert torch.equal(got.indices[cut], post.indices[cut, :top_k])  # already sorted by probability
            extra = post.logprobs[cut, top_k:].double().exp().sum(1)
            assert torch.allclose(got.tail[cut].double(), post.tail[cut].double() + extra, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- hand cases

def _post(idx, probs, tail, v):
    return SparseDist(torch.tensor(idx, dtype=torch.int32), torch.tensor(probs, dtype=torch.float64).log().float(),
                      torch.tensor(tail, dtype=torch.float32), v)


def test_hand_worked_row():
    """V = 10, posterior {3: .5, 1: .2}, tail .3 (tau = .0375); evidence 1 exact .4, 4 lower-bound .1: A = .5,
    m = .1. Token 3 caps at c = .2; then .1 + c·(7·.0375 + .0375) = .5 gives c = 4/3: every tail token .05, token
    4 = .1 + .05."""
    got = condition(_post([[3, 1]], [[0.5, 0.2]], [0.3], 10), torch.tensor([[1, 4]]), torch.tensor([[0.4, 0.1]]),
                    torch.tensor([[False, True]]))
    want = torch.full((10,), 0.05, dtype=torch.float64)
    want[1], want[3], want[4] = 0.4, 0.1, 0.15
    assert torch.allclose(_dense(got)[0], want, atol=1e-7)
    assert got.indices.tolist() == [[1, 4, 3]] and abs(got.tail.item() - 0.35) < 1e-7


def test_tail_group_capped_without_lower_bounds():
    """V = 10, posterior {0: .02, 1: .02}, tail .96 (tau = .12 on 8 tokens); evidence 2: .4, 3: .08 exact, so
    M = .52 and m = .08. The six tail tokens cap at c = 2/3 (.48 in all); tokens 0 and 1 take the last .04 (c = 1)."""
    got = condition(_post([[0, 1]], [[0.02, 0.02]], [0.96], 10), torch.tensor([[2, 3]]), torch.tensor([[0.4, 0.08]]))
    want = torch.full((10,), 0.08, dtype=torch.float64)
    want[0], want[1], want[2] = 0.02, 0.02, 0.4
    assert torch.allclose(_dense(got)[0], want, atol=1e-7) and abs(got.tail.item() - 0.48) < 1e-7


def test_uniform_when_posterior_lists_only_evidence():
    """The posterior lists only the evidence tokens, tail 0: M is spread uniformly over the other tokens."""
    got = condition(_post([[2, 5]], [[0.7, 0.3]], [0.0], 11), torch.tensor([[2, 5]]), torch.tensor([[0.5, 0.2]]))
    d = _dense(got)[0]
    assert abs(d[2] - 0.5) < 1e-7 and abs(d[5] - 0.2) < 1e-7
    others = torch.ones(11, dtype=torch.bool)
    others[[2, 5]] = False
    assert torch.allclose(d[others], torch.full((9,), 0.3 / 9, dtype=torch.float64), atol=1e-7)


def test_relaxation_spreads_the_rest_in_proportion():
    """Two exact entries at .01 in V = 5: three tokens at the cap hold .03 of .98; the rest goes by the posterior."""
    post = _post([[0, 1, 2]], [[0.5, 0.3, 0.2]], [0.0], 5)
    got = condition(post, torch.tensor([[3, 4]]), torch.tensor([[0.01, 0.01]]))
    d = _dense(got)[0]
    rest = 0.98 - 3 * 0.01
    assert torch.allclose(d[:3], 0.01 + rest * torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=1e-7)
    # a lower-bound entry instead takes the rest, and the cap holds
    got = condition(post, torch.tensor([[3, 4]]), torch.tensor([[0.01, 0.01]]), torch.tensor([[False, True]]))
    d = _dense(got)[0]
    assert torch.allclose(d[:3], torch.full((3,), 0.01, dtype=torch.float64), atol=1e-7)
    assert abs(d[4] - (1 - 0.04)) < 1e-6


def test_errors_and_edges():
    post = _post([[0, 1], [2, 3]], [[0.5, 0.3], [0.6, 0.2]], [0.2, 0.2], 9)
    ei = torch.tensor([[0, -1], [1, 4]])
    with pytest.raises(ValueError, match="row 1.*sum to more than 1"):
        condition(post, ei, torch.tensor([[0.5, 0.0], [0.6, 0.4002]]))
    ok = condition(post, ei, torch.tensor([[0.5, 0.0], [0.6, 0.40004]]))  # within MASS_TOL: renormalized
    assert abs(_dense(ok)[1, 1] - 0.6 * (1 - UNREVEALED_MIN) / 1.00004) < 1e-7 and abs(_dense(ok)[1].sum() - 1) < 1e-6
    with pytest.raises(ValueError, match="row 1.*twice"):
        condition(post, torch.tensor([[0, -1], [4, 4]]), torch.tensor([[0.5, 0.0], [0.2, 0.2]]))
    with pytest.raises(ValueError, match="row 0.*outside"):
        condition(post, torch.tensor([[9, -1], [1, 4]]), torch.tensor([[0.5, 0.0], [0.2, 0.2]]))
    with pytest.raises(ValueError, match="row 1.*negative"):
        condition(post, ei, torch.tensor([[0.5, 0.0], [0.2, -0.1]]))
    with pytest.raises(ValueError, match="NaN"):
        condition(post, ei, torch.tensor([[float("nan"), 0.0], [0.2, 0.1]]))
    with pytest.raises(ValueError, match="shape"):
        condition(post, ei, torch.tensor([[0.5, 0.0]]))
    with pytest.raises(ValueError, match="top_k"):
        condition(post, ei, torch.tensor([[0.5, 0.0], [0.2, 0.1]]), top_k=0)
    # every token revealed exactly: A must be 1 (within MASS_TOL)
    small = _post([[0]], [[1.0]], [0.0], 3)
    with pytest.raises(ValueError, match="row 0.*every token"):
        condition(small, torch.tensor([[0, 1, 2]]), torch.tensor([[0.5, 0.2, 0.1]]))
    got = condition(small, torch.tensor([[0, 1, 2]]), torch.tensor([[0.5, 0.3, 0.19996]]))
    assert abs(_dense(got).sum() - 1) < 1e-6
    # no evidence columns at all; bf16 and float64 posteriors keep their rows bit for bit
    assert torch.equal(condition(post, torch.zeros(2, 0, dtype=torch.int32), torch.zeros(2, 0)).logprobs,
                       post.logprobs)
    for dtype in (torch.bfloat16, torch.float64):
        p2 = post.to(dtype=dtype)
        got = condition(p2, torch.tensor([[-1, -1], [1, 4]]), torch.tensor([[0.0, 0.0], [0.3, 0.1]]))
        assert got.logprobs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(got.logprobs[0, :2], p2.logprobs[0].to(got.logprobs.dtype))


def test_on_combine_output_with_extras(rng):
    """A posterior straight from `combine` (extras carried over) conditions and validates."""
    prior, ei, ep, el, _ = make_rows(rng, 50, 37, 4)
    proxy, *_ = make_rows(rng, 50, 37, 4)
    post = combine(prior, proxy, mode="mixture", w=0.3)
    post.extras["proxy_teacher_logprob"] = torch.zeros(50)
    got = condition(post, ei, ep, el).validate("conditioned")
    assert set(got.extras) == {"proxy_teacher_logprob"}
    q, *_ = reference(post, ei, ep, el)
    assert (_dense(got) - q).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------------- baselines

def test_evidence_only(rng):
    _, ei, ep, el, _ = make_rows(rng, 300, 37, 4)
    ep = ep / (ep.sum(1, keepdim=True).clamp(min=1 - UNREVEALED_MIN)) * (1 - UNREVEALED_MIN)  # A < 1: no rounding
    got = evidence_only(ei, ep, 37)
    got.validate("evidence_only")
    d = _dense(got)
    valid = ei >= 0
    rows = torch.arange(len(d))[:, None].expand_as(ei)
    want = ((1 - torch.where(valid, ep.double(), torch.zeros(())).sum(1)) / (37 - valid.sum(1)))[:, None]
    want = want.expand(-1, 37).clone()
    want[rows[valid], ei[valid].long()] = ep[valid].double()
    assert (d - want).abs().max() < 1e-6
    none = ~valid.any(1)
    assert none.any() and torch.allclose(d[none], torch.full((int(none.sum()), 37), 1 / 37, dtype=torch.float64))
    assert got.k == max(int(valid.sum(1).max()), 1)
    cut = evidence_only(ei, ep, 37, top_k=2)
    assert cut.k == 2 and torch.allclose(cut.tail.double() + cut.logprobs.double().exp().nan_to_num(0).sum(1),
                                         torch.ones(len(d), dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="row 0"):
        evidence_only(torch.tensor([[1, 2]]), torch.tensor([[0.7, 0.3 + 2 * MASS_TOL]]), 37)
    assert evidence_only(torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.3]]), 2).tail.item() == 0.0


def test_revealed_mass_rounding_to_one_leaves_the_rest_possible():
    # a sharp teacher's top-3 that rounds to 1: the unrevealed tokens must keep some mass (else KL = inf)
    v = 10
    ei = torch.tensor([[0, 1, 2]])
    ep = torch.tensor([[0.9999995, 4e-7, 2e-7]], dtype=torch.float64)
    post = SparseDist(torch.tensor([[3, 4]], dtype=torch.int32), torch.tensor([[-1.0, -2.0]]), torch.tensor([0.2]), v)
    for out in (condition(post, ei, ep), evidence_only(ei, ep, v)):
        dense = out.to_dense(torch.float64)[0]
        assert (dense > 0).all() and float(dense[3:].sum()) == pytest.approx(UNREVEALED_MIN, rel=0.05)  # float32 out
        assert float(dense.sum()) == pytest.approx(1.0, abs=1e-6)
    # every token revealed: nothing to keep
    full = evidence_only(torch.arange(v)[None], torch.full((1, v), 0.1, dtype=torch.float64), v)
    assert float(full.tail[0]) == 0.0


def test_revealed_mass_just_below_one_is_scaled_to_leave_the_floor():
    """docs/MATH.md, Rounding: at A = 1 - 1e-7 > 1 - UNREVEALED_MIN the revealed values are multiplied by
    (1 - UNREVEALED_MIN) / A (about 1 - 9e-7, not kept exactly) and the unrevealed tokens share UNREVEALED_MIN in
    proportion to the posterior (the cap, .4, does not bind). float64 throughout, so the factor is visible."""
    v, a, f64 = 10, 1 - 1e-7, torch.float64
    ep = torch.tensor([[0.6, a - 0.6]], dtype=f64)
    post = SparseDist(torch.tensor([[0, 3, 4]], dtype=torch.int32), torch.tensor([[0.5, 0.3, 0.1]], dtype=f64).log(),
                      torch.tensor([0.1], dtype=f64), v)
    factor = (1 - UNREVEALED_MIN) / float(ep.sum())
    assert factor - 1 == pytest.approx(-9e-7, rel=1e-6)
    d = _dense(condition(post, torch.tensor([[0, 1]]), ep))[0]
    assert torch.allclose(d[:2], ep[0] * factor, rtol=1e-12, atol=0)
    r = _dense(post)[0, 2:]  # the posterior on the unrevealed tokens 2..9
    assert torch.allclose(d[2:], UNREVEALED_MIN * r / r.sum(), rtol=1e-9, atol=0)
    assert float(d[2:].sum()) == pytest.approx(UNREVEALED_MIN, rel=1e-9)
    base = evidence_only(torch.tensor([[0, 1]]), ep, v)  # the baselines round the same way (float32 out)
    assert float(base.tail[0]) == pytest.approx(UNREVEALED_MIN, rel=1e-6)
    # every token revealed: no floor (nobody to keep mass for); within MASS_TOL the values are renormalized to 1
    small = condition(_post([[0]], [[1.0]], [0.0], 2), torch.tensor([[0, 1]]), ep)
    assert torch.allclose(_dense(small)[0], ep[0] / float(ep.sum()), rtol=1e-6, atol=0)
