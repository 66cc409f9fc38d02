"""Correctness of the compiled Triton kernels on CUDA against the float64 dense reference of tests/test_kernels.py.

Every case prints the loss error and the gradient's max error relative to the largest reference gradient, and
PASS/FAIL. Gradient buffers are pre-filled with NaN, so an element the kernel forgets to write fails the case
(the fused-linear and cut-logits cases, whose gradients the ops allocate, fail on any non-finite gradient).
Exits 1 if any case fails (2 without CUDA).

    python benchmarks/gpu_check.py [--quick]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ["BAYESKD_KERNELS_COMPILED"] = "1"  # the test module must not switch on the Triton interpreter
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_reference():
    spec = importlib.util.spec_from_file_location("bayeskd_test_kernels", ROOT / "tests" / "test_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # gradient is stored in the input dtype
# cut-logits kernel: (loss, gradient) tolerances; low precision: tensor-core tiles and the gradients' own rounding
CUT_TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (5e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}


def cut_cases(T, report, dev, n=97, h=1024, v=32003, ks=(16, 64), dtypes=(torch.float32, torch.bfloat16,
                                                                         torch.float16)):
    """The cut-logits kernel through `fused_linear_posterior_kd(..., cut=True)` against the float64 dense
    reference: loss and the gradients of hidden, weight and (K=64 cases) bias. K=16: the prior alone, forward KL;
    K=64: log-linear prior x proxy, JSD, T=1.3, with a bias. N, V not multiples of the tiles."""
    from bayeskd.linear_losses import fused_linear_posterior_kd

    for dtype in dtypes:
        for k in ks:
            gen = torch.Generator().manual_seed(2000 + k)
            with_bias = k == max(ks)
            mode = "log_linear" if with_bias else "none"
            prior, proxy, _, kw = T.targets(mode, n, v, k, gen)
            kw.update(divergence="jsd" if with_bias else "forward_kl", beta=0.5,
                      temperature=1.3 if with_bias else 1.0)
            hidden = torch.randn(n, h, generator=gen).to(dtype)
            weight = (torch.randn(v, h, generator=gen) * h ** -0.5).to(dtype)
            bias = (torch.randn(v, generator=gen) * 0.5).to(dtype) if with_bias else None
            z = hidden.double() @ weight.double().t() + (bias.double() if with_bias else 0.0)
            ref_loss, gz = T.reference(z, prior, proxy, None, **kw)
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
            gerr = max(T.rel_err(g.cpu(), r) for g, r in zip(grads, refs)) if ok else float("inf")
            loss_tol, grad_tol = CUT_TOL[dtype]
            report(f"cut N={n} H={h} V={v} K={k} {str(dtype)[6:]} {mode} {kw['divergence']} T={kw['temperature']}"
                   + (" bias" if with_bias else ""), loss_err, gerr, grad_tol, loss_tol=loss_tol)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    T = load_reference()
    from bayeskd.kernels.fused_linear_sparse_kd import fused_linear_sparse_kd
    from bayeskd.kernels.sparse_kd import sparse_kd_forward, triton_fused_posterior_kd

    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()}")
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
        prior, proxy, ql, kw = T.targets(mode, n, v, k, gen)
        kw.update(divergence=divergence, beta=beta, temperature=temperature, **(extra or {}))
        if kw.get("teacher_tokens") == "random":
            kw["teacher_tokens"] = torch.randint(0, v, (n,), generator=gen)
        z = T.logits(n, v, gen, dtype=dtype)
        ql = ql.to(dtype) if ql is not None else None
        ref_loss, ref_grad = T.reference(z, prior, proxy, ql, **kw)
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
        torch.cuda.synchronize()
        loss_err = float((loss.cpu().double() - ref_loss).abs().max() / max(1.0, float(ref_loss.abs().max())))
        grad_err = T.rel_err(grad.cpu(), ref_grad) if not torch.isnan(grad).any() else float("inf")
        report(f"{name} N={n} V={v} K={k} {str(dtype)[6:]} {mode} {divergence}(β={beta}) T={temperature}"
               + (" inplace" if inplace else ""), loss_err, grad_err, TOL[dtype])

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    vs = (151936, 32003) if not args.quick else (151936,)
    divs = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0), ("skew_kl", 0.1),
            ("tvd", 0.5)]
    for dtype in dtypes:
        for v in vs:
            for mode in ("none", "log_linear", "mixture", "online"):
                for divergence, beta in divs:
                    run("core", 8, v, 64, dtype, mode, divergence, beta, 1.0 if divergence != "jsd" else 1.5)
    for dtype in dtypes:
        run("K=128 T<1", 16, 151936, 128, dtype, "log_linear", "forward_kl", 0.5, 0.7)
        run("K=1", 16, 32003, 1, dtype, "mixture", "reverse_kl", 0.5, 2.0)
        run("teacher+evidence", 8, 151936, 64, dtype, "log_linear", "jsd", 0.5, 1.3,
            extra={"teacher_tokens": "random", "evidence": 0.5})
        run("online teacher+evidence", 8, 151936, 64, dtype, "online", "forward_kl", 0.5, 1.0,
            extra={"teacher_tokens": "random", "evidence": 1.0})
        run("tail=ignore", 8, 151936, 64, dtype, "log_linear", "forward_kl", 0.5, 1.0, extra={"tail": "ignore"})
        run("mask", 8, 32003, 64, dtype, "log_linear", "tvd", 0.5, 1.0,
            extra={"mask": torch.tensor([True, False] * 4)})
        run("inplace", 8, 151936, 64, dtype, "log_linear", "forward_kl", 0.5, 1.0, inplace=True)

    # fused linear: lm_head + loss, no full logits
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(999)
        n, v, h = 64, 32003, 256
        prior, proxy, _, kw = T.targets("log_linear", n, v, 64, gen)
        hidden = torch.randn(n, h, generator=gen).to(dtype)
        weight = (torch.randn(v, h, generator=gen) * h ** -0.5).to(dtype)
        ref_loss, ref_gh, ref_gw = T.linear_reference(hidden.float(), weight.float(), prior, proxy, **kw)
        x, w = hidden.to(dev).requires_grad_(), weight.to(dev).requires_grad_()
        loss = fused_linear_sparse_kd(x, w, *(cuda(t) for t in (prior.indices, prior.logprobs, prior.tail,
                                                               proxy.indices, proxy.logprobs, proxy.tail)),
                                      chunk_size=24, **kw)
        loss.sum().backward()
        loss_err = float((loss.detach().cpu().double() - ref_loss).abs().max() / max(1.0, float(ref_loss.abs().max())))
        gerr = max(T.rel_err(x.grad.cpu(), ref_gh), T.rel_err(w.grad.cpu(), ref_gw))
        # bf16 matmuls (logits and both gradient products) dominate the error here
        report(f"fused_linear N={n} H={h} V={v} {str(dtype)[6:]}", loss_err, gerr,
               1e-3 if dtype == torch.float32 else 5e-2, loss_tol=1e-4 if dtype == torch.float32 else 2e-2)

    # cut logits: lm_head + loss with the logits only as on-chip tiles (bayeskd/kernels/cut_sparse_kd.py)
    cut_cases(T, report, dev, dtypes=dtypes if not args.quick else (torch.float32, torch.bfloat16))
    print(f"{'ALL PASS' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
