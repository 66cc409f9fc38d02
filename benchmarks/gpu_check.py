"""Correctness of the compiled Triton kernels on CUDA against the library's float64 reference.

The reference is bayeskd's own plain-PyTorch one (`combine` + `sparse_kd_loss`, autograd, float64: the source of
truth the other implementations are tested against, itself tested against an independent dense computation in
tests/test_kernels.py), run on CPU from the same inputs. Every case prints the loss error and the gradient's max
error relative to the largest reference gradient, and PASS/FAIL. Gradient buffers are pre-filled with NaN, so an
element the kernel forgets to write fails the case (the fused-linear and cut-logits cases, whose gradients the ops
allocate, fail on any non-finite gradient). Exits 1 if any case fails (2 without CUDA).

    python benchmarks/gpu_check.py [--quick]
    python benchmarks/gpu_check.py --device cpu     # smoke: a few small cases under the Triton interpreter
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # gradient is stored in the input dtype
# cut-logits kernel: (loss, gradient) tolerances; low precision: tensor-core tiles and the gradients' own rounding
CUT_TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (5e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}
DIRICHLET_C = 4.0  # the "mixture" cases: per-row prior weights n / (c + n) from random continuation counts n


# ---------------------------------------------------------------------------------------------------------------
# inputs and the reference
def make_sparse(n, v, k, gen):
    """Random top-K rows: distinct indices, every third row half padded (padding anywhere in the row)."""
    from bayeskd.core.sparse import SparseDist

    idx = torch.full((n, k), -1, dtype=torch.int32)
    lp = torch.full((n, k), float("-inf"))
    tails = torch.empty(n)
    for r in range(n):
        kr = k if r % 3 else max(1, k // 2)
        chosen = torch.randperm(v, generator=gen)[:kr]
        t = float(torch.rand((), generator=gen) * 0.8 + 0.1)
        probs = torch.softmax(torch.randn(kr, generator=gen, dtype=torch.float64) * 2, 0) * (1 - t)
        slots = torch.randperm(k, generator=gen)[:kr]
        idx[r, slots] = chosen.to(torch.int32)
        lp[r, slots] = probs.log().float()
        tails[r] = t
    return SparseDist(idx, lp, tails, v)


def logits(n, v, gen, scale=3.0, dtype=torch.float32):
    return (torch.randn(n, v, generator=gen) * scale).to(dtype)


def targets(mode, n, v, k, gen):
    """(prior, proxy, proxy_logits, kernel kwargs) for a combination mode: "online" = dense proxy logits with the
    log-linear rule; "mixture" = per-row weights (the library's Dirichlet mixture)."""
    prior = make_sparse(n, v, k, gen)
    kw = {"mode": "log_linear" if mode == "online" else mode}
    if mode == "mixture":
        prior.extras["context_count"] = torch.randint(0, 20, (n,), generator=gen).double()
        kw["w_rows"] = (prior.extras["context_count"] / (DIRICHLET_C + prior.extras["context_count"])).float()
    if mode == "none":
        return prior, None, None, kw
    if mode == "online":
        return prior, None, logits(n, v, gen, scale=2.0), kw
    return prior, make_sparse(n, v, k, gen), None, kw


def _f64(d):
    from bayeskd.core.sparse import SparseDist

    return None if d is None else SparseDist(d.indices, d.logprobs.double(), d.tail.double(), d.vocab_size,
                                             extras=dict(d.extras))


def reference(z, prior, proxy=None, proxy_logits=None, *, mode="log_linear", w_rows=None, teacher_tokens=None,
              evidence=0.0, divergence="forward_kl", beta=0.5, temperature=1.0, mask=None, tail="bucket"):
    """float64 loss [N] and gradient w.r.t. the logits `z`: sparse_kd_loss(z, combine(prior, proxy, ...))."""
    from bayeskd.core.combine import combine
    from bayeskd.losses import sparse_kd_loss

    z64 = z.double().detach().requires_grad_()
    other = _f64(proxy) if proxy is not None else None if proxy_logits is None else proxy_logits.double()
    lib_mode = {"mixture": "dirichlet", "none": "log_linear"}.get(mode, mode)  # "none": proxy None, the prior
    target = combine(_f64(prior), other, mode=lib_mode, c=DIRICHLET_C, teacher_tokens=teacher_tokens,
                     evidence=evidence)
    loss = sparse_kd_loss(z64, target, divergence=divergence, beta=beta, temperature=temperature, mask=mask,
                          tail=tail)
    (grad,) = torch.autograd.grad(loss.sum(), z64)
    return loss.detach(), grad


def linear_reference(hidden, weight, prior, proxy=None, proxy_logits=None, **kw):
    z = hidden.double() @ weight.double().t()
    loss, gz = reference(z, prior, proxy, proxy_logits, **kw)
    return loss, gz @ weight.double(), gz.t() @ hidden.double()


def rel_err(x, ref):
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------------------------
def cut_cases(report, dev, n=97, h=1024, v=32003, ks=(16, 64), dtypes=(torch.float32, torch.bfloat16,
                                                                         torch.float16)):
    """The cut-logits kernel through `fused_linear_posterior_kd(..., cut=True)` against the float64 dense
    reference: loss and the gradients of hidden, weight and (K=64 cases) bias. K=16: the prior alone, forward KL;
    K=64: log-linear prior x proxy, JSD, T=1.3, with a bias. N, V not multiples of the tiles."""
    from bayeskd.losses.linear import fused_linear_posterior_kd

    for dtype in dtypes:
        for k in ks:
            gen = torch.Generator().manual_seed(2000 + k)
            with_bias = k == max(ks)
            mode = "log_linear" if with_bias else "none"
            prior, proxy, _, kw = targets(mode, n, v, k, gen)
            kw.update(divergence="jsd" if with_bias else "forward_kl", beta=0.5,
                      temperature=1.3 if with_bias else 1.0)
            hidden = torch.randn(n, h, generator=gen).to(dtype)
            weight = (torch.randn(v, h, generator=gen) * h ** -0.5).to(dtype)
            bias = (torch.randn(v, generator=gen) * 0.5).to(dtype) if with_bias else None
            z = hidden.double() @ weight.double().t() + (bias.double() if with_bias else 0.0)
            ref_loss, gz = reference(z, prior, proxy, None, **kw)
            refs = (gz @ weight.double(), gz.t() @ hidden.double(), gz.sum(0))
            x, w = hidden.to(dev).requires_grad_(), weight.to(dev).requires_grad_()
            b = bias.to(dev).requires_grad_() if with_bias else None
            lib = dict(kw, mode="log_linear")  # the library's prior alone is proxy=None
            loss = fused_linear_posterior_kd(x, w, prior.to(dev), proxy.to(dev) if proxy is not None else None,
                                             cut=True, backend="triton", bias=b, **lib)
            loss.sum().backward()
            if dev == "cuda":
                torch.cuda.synchronize()
            loss_err = float((loss.detach().cpu().double() - ref_loss).abs().max()
                             / max(1.0, float(ref_loss.abs().max())))
            grads = [g for g in (x.grad, w.grad, b.grad if b is not None else None) if g is not None]
            ok = len(grads) == (3 if with_bias else 2) and all(bool(torch.isfinite(g).all()) for g in grads)
            gerr = max(rel_err(g.cpu(), r) for g, r in zip(grads, refs)) if ok else float("inf")
            loss_tol, grad_tol = CUT_TOL[dtype]
            report(f"cut N={n} H={h} V={v} K={k} {str(dtype)[6:]} {mode} {kw['divergence']} T={kw['temperature']}"
                   + (" bias" if with_bias else ""), loss_err, gerr, grad_tol, loss_tol=loss_tol)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda: the check; cpu: a few small float32 cases under the Triton interpreter (a smoke run "
                         "of this script, not a check of the compiled kernels)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (decorated)
        # numpy, running the kernels, warns about the -inf arithmetic they do on purpose (absent entries)
        warnings.filterwarnings("ignore", ".*encountered in", RuntimeWarning)
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device", file=sys.stderr)
            return 2
    from bayeskd.kernels.fused_linear_sparse_kd import fused_linear_sparse_kd
    from bayeskd.kernels.sparse_kd import sparse_kd_forward, triton_fused_posterior_kd

    smoke = dev == "cpu"
    print(f"device: {torch.cuda.get_device_name() if not smoke else 'cpu (Triton interpreter: smoke run)'}")
    failures = 0
    case_id = 0

    def cuda(x):
        return x.to(dev) if isinstance(x, torch.Tensor) else x

    def report(name, loss_err, grad_err, tol, loss_tol=1e-4):
        nonlocal failures
        ok = loss_err <= loss_tol and grad_err <= tol
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:<78} loss err {loss_err:.2e}  grad rel err {grad_err:.2e}")

    def run(name, n, v, k, dtype, mode, divergence, beta, temperature, *, extra=None, inplace=False):
        nonlocal case_id
        case_id += 1
        gen = torch.Generator().manual_seed(case_id)
        prior, proxy, ql, kw = targets(mode, n, v, k, gen)
        kw.update(divergence=divergence, beta=beta, temperature=temperature, **(extra or {}))
        if kw.get("teacher_tokens") == "random":
            kw["teacher_tokens"] = torch.randint(0, v, (n,), generator=gen)
        z = logits(n, v, gen, dtype=dtype)
        ql = ql.to(dtype) if ql is not None else None
        ref_loss, ref_grad = reference(z, prior, proxy, ql, **kw)
        pargs = (proxy.indices, proxy.logprobs, proxy.tail) if proxy is not None else (None, None, None)
        kwc = {k_: cuda(v_) for k_, v_ in kw.items()}
        targs = [cuda(t) for t in (prior.indices, prior.logprobs, prior.tail, *pargs, ql)]
        if inplace:  # through the autograd Function, gradient written into the logits
            x = z.to(dev).requires_grad_()
            loss = triton_fused_posterior_kd(x, *targs, inplace=True, **kwc)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        else:
            grad = torch.full((n, v), float("nan"), dtype=dtype, device=dev)  # poison
            loss, grad = sparse_kd_forward(z.to(dev), *targs, grad_out=grad, **kwc)
        if not smoke:
            torch.cuda.synchronize()
        loss_err = float((loss.detach().cpu().double() - ref_loss).abs().max() / max(1.0, float(ref_loss.abs().max())))
        grad_err = rel_err(grad.cpu(), ref_grad) if not torch.isnan(grad).any() else float("inf")
        report(f"{name} N={n} V={v} K={k} {str(dtype)[6:]} {mode} {divergence}(β={beta}) T={temperature}"
               + (" inplace" if inplace else ""), loss_err, grad_err, TOL[dtype])

    big, mid = (151936, 32003) if not smoke else (1271, 1271)  # vocabularies: Qwen's and an odd one
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if not smoke else (torch.float32,)
    vs = (big, mid) if not (args.quick or smoke) else (big,)
    divs = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0), ("skew_kl", 0.1),
            ("tvd", 0.5)] if not smoke else [("forward_kl", 0.5), ("jsd", 0.5)]
    for dtype in dtypes:
        for v in vs:
            for mode in ("none", "log_linear", "mixture", "online"):
                for divergence, beta in divs:
                    run("core", 8, v, 64, dtype, mode, divergence, beta, 1.0 if divergence != "jsd" else 1.5)
    for dtype in dtypes:
        run("K=128 T<1", 16, big, 128, dtype, "log_linear", "forward_kl", 0.5, 0.7)
        run("K=1", 16, mid, 1, dtype, "mixture", "reverse_kl", 0.5, 2.0)
        run("teacher+evidence", 8, big, 64, dtype, "log_linear", "jsd", 0.5, 1.3,
            extra={"teacher_tokens": "random", "evidence": 0.5})
        run("online teacher+evidence", 8, big, 64, dtype, "online", "forward_kl", 0.5, 1.0,
            extra={"teacher_tokens": "random", "evidence": 1.0})
        run("tail=ignore", 8, big, 64, dtype, "log_linear", "forward_kl", 0.5, 1.0, extra={"tail": "ignore"})
        run("mask", 8, mid, 64, dtype, "log_linear", "tvd", 0.5, 1.0,
            extra={"mask": torch.tensor([True, False] * 4)})
        run("inplace", 8, big, 64, dtype, "log_linear", "forward_kl", 0.5, 1.0, inplace=True)

    # fused linear: lm_head + loss, no full logits
    for dtype in (torch.float32, torch.bfloat16) if not smoke else (torch.float32,):
        gen = torch.Generator().manual_seed(999)
        n, v, h = (64, mid, 256) if not smoke else (16, mid, 32)
        prior, proxy, _, kw = targets("log_linear", n, v, 64, gen)
        hidden = torch.randn(n, h, generator=gen).to(dtype)
        weight = (torch.randn(v, h, generator=gen) * h ** -0.5).to(dtype)
        ref_loss, ref_gh, ref_gw = linear_reference(hidden.float(), weight.float(), prior, proxy, **kw)
        x, w = hidden.to(dev).requires_grad_(), weight.to(dev).requires_grad_()
        loss = fused_linear_sparse_kd(x, w, *(cuda(t) for t in (prior.indices, prior.logprobs, prior.tail,
                                                               proxy.indices, proxy.logprobs, proxy.tail)),
                                      chunk_size=24, **kw)
        loss.sum().backward()
        loss_err = float((loss.detach().cpu().double() - ref_loss).abs().max() / max(1.0, float(ref_loss.abs().max())))
        gerr = max(rel_err(x.grad.cpu(), ref_gh), rel_err(w.grad.cpu(), ref_gw))
        # bf16 matmuls (logits and both gradient products) dominate the error here
        report(f"fused_linear N={n} H={h} V={v} {str(dtype)[6:]}", loss_err, gerr,
               1e-3 if dtype == torch.float32 else 5e-2, loss_tol=1e-4 if dtype == torch.float32 else 2e-2)

    # cut logits: lm_head + loss with the logits only as on-chip tiles (bayeskd/kernels/cut_sparse_kd.py)
    if smoke:
        cut_cases(report, dev, n=13, h=32, v=257, dtypes=dtypes)
    else:
        cut_cases(report, dev, dtypes=dtypes if not args.quick else (torch.float32, torch.bfloat16))
    print(f"{'ALL PASS' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
