"""The Triton kernels (run by the Triton interpreter on CPU) against an independent float64 dense computation.

The reference below builds every distribution densely over V (SparseDist.to_dense), combines them with the
formulas of docs/MATH.md, measures the divergence over the categories (U plus the tail bucket) and takes the
gradient with torch autograd in float64. It shares no code with the kernels or with bayeskd.losses.
"""
import importlib
import os
import sys
import zlib

# BAYESKD_KERNELS_COMPILED=1 keeps the compiled kernels (a GPU run); everywhere else the kernels run in the
# interpreter (CPU)
INTERPRET = os.environ.get("BAYESKD_KERNELS_COMPILED") != "1"
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decoration of the kernels

import pytest  # noqa: E402
import torch  # noqa: E402

if INTERPRET and "bayeskd.kernels.sparse_kd" in sys.modules:  # imported earlier without the interpreter
    importlib.reload(sys.modules["bayeskd.kernels.sparse_kd"])
    if "bayeskd.kernels.fused_linear_sparse_kd" in sys.modules:
        importlib.reload(sys.modules["bayeskd.kernels.fused_linear_sparse_kd"])

from bayeskd.kernels.sparse_kd import sparse_kd_forward, triton_fused_posterior_kd  # noqa: E402
from bayeskd.core.sparse import SparseDist  # noqa: E402

# numpy warns about -inf arithmetic the kernels do on purpose (absent entries); results are checked finite
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

V_ODD = 1271
BLOCK = 256  # small block so the interpreter walks several blocks per row


# ---------------------------------------------------------------------------------------------------------------
# inputs
def make_sparse(n, v, k, gen, tail=None, exclude=None, pad=True) -> SparseDist:
    """Random top-K rows: distinct indices (avoiding `exclude` [N, *] if given), some rows padded."""
    idx = torch.full((n, k), -1, dtype=torch.int32)
    lp = torch.full((n, k), float("-inf"))
    tails = torch.empty(n)
    for r in range(n):
        allowed = torch.ones(v, dtype=torch.bool)
        if exclude is not None:
            ex = exclude[r][exclude[r] >= 0].long()
            allowed[ex] = False
        pool = allowed.nonzero().flatten()
        kr = k if not pad or r % 3 else max(1, k // 2)
        chosen = pool[torch.randperm(len(pool), generator=gen)[:kr]]
        t = float(torch.rand((), generator=gen) * 0.8 + 0.1) if tail is None else tail
        probs = torch.softmax(torch.randn(kr, generator=gen, dtype=torch.float64) * 2, 0) * (1 - t)
        slots = torch.randperm(k, generator=gen)[:kr]  # padding anywhere in the row, not only at the end
        idx[r, slots] = chosen.to(torch.int32)
        lp[r, slots] = probs.log().float()
        tails[r] = t
    return SparseDist(idx, lp, tails, v)


def logits(n, v, gen, scale=3.0, dtype=torch.float32):
    return (torch.randn(n, v, generator=gen) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# the float64 dense reference
def reference(z, prior, proxy=None, proxy_logits=None, *, mode="log_linear", a=1.0, b=1.0, w_rows=None,
              teacher_tokens=None, evidence=0.0, divergence="forward_kl", beta=0.5, temperature=1.0, mask=None, tail="bucket",
              grad_output=None):
    n, v = z.shape
    z64 = z.double().detach().requires_grad_()
    rows = torch.arange(n)[:, None]
    in_u = torch.zeros(n, v, dtype=torch.bool)
    in_u[rows.expand_as(prior.indices)[prior.indices >= 0], prior.indices[prior.indices >= 0].long()] = True
    p0 = prior.to_dense(torch.float64)
    q = None
    if proxy is not None:
        q = proxy.to_dense(torch.float64)
        in_u[rows.expand_as(proxy.indices)[proxy.indices >= 0], proxy.indices[proxy.indices >= 0].long()] = True
    elif proxy_logits is not None:
        q = torch.softmax(proxy_logits.double(), 1)
    y = teacher_tokens
    if y is not None:
        in_u[torch.arange(n), y.long()] = True
    if mode == "none":
        p = p0
    elif mode == "log_linear":
        p = p0.pow(a) * q.pow(b)
        p = p / p.sum(1, keepdim=True)
    else:
        w64 = w_rows.double()[:, None]
        p = w64 * p0 + (1 - w64) * q
    if evidence:
        p = (p + evidence * torch.nn.functional.one_hot(y.long(), v).double()) / (1 + evidence)
    r = (~in_u).sum(1).double()
    p_u = torch.where(in_u, p, 0.0)
    p_b = torch.where(in_u, 0.0, p).sum(1)
    if temperature != 1.0:
        p_u = p_u.pow(1 / temperature)
        p_b = torch.where(r > 0, r * (p_b / r.clamp(min=1)).pow(1 / temperature), 0.0)
        zt = p_u.sum(1) + p_b
        p_u, p_b = p_u / zt[:, None], p_b / zt
    s = torch.softmax(z64 / temperature, 1)
    s_u = torch.where(in_u, s, 0.0)
    s_b = torch.where(in_u, 0.0, s).sum(1)
    if tail == "ignore":
        P, S, valid = p_u / p_u.sum(1, keepdim=True), s_u / s_u.sum(1, keepdim=True), in_u
    else:
        P, S = torch.cat([p_u, p_b[:, None]], 1), torch.cat([s_u, s_b[:, None]], 1)
        valid = torch.cat([in_u, (r > 0)[:, None]], 1)
    P, S = torch.where(valid, P, 0.0), torch.where(valid, S, 1.0)  # S = 1 off-category keeps logs finite

    def xlogy(x, yy):  # x log(x / yy) with 0 log 0 = 0, safe for autograd
        pos = valid & (x > 0)
        return torch.where(pos, x * (torch.where(pos, x, 1.0).log() - torch.where(pos, yy, 1.0).log()), 0.0)

    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        terms = xlogy(P, S)
    elif divergence == "reverse_kl":
        terms = torch.where(valid, S * (S.log() - P.clamp(min=1e-12).log()), 0.0)
    elif divergence == "jsd":
        m = (1 - beta) * S + beta * P
        terms = beta * xlogy(P, m) + (1 - beta) * xlogy(S, m)
    elif divergence == "skew_kl":
        terms = xlogy(P, beta * P + (1 - beta) * S)
    else:
        terms = torch.where(valid, 0.5 * (P - S).abs(), 0.0)
    loss = terms.sum(1)
    if mask is not None:
        loss = torch.where(mask, loss, 0.0)
    go = torch.ones(n, dtype=torch.float64) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad((loss * go).sum(), z64)
    return loss.detach(), grad


def rel_err(x, ref):
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def run_kernel(z, prior, proxy=None, proxy_logits=None, grad_output=None, inplace=False, **kw):
    """Loss and gradient through the autograd Function, like a user would."""
    x = z.clone().requires_grad_()
    pargs = (proxy.indices, proxy.logprobs, proxy.tail) if proxy is not None else (None, None, None)
    loss = triton_fused_posterior_kd(x, prior.indices, prior.logprobs, prior.tail, *pargs, proxy_logits,
                                     inplace=inplace, _block_v=BLOCK, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, x, go)
    if inplace:
        assert grad.data_ptr() == x.data_ptr()  # the gradient lives in the logits' storage
    return loss.detach(), grad


def check(z, prior, proxy=None, proxy_logits=None, *, tol=2e-5, grad_tol=None, inplace=False, **kw):
    ref_loss, ref_grad = reference(z, prior, proxy, proxy_logits, **kw)
    loss, grad = run_kernel(z, prior, proxy, proxy_logits, inplace=inplace, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    err = float((loss.double() - ref_loss).abs().max())
    assert err <= tol * max(1.0, float(ref_loss.abs().max())), (err, loss, ref_loss)
    assert rel_err(grad, ref_grad) <= (grad_tol or 10 * tol), rel_err(grad, ref_grad)
    return loss, grad, ref_loss, ref_grad


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def targets(mode, n, v, k, gen, **sparse_kw):
    """(prior, proxy, proxy_logits, extra kwargs) for a combination mode; 'online' = dense proxy logits."""
    prior = make_sparse(n, v, k, gen, **sparse_kw)
    kw = {"mode": "log_linear" if mode == "online" else mode}
    if mode == "mixture":
        kw["w_rows"] = torch.rand(n, generator=gen) * 0.8 + 0.1
    if mode == "none":
        return prior, None, None, kw
    if mode == "online":
        return prior, None, logits(n, v, gen, scale=2.0), kw
    return prior, make_sparse(n, v, k, gen, **sparse_kw), None, kw


DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("skew_kl", 0.1), ("tvd", 0.5)]


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "log_linear", "mixture", "online"])
@pytest.mark.parametrize("divergence,beta", DIVS)
def test_every_mode_and_divergence(mode, divergence, beta):
    gen = seeded(zlib.crc32(f"{mode}/{divergence}".encode()))  # hash() of a string changes per process
    n, v = 6, V_ODD
    prior, proxy, ql, kw = targets(mode, n, v, 8, gen)
    check(logits(n, v, gen), prior, proxy, ql, divergence=divergence, beta=beta, temperature=1.5, **kw)


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("mode", ["log_linear", "mixture", "online"])
def test_k_sizes_with_temperature(k, mode):
    gen = seeded(100 + k)
    n, v = 6, V_ODD
    prior, proxy, ql, kw = targets(mode, n, v, k, gen)
    check(logits(n, v, gen), prior, proxy, ql, divergence="jsd", beta=0.3, temperature=0.7, **kw)


def test_mixture_online_and_weights_ab():
    gen = seeded(7)
    n, v = 6, 257
    prior, _, ql, _ = targets("online", n, v, 8, gen)
    w = torch.rand(n, generator=gen)
    check(logits(n, v, gen), prior, None, ql, mode="mixture", w_rows=w, temperature=2.0)
    check(logits(n, v, gen), prior, None, ql, mode="log_linear", a=0.5, b=1.7, temperature=2.0)
    prior, proxy, _, _ = targets("log_linear", n, v, 8, gen)
    check(logits(n, v, gen), prior, proxy, mode="log_linear", a=1.3, b=0.6, divergence="reverse_kl")
    check(logits(n, v, gen), prior, proxy, mode="log_linear", a=0.0, b=1.0)  # p0^0 = 1: the proxy alone


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_beta_limits(beta):
    gen = seeded(11)
    n, v = 6, 257
    prior, proxy, _, kw = targets("log_linear", n, v, 8, gen)
    z = logits(n, v, gen)
    loss, grad, _, _ = check(z, prior, proxy, divergence="jsd", beta=beta, temperature=1.3, **kw)
    if beta in (0.0, 1.0):  # TRL/Liger convention: exactly forward / reverse KL
        same = "forward_kl" if beta == 0.0 else "reverse_kl"
        loss2, grad2 = run_kernel(z, prior, proxy, divergence=same, temperature=1.3, **kw)
        assert torch.equal(loss, loss2) and torch.equal(grad, grad2)


def test_fp16_inputs():
    gen = seeded(12)
    n, v = 6, V_ODD
    prior, proxy, _, kw = targets("log_linear", n, v, 8, gen)
    z = logits(n, v, gen, dtype=torch.float16)
    prior.logprobs = prior.logprobs.to(torch.bfloat16).float()  # bf16-representable target values
    # reference from the same fp16 logits; the gradient is stored in fp16, hence the looser gradient bound
    loss, grad, _, _ = check(z, prior, proxy, grad_tol=2e-3, divergence="forward_kl", temperature=2.0, **kw)
    assert grad.dtype == torch.float16
    check(z, prior, None, logits(n, v, gen, dtype=torch.float16), grad_tol=2e-3, mode="log_linear")


def test_bf16_target_logprobs():
    gen = seeded(13)
    n, v = 6, 257
    prior, proxy, _, kw = targets("log_linear", n, v, 8, gen)
    prior.logprobs = prior.logprobs.to(torch.bfloat16)
    proxy.logprobs = proxy.logprobs.to(torch.bfloat16)
    ref_prior = SparseDist(prior.indices, prior.logprobs.float(), prior.tail, v)
    ref_proxy = SparseDist(proxy.indices, proxy.logprobs.float(), proxy.tail, v)
    z = logits(n, v, gen)
    ref_loss, ref_grad = reference(z, ref_prior, ref_proxy, **kw)
    loss, grad = run_kernel(z, prior, proxy, **kw)
    assert float((loss.double() - ref_loss).abs().max()) < 1e-4 and rel_err(grad, ref_grad) < 1e-4


@pytest.mark.parametrize("divergence,beta", DIVS)
def test_identical_distributions_give_zero(divergence, beta):
    gen = seeded(14)
    n, v = 6, 257
    prior = make_sparse(n, v, 8, gen)
    # student logits whose softmax is exactly the prior, tail spread uniformly
    z = prior.to_dense(torch.float64).log().float()
    loss, grad = run_kernel(z, prior, None, mode="none", divergence=divergence, beta=beta)
    assert float(loss.abs().max()) < 1e-5
    if divergence != "tvd":  # |p - s| has no gradient at p = s (sign of a rounding error)
        assert float(grad.abs().max()) < 1e-5


def test_masked_rows_zero_loss_and_grad():
    gen = seeded(15)
    n, v = 6, V_ODD
    prior, proxy, _, kw = targets("log_linear", n, v, 8, gen)
    z = logits(n, v, gen)
    mask = torch.tensor([True, False, True, False, False, True])
    loss, grad, _, _ = check(z, prior, proxy, mask=mask, divergence="reverse_kl", **kw)
    assert torch.all(loss[~mask] == 0) and torch.all(grad[~mask] == 0) and torch.all(loss[mask] > 0)
    none = torch.zeros(n, dtype=torch.bool)
    loss, grad = run_kernel(z, prior, proxy, mask=none, **kw)
    assert torch.all(loss == 0) and torch.all(grad == 0)
    # a masked row may carry garbage targets (all padding, zero tail): still exactly zero
    prior.indices[1] = -1
    prior.logprobs[1] = float("-inf")
    prior.tail[1] = 0.0
    loss, grad = run_kernel(z, prior, proxy, mask=mask, **kw)
    assert loss[1] == 0 and torch.all(grad[1] == 0)


@pytest.mark.parametrize("tails", [(0.0, 0.999), (0.999999, 0.0), (0.0, 0.0)])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_extreme_tails(tails, divergence, beta):
    gen = seeded(16)
    n, v = 6, V_ODD
    prior = make_sparse(n, v, 8, gen, tail=tails[0])
    proxy = make_sparse(n, v, 8, gen, tail=tails[1])
    z = logits(n, v, gen)
    for mode in ("log_linear", "mixture"):
        if mode == "log_linear" and tails == (0.0, 0.0):
            continue  # every token outside S0 ∩ Sq has zero posterior: fine, but also covered by mixture
        w = torch.full((n,), 0.3)
        check(z, prior, proxy, mode=mode, w_rows=w, divergence=divergence, beta=beta, temperature=1.5, tol=5e-5)


def test_disjoint_supports():
    gen = seeded(17)
    n, v = 6, V_ODD
    prior = make_sparse(n, v, 64, gen)
    proxy = make_sparse(n, v, 64, gen, exclude=prior.indices)
    z = logits(n, v, gen)
    check(z, prior, proxy, mode="log_linear", temperature=0.8)
    check(z, prior, proxy, mode="mixture", w_rows=torch.full((n,), 0.5), divergence="tvd")


def test_full_support_no_bucket():
    gen = seeded(18)
    n, v = 4, 257
    prior = make_sparse(n, v, v, gen, tail=0.0, pad=False)  # K = V: U is everything, the bucket is empty
    check(logits(n, v, gen), prior, None, mode="none", temperature=1.7)
    check(logits(n, v, gen), prior, None, mode="none", divergence="reverse_kl")


@pytest.mark.parametrize("mode", ["none", "log_linear", "mixture", "online"])
def test_teacher_tokens_and_evidence(mode):
    gen = seeded(19)
    n, v = 6, V_ODD
    prior, proxy, ql, kw = targets(mode, n, v, 8, gen)
    y = torch.randint(0, v, (n,), generator=gen)
    y[0] = prior.indices[0][prior.indices[0] >= 0][0]  # teacher token already in the prior
    if proxy is not None:
        y[1] = proxy.indices[1][proxy.indices[1] >= 0][0]  # ... in the proxy only (or both)
    z = logits(n, v, gen)
    check(z, prior, proxy, ql, teacher_tokens=y, evidence=0.0, temperature=1.2, **kw)
    check(z, prior, proxy, ql, teacher_tokens=y, evidence=0.7, divergence="skew_kl", beta=0.1, **kw)
    check(z, prior, proxy, ql, teacher_tokens=y.to(torch.int32), evidence=2.0, temperature=0.9, **kw)


@pytest.mark.parametrize("mode", ["log_linear", "online"])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("tvd", 0.5)])
def test_tail_ignore(mode, divergence, beta):
    gen = seeded(20)
    n, v = 6, V_ODD
    prior, proxy, ql, kw = targets(mode, n, v, 8, gen)
    y = torch.randint(0, v, (n,), generator=gen)
    loss, grad, _, _ = check(logits(n, v, gen), prior, proxy, ql, tail="ignore", divergence=divergence, beta=beta,
                             teacher_tokens=y, evidence=0.5, temperature=1.4, **kw)


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_and_grad_output(inplace):
    gen = seeded(21)
    n, v = 6, V_ODD
    prior, proxy, _, kw = targets("log_linear", n, v, 8, gen)
    z = logits(n, v, gen)
    go = torch.rand(n, generator=gen) * 3 - 1  # per-row, negative too
    check(z, prior, proxy, grad_output=go, inplace=inplace, divergence="jsd", **kw)
    check(z, prior, proxy, grad_output=torch.full((), 0.25).expand(n), inplace=inplace, **kw)  # broadcast scalar
    # through a mean: grad_output is a stride-0 1/N
    x = z.clone().requires_grad_()
    loss = triton_fused_posterior_kd(x, prior.indices, prior.logprobs, prior.tail, proxy.indices,
                                     proxy.logprobs, proxy.tail, inplace=inplace, _block_v=BLOCK, **kw).mean()
    loss.backward()
    _, ref_grad = reference(z, prior, proxy, grad_output=torch.full((n,), 1 / n), **kw)
    assert rel_err(x.grad, ref_grad) < 2e-4


def test_every_gradient_element_written():
    gen = seeded(22)
    n, v = 6, V_ODD
    for mode, tail in (("log_linear", "bucket"), ("online", "bucket"), ("mixture", "ignore")):
        prior, proxy, ql, kw = targets(mode, n, v, 8, gen)
        z = logits(n, v, gen)
        y = torch.randint(0, v, (n,), generator=gen)
        mask = torch.tensor([True, True, False, True, True, True])
        out = torch.full((n, v), float("nan"))
        pargs = (proxy.indices, proxy.logprobs, proxy.tail) if proxy is not None else (None, None, None)
        loss, grad = sparse_kd_forward(z, prior.indices, prior.logprobs, prior.tail, *pargs, ql, tail=tail,
                                       teacher_tokens=y, mask=mask, grad_out=out, block_v=BLOCK, **kw)
        assert grad is out and not torch.isnan(out).any()
        ref_loss, ref_grad = reference(z, prior, proxy, ql, tail=tail, teacher_tokens=y, mask=mask, **kw)
        assert rel_err(out, ref_grad) < 2e-4 and float((loss.double() - ref_loss).abs().max()) < 1e-4


def test_no_grad_needed_only_loss():
    gen = seeded(23)
    n, v = 6, 257
    prior, proxy, _, kw = targets("log_linear", n, v, 8, gen)
    z = logits(n, v, gen)
    z0 = z.clone()
    loss = triton_fused_posterior_kd(z, prior.indices, prior.logprobs, prior.tail, proxy.indices, proxy.logprobs,
                                     proxy.tail, inplace=True, **kw)
    assert torch.equal(z, z0)  # no gradient wanted: the logits are left alone even with inplace=True
    ref_loss, _ = reference(z, prior, proxy, **kw)
    assert float((loss.double() - ref_loss).abs().max()) < 1e-4


def test_bad_inputs_rejected():
    gen = seeded(24)
    n, v = 4, 257
    prior, proxy, ql, kw = targets("online", n, v, 8, gen)
    z = logits(n, v, gen)

    def call(zz=z, pr=prior, qq=ql, **extra):
        return triton_fused_posterior_kd(zz, pr.indices, pr.logprobs, pr.tail, None, None, None, qq,
                                         **{**kw, **extra})

    for bad in (float("nan"), float("inf"), float("-inf")):
        zb = z.clone()
        zb[2, 5] = bad
        with pytest.raises(ValueError, match="student_logits"):
            call(zb)
        qb = ql.clone()
        qb[1, 3] = bad
        with pytest.raises(ValueError, match="proxy_logits"):
            call(qq=qb)
    pb = SparseDist(prior.indices, prior.logprobs.clone(), prior.tail.clone(), v)
    pb.logprobs[0, 0] = float("nan")
    with pytest.raises(ValueError, match="prior logprobs"):
        call(pr=pb)
    pb = SparseDist(prior.indices, prior.logprobs, prior.tail.clone(), v)
    pb.tail[3] = float("inf")
    with pytest.raises(ValueError, match="prior tail"):
        call(pr=pb)
    pb = SparseDist(prior.indices.clone(), prior.logprobs, prior.tail, v)
    pb.indices[0, 0] = v
    with pytest.raises(ValueError, match="indices"):
        call(pr=pb)
    big = make_sparse(n, 16, 16, gen, pad=False)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        triton_fused_posterior_kd(z[:, :8], big.indices, big.logprobs, big.tail, mode="none")
    with pytest.raises(ValueError, match="divergence"):
        call(divergence="kl")
    with pytest.raises(ValueError, match="w_rows"):
        call(mode="mixture")
    with pytest.raises(ValueError, match="teacher_tokens"):
        call(evidence=1.0)


# ---------------------------------------------------------------------------------------------------------------
# fused linear (lm_head + loss, logits never materialized in full)
from bayeskd.kernels.fused_linear_sparse_kd import fused_linear_sparse_kd  # noqa: E402


def linear_reference(hidden, weight, prior, proxy=None, proxy_logits=None, grad_output=None, **kw):
    z = hidden.double() @ weight.double().t()
    loss, gz = reference(z, prior, proxy, proxy_logits, grad_output=grad_output, **kw)
    return loss, gz @ weight.double(), gz.t() @ hidden.double()


@pytest.mark.parametrize("mode", ["log_linear", "online"])
@pytest.mark.parametrize("grad_output", ["sum", "mean", "rows"])
def test_fused_linear_matches_reference(mode, grad_output):
    gen = seeded(30)
    n, v, h = 6, 257, 32
    prior, proxy, ql, kw = targets(mode, n, v, 8, gen)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.5
    kw.update(teacher_tokens=torch.randint(0, v, (n,), generator=gen), evidence=0.5, temperature=1.3,
              mask=torch.tensor([True, True, True, False, True, True]), divergence="jsd", beta=0.4)
    go = {"sum": torch.ones(n), "mean": torch.full((n,), 1 / n), "rows": torch.rand(n, generator=gen) + 0.5}
    ref_loss, ref_gh, ref_gw = linear_reference(hidden, weight, prior, proxy, ql, grad_output=go[grad_output], **kw)
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    pargs = (proxy.indices, proxy.logprobs, proxy.tail) if proxy is not None else (None, None, None)
    loss = fused_linear_sparse_kd(x, w, prior.indices, prior.logprobs, prior.tail, *pargs, ql, chunk_size=4, **kw)
    if grad_output == "sum":
        loss.sum().backward()
    elif grad_output == "mean":
        loss.mean().backward()
    else:
        loss.backward(go["rows"])  # non-uniform: grad_weight is rebuilt by a second pass
    assert float((loss.detach().double() - ref_loss).abs().max()) < 1e-4
    assert rel_err(x.grad, ref_gh) < 1e-4 and rel_err(w.grad, ref_gw) < 1e-4


def test_fused_linear_default_chunk_and_no_weight_grad():
    gen = seeded(31)
    n, v, h = 6, 257, 16
    prior, proxy, _, kw = targets("mixture", n, v, 8, gen)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    x = hidden.clone().requires_grad_()
    loss = fused_linear_sparse_kd(x, weight, prior.indices, prior.logprobs, prior.tail, proxy.indices,
                                  proxy.logprobs, proxy.tail, **kw)
    loss.sum().backward()
    ref_loss, ref_gh, _ = linear_reference(hidden, weight, prior, proxy, **kw)
    assert float((loss.detach().double() - ref_loss).abs().max()) < 1e-4 and rel_err(x.grad, ref_gh) < 1e-4


def test_fused_linear_torch_backend_and_losses_reference():
    """The CPU path of bayeskd.losses inside the fused-linear op, and the kernel against losses' reference."""
    from bayeskd.core.combine import combine
    from bayeskd.losses import linear as linear_losses
    from bayeskd.losses import sparse_kd_loss
    gen = seeded(32)
    n, v, h = 6, 257, 16
    prior, proxy, _, kw = targets("log_linear", n, v, 8, gen)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    ref_loss, ref_gh, ref_gw = linear_reference(hidden, weight, prior, proxy, temperature=1.5, **kw)
    for entry in ("kernel", "library"):  # the kernel's chunk loop with the torch chunk loss; the library's entry
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if entry == "kernel":
            loss = fused_linear_sparse_kd(x, w, prior.indices, prior.logprobs, prior.tail, proxy.indices,
                                          proxy.logprobs, proxy.tail, chunk_size=4, temperature=1.5,
                                          chunk_loss=linear_losses.torch_chunk_loss, **kw)
        else:
            loss = linear_losses.fused_linear_posterior_kd(x, w, prior, proxy, chunk_size=4, temperature=1.5,
                                                    backend="torch", **kw)
        loss.sum().backward()
        assert float((loss.detach().double() - ref_loss).abs().max()) < 1e-4, entry
        assert rel_err(x.grad, ref_gh) < 1e-4 and rel_err(w.grad, ref_gw) < 1e-4, entry
    # the kernel against the library's own reference: sparse_kd_loss(combine(...))
    z = logits(n, v, gen)
    y = torch.randint(0, v, (n,), generator=gen)
    target = combine(prior, proxy, mode="log_linear", teacher_tokens=y, evidence=0.5)
    lib = sparse_kd_loss(z.double(), SparseDist(target.indices, target.logprobs.double(), target.tail.double(),
                                                v), divergence="jsd", beta=0.5, temperature=1.2)
    ours, _ = run_kernel(z, prior, proxy, teacher_tokens=y, evidence=0.5, divergence="jsd", beta=0.5,
                         temperature=1.2, **kw)
    assert float((ours.double() - lib.detach()).abs().max()) < 1e-4


def test_kernel_constants_match_the_library():
    """bayeskd/kernels/ import nothing else from bayeskd, so the fused kernel repeats the library's tails, target
    floor and divergence names (as the keys of its DIVERGENCE_CODES): they must agree."""
    import bayeskd.kernels.sparse_kd as K
    from bayeskd.losses import divergences

    assert K.TAILS == divergences.TAILS and K.TARGET_FLOOR == divergences.TARGET_FLOOR
    assert tuple(K.DIVERGENCE_CODES) == divergences.DIVERGENCES
