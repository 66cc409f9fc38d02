"""bayeskd.losses against an independent dense float64 computation of docs/MATH.md."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from bayeskd import losses as L
from bayeskd.core.combine import combine
from bayeskd.core.sparse import SparseDist

DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]
V = 1271  # odd, not a power of two


def rand_dist(n, v, k, tail=None, gen=None, full_rows=True, dtype=torch.float32):
    """Random SparseDist: distinct indices, some rows shorter than K (padding), random tails in (0, 1)."""
    g = gen or torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]).int()
    counts = torch.randint(1, k + 1, (n,), generator=g)
    if full_rows:
        counts[0] = k
    listed = torch.arange(k)[None] < counts[:, None]
    idx = idx.masked_fill(~listed, -1)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.05 if tail is None else \
        torch.full((n,), float(tail), dtype=torch.float64)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    p = torch.softmax(logits.masked_fill(~listed, -math.inf), 1) * (1 - t[:, None])
    return SparseDist(idx, p.log().to(dtype), t.to(dtype), v)


def dense_posterior(prior, proxy, mode="log_linear", a=1.0, b=1.0, c=1.0, w=0.5, y=None, e=0.0):
    """Dense [N, V] posterior and the [N, V] support mask U, straight from the formulas over all V."""
    p0 = prior.to_dense(torch.float64)
    n = p0.shape[0]
    U = torch.zeros_like(p0, dtype=torch.bool)
    rows = torch.arange(n)[:, None].expand_as(prior.indices)
    U[rows[prior.indices >= 0], prior.indices[prior.indices >= 0].long()] = True
    if proxy is None:
        p = p0
    else:
        if isinstance(proxy, torch.Tensor):
            q = torch.softmax(proxy.double(), 1)
        else:
            q = proxy.to_dense(torch.float64)
            r2 = torch.arange(n)[:, None].expand_as(proxy.indices)
            U[r2[proxy.indices >= 0], proxy.indices[proxy.indices >= 0].long()] = True
        if mode == "log_linear":
            p = p0 ** a * q ** b
            p = p / p.sum(1, keepdim=True)
        elif mode == "mixture":
            p = w * p0 + (1 - w) * q
        else:  # dirichlet
            cnt = prior.extras["context_count"].double()[:, None]
            p = (c * q + cnt * p0) / (c + cnt)
    if y is not None:
        U[torch.arange(n), y] = True
        p = (p + e * F.one_hot(y, p.shape[1]).double()) / (1 + e)
    return p, U


def dense_loss(z, p, U, div, beta=None, T=1.0, tail="bucket"):
    """Divergence over the categories (U plus the bucket), computed densely in float64."""
    if beta is None:
        beta = 0.1 if div == "skew_kl" else 0.5
    if div == "jsd" and beta in (0.0, 1.0):
        div = "forward_kl" if beta == 0 else "reverse_kl"
    R = (~U).sum(1, keepdim=True)
    tau = (p * ~U).sum(1, keepdim=True) / R.clamp(min=1)
    pt = torch.where(U, p, tau) ** (1 / T)
    pt = pt / pt.sum(1, keepdim=True)
    s = torch.softmax(z.double() / T, 1)
    if tail == "bucket":
        P = torch.cat([pt * U, (pt * ~U).sum(1, keepdim=True)], 1)
        S = torch.cat([s * U, (s * ~U).sum(1, keepdim=True)], 1)
    else:
        P = pt * U / (pt * U).sum(1, keepdim=True)
        S = s * U / (s * U).sum(1, keepdim=True)
    kl = lambda x, y: (torch.xlogy(x, x) - torch.xlogy(x, y)).sum(1)  # noqa: E731
    if div == "forward_kl":
        return kl(P, S)
    if div == "reverse_kl":
        return kl(S, P.clamp(min=L.TARGET_FLOOR))
    if div == "jsd":
        m = (1 - beta) * S + beta * P
        return beta * kl(P, m) + (1 - beta) * kl(S, m)
    if div == "skew_kl":
        return kl(P, beta * P + (1 - beta) * S)
    return 0.5 * (P - S).abs().sum(1)


def make_case(mode, k, n=6, v=V, seed=0, teacher=True, evidence=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    prior = rand_dist(n, v, k, gen=g, dtype=dtype)
    prior.extras["context_count"] = torch.randint(0, 20, (n,), generator=g).float()
    online = mode.startswith("online_")
    if mode == "none":
        proxy = None
    elif online:
        proxy = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    else:
        proxy = rand_dist(n, v, k, gen=g, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=g) if teacher else None
    if teacher:
        y[1] = prior.indices[1, 0]  # one teacher token already listed
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    return prior, proxy, mode.replace("online_", ""), y, evidence, z


MODES = ["none", "log_linear", "mixture", "dirichlet", "online_log_linear", "online_mixture"]


# ---------------------------------------------------------------------------------------------------------
# reference against the dense computation

@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_dense(mode, k):
    T = {1: 0.7, 8: 1.0, 64: 1.6}[k]
    ab = dict(a=0.8, b=1.3) if k == 64 else {}
    prior, proxy, m, y, e, z = make_case(mode, k, teacher=k != 1, evidence=0.5 if k == 64 else 0.0, seed=k)
    kw = dict(mode=m if m != "none" else "log_linear", c=2.0, w=0.3, teacher_tokens=y, evidence=e, **ab)
    target = combine(prior, proxy, **kw)
    p, U = dense_posterior(prior, proxy, kw["mode"] if proxy is not None else "none", ab.get("a", 1.0),
                           ab.get("b", 1.0), 2.0, 0.3, y, e)
    # the combined target lists exactly U, with p on it and the rest as the tail
    dense_t = torch.zeros_like(p)
    rows = torch.arange(p.shape[0])[:, None].expand_as(target.indices)
    lst = target.indices >= 0
    dense_t[rows[lst], target.indices[lst].long()] = target.logprobs[lst].exp()
    assert torch.equal(dense_t > 0, U & (p > 0)) and torch.equal(lst.sum(1), U.sum(1))
    torch.testing.assert_close(dense_t, p * U, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(target.tail, (p * ~U).sum(1), rtol=1e-9, atol=1e-12)
    for div in DIVS:
        for tail in ("bucket", "ignore"):
            got = L.sparse_kd_loss(z, target, div, temperature=T, tail=tail)
            want = dense_loss(z, p, U, div, T=T, tail=tail)
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10, msg=f"{div} {tail}")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_beta(beta):
    prior, proxy, m, y, e, z = make_case("log_linear", 8, seed=3)
    target = combine(prior, proxy)
    p, U = dense_posterior(prior, proxy)
    got = L.sparse_kd_loss(z, target, "jsd", beta=beta, temperature=1.3)
    torch.testing.assert_close(got, dense_loss(z, p, U, "jsd", beta, T=1.3), rtol=1e-8, atol=1e-10)
    if beta in (0.0, 1.0):
        same = "forward_kl" if beta == 0 else "reverse_kl"
        torch.testing.assert_close(got, L.sparse_kd_loss(z, target, same, temperature=1.3), rtol=0, atol=0)
    sk = L.sparse_kd_loss(z, target, "skew_kl", beta=0.3)
    torch.testing.assert_close(sk, dense_loss(z, p, U, "skew_kl", 0.3), rtol=1e-8, atol=1e-10)


def test_identical_distributions_give_zero():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(5, V, generator=g, dtype=torch.float64) * 2
    lp = torch.log_softmax(z, 1)
    top = lp.topk(16, dim=1)
    target = SparseDist(top.indices.int(), top.values, 1 - top.values.exp().sum(1), V)
    for div in DIVS:
        for tail in ("bucket", "ignore"):
            loss = L.sparse_kd_loss(z, target, div, tail=tail)
            torch.testing.assert_close(loss, torch.zeros_like(loss), rtol=0, atol=1e-12)


def disjoint_from(prior, proxy):
    """proxy with its listed indices moved off the prior's support."""
    idx = proxy.indices.clone()
    for r in range(idx.shape[0]):
        free = [i for i in range(V) if i not in set(prior.indices[r].tolist())][: idx.shape[1]]
        idx[r] = torch.where(idx[r] >= 0, torch.tensor(free, dtype=torch.int32), idx[r])
    return SparseDist(idx, proxy.logprobs, proxy.tail, proxy.vocab_size)


def test_tails_zero_near_one_and_disjoint_supports():
    g = torch.Generator().manual_seed(7)
    for t0, tq in [(0.0, 0.3), (0.3, 0.0), (1 - 1e-6, 0.5), (0.0, 1 - 1e-7)]:
        prior = rand_dist(4, V, 8, tail=t0, gen=g, dtype=torch.float64)
        proxy = disjoint_from(prior, rand_dist(4, V, 8, tail=tq, gen=g, dtype=torch.float64))
        z = torch.randn(4, V, generator=g, dtype=torch.float64)
        for mode in ("log_linear", "mixture"):
            if mode == "log_linear" and t0 == 0 and tq == 0:
                continue
            target = combine(prior, proxy, mode=mode)
            p, U = dense_posterior(prior, proxy, mode)
            assert torch.equal((target.indices >= 0).sum(1), U.sum(1))  # zero-mass union entries stay listed
            for div in DIVS:
                torch.testing.assert_close(L.sparse_kd_loss(z, target, div, temperature=0.8),
                                           dense_loss(z, p, U, div, T=0.8), rtol=1e-7, atol=1e-10)
    # zero tails and disjoint supports: the log-linear posterior has no mass -> clear error
    prior = rand_dist(2, V, 4, tail=0.0, gen=g, dtype=torch.float64)
    proxy = disjoint_from(prior, rand_dist(2, V, 4, tail=0.0, gen=g, dtype=torch.float64))
    with pytest.raises(ValueError, match="no mass"):
        combine(prior, proxy)


def test_full_support_no_bucket():
    # K = V: R = 0, tau = 0, no bucket category
    g = torch.Generator().manual_seed(8)
    v = 9
    prior = rand_dist(3, v, v, tail=0.0, gen=g, dtype=torch.float64)
    prior.indices[:] = torch.stack([torch.randperm(v, generator=g) for _ in range(3)]).int()
    prior.logprobs[:] = torch.log_softmax(torch.randn(3, v, generator=g, dtype=torch.float64), 1)
    proxy = rand_dist(3, v, 3, gen=g, dtype=torch.float64)
    z = torch.randn(3, v, generator=g, dtype=torch.float64, requires_grad=True)
    target = combine(prior, proxy)
    p, U = dense_posterior(prior, proxy)
    for div in DIVS:
        loss = L.sparse_kd_loss(z, target, div, temperature=0.5)
        torch.testing.assert_close(loss, dense_loss(z, p, U, div, T=0.5), rtol=1e-8, atol=1e-10)
        loss.sum().backward()
        assert torch.isfinite(z.grad).all()


def test_masked_rows_exact_zero():
    prior, proxy, m, y, e, z = make_case("log_linear", 8, seed=9)
    target = combine(prior, proxy)
    z.requires_grad_(True)
    mask = torch.tensor([True, False, True, False, False, True])
    for div in DIVS:
        z.grad = None
        loss = L.sparse_kd_loss(z, target, div, mask=mask)
        assert (loss[~mask] == 0).all() and (loss[mask] > 0).all()
        loss.sum().backward()
        assert (z.grad[~mask] == 0).all()
    all_masked = L.sparse_kd_loss(z, target, mask=torch.zeros(6, dtype=torch.bool))
    assert torch.equal(all_masked, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("div", DIVS)
def test_gradcheck_reference(div):
    g = torch.Generator().manual_seed(11)
    v = 13
    prior = rand_dist(3, v, 3, gen=g, dtype=torch.float64)
    proxy = rand_dist(3, v, 4, gen=g, dtype=torch.float64)
    target = combine(prior, proxy, teacher_tokens=torch.tensor([0, 5, 12]), evidence=0.3)
    mask = torch.tensor([True, True, False])
    z = torch.randn(3, v, generator=g, dtype=torch.float64, requires_grad=True)
    for tail in ("bucket", "ignore"):
        assert torch.autograd.gradcheck(
            lambda x: L.sparse_kd_loss(x, target, div, beta=0.3, temperature=1.7, mask=mask, tail=tail), (z,))


def test_top_k_truncation():
    prior, proxy, m, y, e, z = make_case("log_linear", 8, seed=12)
    full = combine(prior, proxy)
    top = combine(prior, proxy, top_k=5)
    assert top.k == 5
    lp_sorted = full.logprobs.sort(1, descending=True).values
    torch.testing.assert_close(top.logprobs, lp_sorted[:, :5])
    torch.testing.assert_close(top.tail, full.tail + lp_sorted[:, 5:].exp().sum(1))
    torch.testing.assert_close(top.logprobs.exp().sum(1) + top.tail, torch.ones(6, dtype=torch.float64))
    wide = combine(prior, proxy, top_k=40)  # more than the union: padded
    assert wide.k == 40 and (wide.indices[:, full.k:] == -1).all()
    assert torch.isneginf(wide.logprobs[:, full.k:]).all()
    with pytest.raises(ValueError, match="top_k"):
        combine(prior, proxy, top_k=V + 1)


def test_combine_validation():
    prior, proxy, m, y, e, z = make_case("log_linear", 8, seed=13)
    bad = SparseDist(proxy.indices, proxy.logprobs.clone(), proxy.tail, V)
    bad.logprobs[0, 0] = float("nan")
    with pytest.raises(ValueError, match="proxy"):
        combine(prior, bad)
    badp = SparseDist(prior.indices, prior.logprobs, prior.tail.clone(), V)
    badp.tail[1] = float("inf")
    with pytest.raises(ValueError, match="prior"):
        combine(badp, proxy)
    other = rand_dist(6, V + 2, 8)
    with pytest.raises(ValueError, match=f"V={V + 2}.*V={V}"):
        combine(prior, other)
    with pytest.raises(ValueError, match=f"V={V - 1}.*V={V}"):
        combine(prior, torch.randn(6, V - 1))
    logits = torch.randn(6, V)
    logits[2, 3] = float("inf")
    with pytest.raises(ValueError, match="proxy logits"):
        combine(prior, logits)
    no_counts = SparseDist(prior.indices, prior.logprobs, prior.tail, V)
    with pytest.raises(ValueError, match="context_count"):
        combine(no_counts, proxy, mode="dirichlet")
    with pytest.raises(ValueError, match="teacher_tokens"):
        combine(prior, proxy, evidence=1.0)
    assert combine(prior, None).k == 8  # proxy None: the prior itself
    torch.testing.assert_close(combine(prior, None).tail, prior.tail)


def test_loss_validation():
    prior, proxy, m, y, e, z = make_case("log_linear", 8, seed=14)
    target = combine(prior, proxy)
    for bad in (float("nan"), float("inf"), float("-inf")):
        zz = z.clone()
        zz[3, 7] = bad
        with pytest.raises(ValueError, match="student_logits"):
            L.sparse_kd_loss(zz, target)
    with pytest.raises(ValueError, match=f"V={V + 1}.*V={V}"):
        L.sparse_kd_loss(torch.randn(6, V + 1), target)
    with pytest.raises(ValueError, match="divergence"):
        L.sparse_kd_loss(z, target, "kl")


# ---------------------------------------------------------------------------------------------------------
# the CPU fast path and the dispatcher against the reference

def ref_and_grad(z, prior, proxy, kw, div, T, tail, mask, weights, beta=None):
    zr = z.detach().double().requires_grad_(True)
    target = combine(prior, proxy, **kw)
    loss = L.sparse_kd_loss(zr, target, div, beta=beta, temperature=T, mask=mask, tail=tail)
    (loss * weights).sum().backward()
    return loss.detach(), zr.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("div", DIVS)
def test_fast_path_matches_reference(mode, div):
    k = 64 if div in ("jsd", "tvd") else 8
    prior, proxy, m, y, e, z = make_case(mode, k, n=7, teacher=True, evidence=0.5 if mode != "none" else 0.0,
                                         seed=zlib.crc32(f"{mode}/{div}".encode()) % 1000, dtype=torch.float32)
    kw = dict(mode=m if m != "none" else "log_linear", c=2.0, w=0.3, teacher_tokens=y, evidence=e)
    mask = torch.tensor([True, False, True, True, False, True, True])
    weights = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.5
    for tail in ("bucket", "ignore"):
        for T in (1.0, 0.6):
            want, want_grad = ref_and_grad(z, prior, proxy, kw, div, T, tail, mask, weights)
            for inplace in (False, True):
                zz = z.clone().requires_grad_(not inplace)
                leaf = zz if not inplace else z.clone().requires_grad_(True)
                inp = leaf if not inplace else leaf * 1.0  # in place needs a non-leaf buffer to overwrite
                got = L.fused_posterior_kd_torch(inp, prior, proxy, divergence=div, temperature=T, tail=tail,
                                                 mask=mask, inplace=inplace, chunk_rows=2, **kw)
                (got * weights.float()).sum().backward()
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-6)
                # fp32 against a float64 reference: an entry's error scales with the row's largest gradient
                # (cancellation in reverse-KL terms), so the absolute tolerance does too
                torch.testing.assert_close(leaf.grad.double(), want_grad, rtol=1e-3,
                                           atol=2e-6 + 1e-5 * float(want_grad.abs().max()))
                assert (leaf.grad[~mask] == 0).all() and (got[~mask] == 0).all()


def test_fast_path_fp16_and_grad_output_ones():
    prior, proxy, m, y, e, z = make_case("log_linear", 8, n=5, seed=21, dtype=torch.float32)
    z16 = z.half()
    want, want_grad = ref_and_grad(z16.float(), prior, proxy, {}, "forward_kl", 1.0, "bucket", None,
                                   torch.ones(5, dtype=torch.float64))
    for inplace in (False, True):
        leaf = z16.clone().requires_grad_(True)
        inp = leaf * 1 if inplace else leaf
        got = L.fused_posterior_kd_torch(inp, prior, proxy, inplace=inplace)
        got.sum().backward()
        assert got.dtype == torch.float32 and leaf.grad.dtype == torch.float16
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(leaf.grad.double(), want_grad, rtol=1e-2, atol=1e-5)
        if inplace:  # the logits buffer became the gradient
            torch.testing.assert_close(inp.detach().double(), want_grad, rtol=1e-2, atol=1e-5)
    # a mean also scales per row
    leaf = z.clone().requires_grad_(True)
    L.fused_posterior_kd_torch(leaf, prior, proxy).mean().backward()
    torch.testing.assert_close(leaf.grad.double(), want_grad / 5, rtol=1e-2, atol=1e-6)


def test_fast_path_identical_and_all_masked():
    z = torch.randn(4, V, generator=torch.Generator().manual_seed(3)) * 3
    lp = torch.log_softmax(z, 1)
    top = lp.topk(8, dim=1)
    prior = SparseDist(top.indices.int(), top.values, 1 - top.values.exp().sum(1), V)
    for div in DIVS:
        leaf = z.clone().requires_grad_(True)
        loss = L.fused_posterior_kd_torch(leaf, prior, None, divergence=div)
        torch.testing.assert_close(loss, torch.zeros(4), rtol=0, atol=1e-5)
    leaf = z.clone().requires_grad_(True)
    loss = L.fused_posterior_kd_torch(leaf, prior, None, mask=torch.zeros(4, dtype=torch.bool))
    loss.sum().backward()
    assert (loss == 0).all() and (leaf.grad == 0).all()


def test_fast_path_rejects_bad_input():
    prior, proxy, m, y, e, z = make_case("log_linear", 8, seed=22, dtype=torch.float32)
    for bad in (float("nan"), float("-inf")):
        zz = z.clone()
        zz[4, 100] = bad
        with pytest.raises(ValueError, match="student_logits"):
            L.fused_posterior_kd_torch(zz, prior, proxy)
        with pytest.raises(ValueError, match="student_logits"):
            L.fused_posterior_kd(zz, prior, proxy)
    with pytest.raises(ValueError, match=f"V={V + 3}.*V={V}"):
        L.fused_posterior_kd(torch.randn(6, V + 3), prior, proxy)
    with pytest.raises(ValueError, match="proxy logits.*V="):
        L.fused_posterior_kd(z, prior, torch.randn(6, 17))
    y = torch.full((6,), -100)
    with pytest.raises(ValueError, match="teacher token -100"):
        L.fused_posterior_kd(z, prior, proxy, teacher_tokens=y)
    # masked rows may carry -100
    L.fused_posterior_kd(z, prior, proxy, teacher_tokens=y, mask=torch.zeros(6, dtype=torch.bool))
    leaf = z.clone().requires_grad_(True)
    loss = L.fused_posterior_kd_torch(leaf * 1, prior, proxy, inplace=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_dispatcher_backend_choice(monkeypatch):
    prior, proxy, m, y, e, z = make_case("log_linear", 8, seed=23, dtype=torch.float32)
    want = L.fused_posterior_kd_torch(z, prior, proxy)
    monkeypatch.delenv("BAYESKD_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert L.pick_backend("auto", z.device) == "torch"
    torch.testing.assert_close(L.fused_posterior_kd(z, prior, proxy), want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        L.fused_posterior_kd(z, prior, proxy, backend="triton")
    monkeypatch.setenv("BAYESKD_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):  # the override reaches the Triton path
        L.fused_posterior_kd(z, prior, proxy)
    assert L.pick_backend("torch", z.device) == "torch"  # an explicit backend wins over the variable
    monkeypatch.setenv("BAYESKD_BACKEND", "torch")
    assert L.pick_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv("BAYESKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="BAYESKD_BACKEND"):
        L.fused_posterior_kd(z, prior, proxy)
    monkeypatch.delenv("BAYESKD_BACKEND")
    assert L.pick_backend("auto", torch.device("cuda")) == "triton"


def test_fast_path_default_chunks_online_k1():
    # no mask, default chunking (the in-place contiguous branch), K = 1, online proxy
    prior, proxy, m, y, e, z = make_case("online_log_linear", 1, n=5, seed=24, dtype=torch.float32)
    kw = dict(teacher_tokens=y, evidence=0.2)
    want, want_grad = ref_and_grad(z, prior, proxy, kw, "reverse_kl", 1.4, "bucket", None,
                                   torch.ones(5, dtype=torch.float64))
    leaf = z.clone().requires_grad_(True)
    inp = leaf * 1
    got = L.fused_posterior_kd(inp, prior, proxy, divergence="reverse_kl", temperature=1.4, inplace=True, **kw)
    got.sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(leaf.grad.double(), want_grad, rtol=1e-3, atol=2e-6)
    empty = SparseDist(torch.full((5, 2), -1, dtype=torch.int32), torch.full((5, 2), -math.inf), torch.ones(5), V)
    with pytest.raises(ValueError, match="ignore"):
        L.fused_posterior_kd(z, empty, None, tail="ignore")
