"""The Triton kernels (run by the Triton interpreter on CPU) against an independent float64 dense computation.

The reference below builds every distribution densely over V (SparseDist.to_dense), combines them with the
formulas of docs/MATH.md, measures the divergence over the categories (U plus the tail bucket) and takes the
gradient with torch autograd in float64. It shares no code with the kernels or with bayeskd.losses.
"""
import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decoration of the kernels

import pytest
import torch

if "bayeskd.kernels.sparse_kd" in sys.modules:  # imported before us (without the interpreter): decorate again
    importlib.reload(sys.modules["bayeskd.kernels.sparse_kd"])
    if "bayeskd.kernels.fused_linear_sparse_kd" in sys.modules:
        importlib.reload(sys.modules["bayeskd.kernels.fused_linear_sparse_kd"])

from bayeskd.kernels.sparse_kd import sparse_kd_forward, triton_fused_posterior_kd  # noqa: E402
from bayeskd.sparse import SparseDist  # noqa: E402

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
