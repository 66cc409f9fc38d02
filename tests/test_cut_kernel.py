"""The cut-logits kernel (bayeskd/kernels/cut_sparse_kd.py, Triton interpreter on CPU) against the float64 dense reference
of test_kernels.py: z = hidden @ weight.T (+ bias) built in float64, the posterior and divergence formed densely,
gradients for hidden, weight and bias by autograd. Seeds are fixed per test (printed on failure via the case id).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (test_kernels does the same)

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kernels import DIVS, reference, rel_err, seeded, targets  # noqa: E402 (sets up the interpreter)

from bayeskd.kernels.cut_sparse_kd import cut_sparse_kd, gather_logits, row_stats  # noqa: E402
from bayeskd.losses.linear import cut_head, fused_linear_posterior_kd  # noqa: E402
from bayeskd.losses.fused import prepare_args  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")]  # the NaN-input case

N, H, V = 13, 24, 101  # odd everywhere: tail tiles in rows, hidden size and vocabulary (blocks 16 x 32 x 16)
SMALL = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16)


def inputs(gen, n=N, h=H, v=V, dtype=torch.float32, bias=False):
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.6).to(dtype)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype) if bias else None
    return hidden, weight, b


def dense_reference(hidden, weight, bias, prior, proxy, proxy_logits, grad_output, **kw):
    """float64: loss [N] and the gradients w.r.t. hidden, weight, bias (through the dense logits' gradient)."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    loss, gz = reference(z, prior, proxy, proxy_logits, grad_output=grad_output, **kw)
    return loss, gz @ weight.double(), gz.t() @ hidden.double(), gz.sum(0)


def run_cut(hidden, weight, bias, prior, proxy, proxy_logits, grad_output, needs=(True, True, True), **kw):
    """Loss and gradients through the library entry, as a user calls it (or, with launcher overrides, through
    the kernel with the library's head)."""
    x = hidden.clone().requires_grad_(needs[0])
    w = weight.clone().requires_grad_(needs[1])
    b = bias.clone().requires_grad_(needs[2]) if bias is not None else None
    opts = {k: kw.pop(k) for k in ("blocks", "splits", "slab_rows") if k in kw}
    mode, w_rows = kw.pop("mode"), kw.pop("w_rows", None)
    lib = dict(kw, mode="log_linear" if mode == "none" else mode)  # the library's prior-alone is proxy=None
    if w_rows is not None:  # the library takes one mixture weight; per-row weights are the kernel's own input
        lib["w"] = float(w_rows[0])
    target_proxy = proxy if proxy is not None else proxy_logits
    if opts:
        args = prepare_args(hidden.new_empty(()).expand(len(hidden), len(weight)), prior, target_proxy, lib["mode"],
                            1.0, 1.0, 1.0, lib.get("w", 0.5), kw.get("teacher_tokens"), kw.get("evidence", 0.0),
                            kw.get("divergence", "forward_kl"), kw.get("beta"), kw.get("temperature", 1.0),
                            kw.get("mask"), kw.get("tail", "bucket"), False, student_values=False)
        args.w_rows = w_rows
        loss = cut_sparse_kd(x, w, cut_head(args), bias=b, temperature=kw.get("temperature", 1.0), **opts)
    else:
        loss = fused_linear_posterior_kd(x, w, prior, target_proxy, bias=b, cut=True, backend="triton", **lib)
    loss.backward(grad_output)
    return loss.detach(), x.grad, w.grad, b.grad if b is not None else None


def check(gen, mode="log_linear", k=16, dtype=torch.float32, bias=False, tol=2e-5, grad_tol=1e-4, n=N, v=V,
          needs=(True, True, True), sparse_kw=None, **kw):
    hidden, weight, b = inputs(gen, n=n, v=v, dtype=dtype, bias=bias)
    prior, proxy, ql, extra = targets(mode, n, v, k, gen, **(sparse_kw or {}))
    kw = {**extra, **kw}
    if "w_rows" in kw and not {"blocks", "splits", "slab_rows"} & set(kw):  # noqa
        kw["w_rows"] = torch.full((n,), float(kw["w_rows"][0]))  # the library entry takes one mixture weight
    go = torch.rand(n, generator=gen) + 0.5  # per-row weights: the coefficients scale by them in backward
    launcher = {"blocks", "splits", "slab_rows"}
    ref = dense_reference(hidden, weight, b, prior, proxy, ql, go,
                          **{k: x for k, x in kw.items() if k not in launcher})
    got = run_cut(hidden, weight, b, prior, proxy, ql, go, needs=needs, **kw)
    assert torch.isfinite(got[0]).all()
    err = float((got[0].double() - ref[0]).abs().max())
    assert err <= tol * max(1.0, float(ref[0].abs().max())), (err, got[0], ref[0])
    for name, g, r, need in zip(("hidden", "weight", "bias"), got[1:], ref[1:], needs):
        if name == "bias" and b is None:
            continue
        if not need:
            assert g is None, name
            continue
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert rel_err(g, r) <= grad_tol, (name, rel_err(g, r))
    return got, ref


@pytest.mark.parametrize("mode", ["none", "log_linear", "mixture", "online"])
@pytest.mark.parametrize("divergence,beta", DIVS)
def test_every_mode_and_divergence(mode, divergence, beta):
    check(seeded(100), mode, divergence=divergence, beta=beta, temperature=1.3)


@pytest.mark.parametrize("k", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_k_dtype_bias(k, dtype, bias):
    fp16 = dtype == torch.float16  # gradients are stored in fp16: ~1e-3 relative
    check(seeded(101 + k), "log_linear", k=k, dtype=dtype, bias=bias, tol=1e-4 if fp16 else 2e-5,
          grad_tol=3e-3 if fp16 else 1e-4, divergence="jsd", beta=0.5)


def test_masked_rows_teacher_tokens_evidence():
    gen = seeded(102)
    mask = torch.rand(N, generator=gen) > 0.3
    mask[:2] = torch.tensor([False, True])
    got, _ = check(gen, "mixture", mask=mask, teacher_tokens=torch.randint(0, V, (N,), generator=gen),
                   evidence=0.5, divergence="reverse_kl")
    assert (got[0][~mask] == 0).all()


def test_masked_rows_give_no_gradient():
    gen = seeded(103)
    hidden, weight, _ = inputs(gen)
    prior, _, _, _ = targets("none", N, V, 16, gen)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[5] = True
    x = hidden.clone().requires_grad_()
    loss = fused_linear_posterior_kd(x, weight, prior, mask=mask, cut=True, backend="triton")
    loss.sum().backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[5] != 0).any()


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("tvd", 0.5)])
def test_tail_ignore(divergence, beta):
    check(seeded(104), "log_linear", tail="ignore", divergence=divergence, beta=beta, temperature=0.8)


def test_tiles_splits_and_slabs():
    """Several forward splits, several fp32-accumulator slabs of grad_weight (fp16 weight), blocks with tails."""
    for splits, slab in ((3, 32), (1, 64), (4, 96)):
        check(seeded(105 + splits), "online", dtype=torch.float16, bias=True, tol=1e-4, grad_tol=3e-3,
              blocks=SMALL, splits=splits, slab_rows=slab, divergence="forward_kl")


def test_only_some_gradients():
    check(seeded(108), "log_linear", needs=(False, True, True), bias=True)
    check(seeded(109), "log_linear", needs=(True, False, False), bias=True)


def test_full_support_rows_have_no_bucket():
    """K = V: U covers the vocabulary (R = 0), the bucket is empty."""
    for divergence in ("forward_kl", "reverse_kl"):
        check(seeded(110), "none", k=37, v=37, n=5, divergence=divergence, temperature=1.7,
              sparse_kw=dict(tail=0.0, pad=False))


def test_no_grad_gives_loss_only():
    gen = seeded(111)
    hidden, weight, _ = inputs(gen)
    prior, proxy, _, kw = targets("log_linear", N, V, 16, gen)
    with torch.no_grad():
        loss = fused_linear_posterior_kd(hidden, weight, prior, proxy, cut=True, backend="triton", **kw)
    ref = dense_reference(hidden, weight, None, prior, proxy, None, None, **kw)[0]
    assert float((loss.double() - ref).abs().max()) < 2e-5


def test_row_stats_and_gather_match_torch():
    gen = seeded(112)
    hidden, weight, b = inputs(gen, bias=True)
    z = (hidden.double() @ weight.double().t() + b.double()) / 0.7
    for splits in (1, 2, 4):
        mx, total = row_stats(hidden, weight, b, 0.7, blocks=SMALL, splits=splits)
        assert torch.allclose(mx.double() + total.double().log(), torch.logsumexp(z, 1), atol=1e-5)
        *_, mx1, total1 = row_stats(hidden, weight, b, 0.7, blocks=SMALL, splits=splits, with_t1=True)
        assert torch.allclose(mx1.double() + total1.double().log(), torch.logsumexp(z * 0.7, 1), atol=1e-5)
    idx = torch.randint(-1, V, (N, 7), generator=gen)
    got = gather_logits(hidden, weight, b, idx)
    want = torch.where(idx >= 0, (z * 0.7).gather(1, idx.clamp(min=0)), 0.0)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_bad_inputs_rejected():
    gen = seeded(113)
    hidden, weight, _ = inputs(gen)
    prior, _, _, _ = targets("none", N, V, 16, gen)
    bad = hidden.clone()
    bad[4, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values in the student logits .*row 4"):
        fused_linear_posterior_kd(bad, weight, prior, cut=True, backend="triton")
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_posterior_kd(hidden, weight, prior, cut=True, backend="triton",
                                  bias=torch.zeros(V + 1))
    with pytest.raises(ValueError, match="bias is supported by the cut-logits kernel only"):
        fused_linear_posterior_kd(hidden, weight, prior, backend="torch", bias=torch.zeros(V))
    with pytest.raises(ValueError, match="same dtype"):  # the kernel's own check (the library casts first)
        cut_sparse_kd(hidden.half(), weight, head=None)
    nan_prior = targets("none", N, V, 16, gen)[0]
    nan_prior.logprobs[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fused_linear_posterior_kd(hidden, weight, nan_prior, cut=True, backend="triton")


def test_torch_backend_runs_the_chunked_op():
    """cut=True on the PyTorch backend (no cut kernel there) gives the same numbers through the chunked op."""
    gen = seeded(114)
    hidden, weight, _ = inputs(gen)
    prior, proxy, _, kw = targets("log_linear", N, V, 16, gen)
    a = fused_linear_posterior_kd(hidden, weight, prior, proxy, cut=True, backend="torch", **kw)
    b = fused_linear_posterior_kd(hidden, weight, prior, proxy, cut=True, backend="triton", **kw)
    assert float((a - b).abs().max()) < 2e-5


@pytest.mark.parametrize("path", ["joint", "joint-T", "torch"])
def test_kd_and_ce_together(path, monkeypatch):
    """fused_linear_kd_and_ce: KD and CE per row with gradients of go_kd·KD + go_ce·CE against float64 autograd;
    the cut kernel does both in one pass over the logits (one row_stats call), also with the KD at T != 1 (the
    CE's softmax at temperature 1 computed from the same tiles)."""
    import bayeskd.kernels.cut_sparse_kd as cut_mod
    from bayeskd.losses.linear import fused_linear_kd_and_ce

    calls = []
    real = cut_mod.row_stats
    monkeypatch.setattr(cut_mod, "row_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = seeded(115)
    hidden, weight, b = inputs(gen, bias=path != "torch")
    prior, proxy, _, kw = targets("log_linear", N, V, 16, gen)
    tokens = torch.randint(0, V, (N,), generator=gen)
    tokens[3] = prior.indices[3][prior.indices[3] >= 0][0]  # one CE token that is also a listed entry
    mask = torch.rand(N, generator=gen) > 0.25
    go_kd, go_ce = torch.rand(N, generator=gen) + 0.5, torch.rand(N, generator=gen) + 0.5
    T = 1.3 if path == "joint-T" else 1.0
    opts = dict(divergence="jsd", beta=0.3, temperature=T, mask=mask, **kw)

    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    bb = b.clone().requires_grad_() if b is not None else None
    kd, ce = fused_linear_kd_and_ce(x, w, tokens, prior, proxy, cut=path != "torch", bias=bb,
                                    backend="torch" if path == "torch" else "triton", **opts)
    ((kd * go_kd).sum() + (ce * go_ce).sum()).backward()
    if path != "torch":
        assert len(calls) == 1

    z64 = hidden.double() @ weight.double().t() + (b.double() if b is not None else 0.0)
    kd_ref, gz = reference(z64, prior, proxy, grad_output=go_kd, **{k: v for k, v in opts.items() if k != "mode"},
                           mode="log_linear")
    ce_ref = torch.where(mask, torch.logsumexp(z64, 1) - z64.gather(1, tokens[:, None])[:, 0], 0.0)
    onehot = torch.nn.functional.one_hot(tokens, V).double()
    gz = gz + ((torch.softmax(z64, 1) - onehot) * (go_ce * mask).double()[:, None])
    assert float((kd.detach().double() - kd_ref).abs().max()) < 2e-5
    assert float((ce.detach().double() - ce_ref).abs().max()) < 2e-5
    assert (ce[~mask] == 0).all() and (kd[~mask] == 0).all()
    assert rel_err(x.grad, gz @ weight.double()) < 1e-4
    assert rel_err(w.grad, gz.t() @ hidden.double()) < 1e-4
    if bb is not None:
        assert rel_err(bb.grad, gz.sum(0)) < 1e-4


@pytest.mark.parametrize("path", ["cut", "chunked-torch"])
def test_mixed_precision_like_the_plain_path(path):
    """Under autocast (bf16 training with an fp32 lm_head) both lm_head ops multiply in bf16, as lm_head(hidden)
    would (the chunked op used to fail there: an fp32 grad_hidden for bf16 chunk gradients); outside autocast
    mixed dtypes are promoted. Gradients reach the fp32 tensors in fp32."""
    gen = seeded(116)
    hidden, weight, _ = inputs(gen, h=32)
    prior, proxy, _, kw = targets("log_linear", N, V, 16, gen)
    opts = dict(cut=True, backend="triton") if path == "cut" else dict(backend="torch", chunk_size=4)
    go = torch.rand(N, generator=gen) + 0.5
    ref = dense_reference(hidden.bfloat16(), weight.bfloat16(), None, prior, proxy, None, go, **kw)
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_posterior_kd(x, w, prior, proxy, **opts, **kw)
    loss.backward(go)
    assert x.grad.dtype == w.grad.dtype == torch.float32
    # the chunked op rounds its logits to bf16; the cut op keeps the fp32 accumulators
    # (logits of ~10 round by ~0.04 in bf16: measured 2e-2 here against 3e-6 for the cut op)
    assert float((loss.detach().double() - ref[0]).abs().max()) < (1e-4 if path == "cut" else 5e-2)
    assert rel_err(x.grad, ref[1]) < 1e-2 and rel_err(w.grad, ref[2]) < 1e-2  # bf16 inputs and gradients
    loss = fused_linear_posterior_kd(hidden.half(), weight, prior, proxy, **opts, **kw)
    ref = dense_reference(hidden.half(), weight, None, prior, proxy, None, None, **kw)[0]
    # fp16 hidden, fp32 weight: promoted to fp32 (tolerance relative to the loss, as in check())
    assert float((loss.detach().double() - ref).abs().max()) < 2e-5 * max(1.0, float(ref.abs().max()))


def test_inputs_changed_in_place_before_backward_are_refused():
    """Backward recomputes the logits from hidden and weight: had they changed after the forward pass, the
    gradient would be silently wrong, so autograd's version check must refuse it."""
    gen = seeded(117)
    hidden, weight, _ = inputs(gen)
    prior, proxy, _, kw = targets("log_linear", N, V, 16, gen)
    x = hidden.clone().requires_grad_()
    w = weight.clone()
    loss = fused_linear_posterior_kd(x, w, prior, proxy, cut=True, backend="triton", **kw)
    w.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()
