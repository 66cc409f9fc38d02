"""Fused posterior + sparse top-K divergence with the student, gradient written in the forward pass.

One program per row. Per row the kernel
  1. streams the student logits once (online log-sum-exp of z/T; in online mode also the proxy logits' lse),
  2. builds the union support U = S0 ∪ Sq (∪ {y}) from the sparse entries (a K0 x Kq compare removes
     duplicates), forms the posterior and the tempered target on U plus the tail bucket (docs/MATH.md),
  3. computes the divergence over the categories, g_c and ḡ = Σ s_c g_c,
  4. streams V again writing grad_v = (1/T)·s_v·(g_B − ḡ) (bucket) or 0 (ignore), then, after a barrier,
     overwrites the |U| listed entries with (1/T)·s_u·(g_u − ḡ).
No [N, V] probability tensor is ever built; with `inplace=True` the gradient overwrites the logits, so the
whole op needs no [N, V] buffer of its own (the logits must not be used by anything else afterwards).

All math is fp32 inside the kernel (loads are cast), whatever the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MODE_CODES = {"none": 0, "log_linear": 1, "mixture": 2}
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_kl": 3, "tvd": 4}
TAILS = ("bucket", "ignore")
TARGET_FLOOR = 1e-12  # docs/MATH.md: target floor where log p is needed (reverse KL)


@triton.jit
def _lse3(x0, xq, xy):
    """log-sum-exp of two vectors and one scalar (the three parts of the union); -inf entries are absent."""
    m = tl.maximum(tl.maximum(tl.max(x0, axis=0), tl.max(xq, axis=0)), xy)
    m = tl.where(m == float("-inf"), 0.0, m)  # all absent: avoid -inf - -inf
    s = tl.sum(tl.exp(x0 - m), axis=0) + tl.sum(tl.exp(xq - m), axis=0) + tl.exp(xy - m)
    return m + tl.log(s)


@triton.jit
def _scaled(x, c):
    # c * log p with the convention p^0 = 1 (so 0 * -inf = 0, not NaN)
    return tl.where(c == 0.0, 0.0, c * x)


@triton.jit
def _combine(lp0, lq, a, b, w, MODE: tl.constexpr):
    """Unnormalised log posterior at one token from log p0 and log q (MATH.md, Combination)."""
    if MODE == 0:
        out = lp0
    elif MODE == 1:
        out = _scaled(lp0, a) + _scaled(lq, b)
    else:
        out = tl.log(w * tl.exp(lp0) + (1.0 - w) * tl.exp(lq))
    return out


@triton.jit
def _logaddexp(x, y):
    m = tl.maximum(x, y)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(tl.exp(x - m) + tl.exp(y - m))


@triton.jit
def _div_terms(lp, ls, valid, beta, DIV: tl.constexpr):
    """Per category: the loss term and s_c * g_c (product form, so s_c = 0 or p_c = 0 never gives inf * 0)."""
    p = tl.exp(lp)
    s = tl.exp(ls)
    if DIV == 0:  # forward KL: g = -p/s
        term = tl.where(p > 0, p * (lp - ls), 0.0)
        sg = -p
    elif DIV == 1:  # reverse KL: g = log(s/p) + 1, target floored at 1e-12
        lpf = tl.maximum(lp, -27.631021115928547)
        term = s * (ls - lpf)
        sg = s * (ls - lpf + 1.0)
    elif DIV == 2:  # generalised JSD, 0 < beta < 1 (the launcher maps beta 0 / 1 to forward / reverse KL)
        lm = _logaddexp(tl.log(1.0 - beta) + ls, tl.log(beta) + lp)
        ks = tl.where(s > 0, s * (ls - lm), 0.0)
        term = beta * tl.where(p > 0, p * (lp - lm), 0.0) + (1.0 - beta) * ks
        sg = (1.0 - beta) * ks
    elif DIV == 3:  # skew KL, alpha = beta: m = alpha p + (1 - alpha) s, g = -(1 - alpha) p / m
        lm = _logaddexp(tl.log(beta) + lp, tl.log(1.0 - beta) + ls)
        term = tl.where(p > 0, p * (lp - lm), 0.0)
        sg = -(1.0 - beta) * tl.where(p > 0, p * tl.exp(ls - lm), 0.0)
    else:  # total variation: g = sign(s - p) / 2
        term = 0.5 * tl.abs(p - s)
        sg = 0.5 * s * tl.where(s > p, 1.0, tl.where(s < p, -1.0, 0.0))
    return tl.where(valid, term, 0.0), tl.where(valid, sg, 0.0)


@triton.jit
def sparse_kd_kernel(
    z_ptr, z_stride, g_ptr, g_stride, loss_ptr,
    i0_ptr, l0_ptr, t0_ptr, K0,
    iq_ptr, lq_ptr, tq_ptr, KQ,
    ql_ptr, ql_stride,
    w_ptr, y_ptr, mask_ptr, bad_ptr,
    V, a, b, evidence, beta, inv_t,
    MODE: tl.constexpr, ONLINE: tl.constexpr, DIV: tl.constexpr, BUCKET: tl.constexpr,
    HAS_Y: tl.constexpr, HAS_MASK: tl.constexpr, TEMPERED: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    CHECK: tl.constexpr, K0P: tl.constexpr, KQP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at N*V > 2^31
    z_row = z_ptr + row * z_stride
    g_row = g_ptr + row * g_stride
    offs = tl.arange(0, BLOCK_V)

    # ---- pass 1: online log-sum-exp of z/T (and of the proxy logits in online mode) -------------------------
    m = NEG_INF
    S = 0.0
    mq = NEG_INF
    Sq1 = 0.0  # sum exp(l - mq)
    Sqb = 0.0  # sum exp(b (l - mq)), for the log-linear normaliser q^b
    n_bad = 0  # NaN/inf count, checked here so validation costs no extra pass over the logits
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        x = tl.load(z_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
        if CHECK:
            n_bad += tl.sum((inb & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32), axis=0)
        x = x * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=0))
        S = S * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if ONLINE:
            xq = tl.load(ql_ptr + row * ql_stride + cols, mask=inb, other=NEG_INF).to(tl.float32)
            if CHECK:
                n_bad += tl.sum((inb & ((xq != xq) | (tl.abs(xq) == float("inf")))).to(tl.int32), axis=0)
            mq_new = tl.maximum(mq, tl.max(xq, axis=0))
            Sq1 = Sq1 * tl.exp(mq - mq_new) + tl.sum(tl.exp(xq - mq_new), axis=0)
            if MODE == 1:
                Sqb = Sqb * tl.exp(b * (mq - mq_new)) + tl.sum(tl.exp(b * (xq - mq_new)), axis=0)
            mq = mq_new
    lse = m + tl.log(S)
    if CHECK:
        tl.store(bad_ptr + row, n_bad)

    # ---- the union support: prior slots, proxy slots not already in the prior, and the teacher token ---------
    o0 = tl.arange(0, K0P)
    i0 = tl.load(i0_ptr + row * K0 + o0, mask=o0 < K0, other=-1)
    v0 = (i0 >= 0) & (i0 < V)
    l0 = tl.load(l0_ptr + row * K0 + o0, mask=v0, other=NEG_INF).to(tl.float32)
    n0 = tl.sum(v0.to(tl.int32), axis=0)
    t0 = tl.load(t0_ptr + row).to(tl.float32)
    logtau0 = tl.where(V - n0 > 0, tl.log(t0) - tl.log((V - n0).to(tl.float32)), NEG_INF)

    oq = tl.arange(0, KQP)
    if MODE != 0 and not ONLINE:
        iq = tl.load(iq_ptr + row * KQ + oq, mask=oq < KQ, other=-1)
        vq = (iq >= 0) & (iq < V)
        lq = tl.load(lq_ptr + row * KQ + oq, mask=vq, other=NEG_INF).to(tl.float32)
        nq = tl.sum(vq.to(tl.int32), axis=0)
        tq = tl.load(tq_ptr + row).to(tl.float32)
        logtauq = tl.where(V - nq > 0, tl.log(tq) - tl.log((V - nq).to(tl.float32)), NEG_INF)
        eq = (i0[:, None] == iq[None, :]) & v0[:, None] & vq[None, :]  # [K0P, KQP]
        hit0 = tl.max(eq.to(tl.int32), axis=1) > 0
        lq0 = tl.where(hit0, tl.max(tl.where(eq, lq[None, :], NEG_INF), axis=1), logtauq)
        vq = vq & (tl.max(eq.to(tl.int32), axis=0) == 0)  # drop proxy entries already listed by the prior
    else:
        iq = tl.full([KQP], -1, tl.int32)
        vq = iq >= 0
        lq = tl.full([KQP], NEG_INF, tl.float32)
        logtauq = NEG_INF
        lq0 = tl.full([K0P], NEG_INF, tl.float32)
        if ONLINE:
            lq0 = tl.load(ql_ptr + row * ql_stride + i0, mask=v0, other=NEG_INF).to(tl.float32) - mq - tl.log(Sq1)

    if HAS_Y:
        y = tl.load(y_ptr + row).to(tl.int32)
        y_ok = (y >= 0) & (y < V)
        y_listed = tl.sum((v0 & (i0 == y)).to(tl.int32), axis=0) + tl.sum((vq & (iq == y)).to(tl.int32), axis=0)
        yv = y_ok & (y_listed == 0)
        y_safe = tl.where(y_ok, y, 0)
    else:
        y = tl.program_id(0) * 0 - 1  # a tensor, so the code below needs no second version
        y_ok = y >= 0
        yv = y_ok
        y_safe = y * 0
    if ONLINE:
        lqy = tl.load(ql_ptr + row * ql_stride + y_safe).to(tl.float32) - mq - tl.log(Sq1)
    else:
        lqy = logtauq
    R = V - n0 - tl.sum(vq.to(tl.int32), axis=0) - yv.to(tl.int32)
    logR = tl.where(R > 0, tl.log(R.to(tl.float32)), NEG_INF)

    w = 0.0
    if MODE == 2:
        w = tl.load(w_ptr + row).to(tl.float32)

    # ---- posterior on U and its outside mass (MATH.md, Combination) ------------------------------------------
    c0 = tl.where(v0, _combine(l0, lq0, a, b, w, MODE), NEG_INF)
    cq = tl.where(vq, _combine(logtau0, lq, a, b, w, MODE), NEG_INF)
    cy = tl.where(yv, _combine(logtau0, lqy, a, b, w, MODE), NEG_INF)
    if ONLINE:
        # outside U the proxy is not uniform: its exact mass there is the total minus the U part, both measured
        # against the same max so the difference is as accurate as fp32 allows
        lqU0 = tl.load(ql_ptr + row * ql_stride + i0, mask=v0, other=NEG_INF).to(tl.float32) - mq
        lqUy = tl.load(ql_ptr + row * ql_stride + y_safe).to(tl.float32) - mq
        if MODE == 1:
            qbU = tl.sum(tl.exp(b * lqU0), axis=0) + tl.where(yv, tl.exp(b * lqUy), 0.0)
            qb_out = tl.maximum(Sqb - qbU, 0.0)
            out_log = tl.where(R > 0, _scaled(logtau0, a) + tl.log(qb_out) - b * tl.log(Sq1), NEG_INF)
        else:
            qU = tl.sum(tl.exp(lqU0), axis=0) + tl.where(yv, tl.exp(lqUy), 0.0)
            q_out = tl.maximum(Sq1 - qU, 0.0) / Sq1
            out_log = tl.log(w * tl.where(R > 0, R.to(tl.float32), 0.0) * tl.exp(logtau0) + (1.0 - w) * q_out)
    else:
        out_log = logR + _combine(logtau0, logtauq, a, b, w, MODE)
    if MODE == 1:  # log-linear is normalised over all V
        logZ = _logaddexp(_lse3(c0, cq, cy), out_log)
        c0 = c0 - logZ
        cq = cq - logZ
        cy = cy - logZ
        out_log = out_log - logZ

    # teacher-token evidence: p <- (p + e δ_y) / (1 + e)
    if HAS_Y:
        use_e = y_ok & (evidence > 0)
        l1pe = tl.where(use_e, tl.log(1.0 + evidence), 0.0)
        c0 = tl.where(use_e & v0 & (i0 == y), tl.log(tl.exp(c0) + evidence), c0) - l1pe
        cq = tl.where(use_e & vq & (iq == y), tl.log(tl.exp(cq) + evidence), cq) - l1pe
        cy = tl.where(use_e & yv, tl.log(tl.exp(cy) + evidence), cy) - l1pe
        out_log = out_log - l1pe

    # tempered target: p_T(u) ∝ p(u)^(1/T); each of the R outside tokens ∝ (tail/R)^(1/T)
    if TEMPERED:
        c0 = c0 * inv_t
        cq = cq * inv_t
        cy = cy * inv_t
        out_log = tl.where(R > 0, logR + (out_log - logR) * inv_t, NEG_INF)
        logZT = _logaddexp(_lse3(c0, cq, cy), out_log)
        c0 = c0 - logZT
        cq = cq - logZT
        cy = cy - logZT
        out_log = out_log - logZT

    # ---- student on the categories -------------------------------------------------------------------------
    zu0 = tl.load(z_row + i0, mask=v0, other=0.0).to(tl.float32) * inv_t
    zuq = tl.load(z_row + iq, mask=vq, other=0.0).to(tl.float32) * inv_t
    zuy = tl.load(z_row + y_safe).to(tl.float32) * inv_t
    zu0 = tl.where(v0, zu0, NEG_INF)
    zuq = tl.where(vq, zuq, NEG_INF)
    zuy = tl.where(yv, zuy, NEG_INF)
    if BUCKET:
        ls0 = zu0 - lse
        lsq = zuq - lse
        lsy = zuy - lse
        # s_B = 1 - Σ_U s_u, formed as (S - S_U) / S against the same max: no cancellation beyond fp32 rounding
        SU = tl.sum(tl.exp(zu0 - m), axis=0) + tl.sum(tl.exp(zuq - m), axis=0) + tl.exp(zuy - m)
        sB = tl.maximum(tl.maximum(S - SU, 0.0) / S, 1e-30)
        lsB = tl.log(sB)
    else:  # tail="ignore": both renormalised over U
        lseU = _lse3(zu0, zuq, zuy)
        ls0 = zu0 - lseU
        lsq = zuq - lseU
        lsy = zuy - lseU
        lpU = _lse3(c0, cq, cy)
        c0 = c0 - lpU
        cq = cq - lpU
        cy = cy - lpU

    term0, sg0 = _div_terms(c0, ls0, v0, beta, DIV)
    termq, sgq = _div_terms(cq, lsq, vq, beta, DIV)
    termy, sgy = _div_terms(cy, lsy, yv, beta, DIV)
    loss = tl.sum(term0, axis=0) + tl.sum(termq, axis=0) + termy
    gbar = tl.sum(sg0, axis=0) + tl.sum(sgq, axis=0) + sgy
    if BUCKET:
        termB, sgB = _div_terms(out_log, lsB, R > 0, beta, DIV)
        loss += termB
        gbar += sgB
        gB = sgB / sB
    if HAS_MASK:
        row_on = tl.load(mask_ptr + row) != 0
    else:
        row_on = row >= 0
    tl.store(loss_ptr + row, tl.where(row_on, loss, 0.0))

    # ---- pass 2: gradient everywhere, then the fix-ups on U --------------------------------------------------
    if COMPUTE_GRAD:
        gbar = tl.where(row_on, gbar, 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inb = cols < V
            if BUCKET:
                x = tl.load(z_row + cols, mask=inb, other=NEG_INF).to(tl.float32) * inv_t
                s = tl.exp(x - lse)
                # s_v g_B = p-ish mass share; it can never exceed |s_B g_B| in exact arithmetic: clamp so a
                # rounded-down s_B cannot blow it up
                sgv = tl.minimum(tl.maximum(s * gB, -tl.abs(sgB)), tl.abs(sgB))
                gv = tl.where(row_on, (sgv - s * gbar) * inv_t, 0.0)
            else:
                gv = tl.zeros([BLOCK_V], tl.float32)
            tl.store(g_row + cols, gv.to(g_ptr.dtype.element_ty), mask=inb)
        tl.debug_barrier()  # the fix-ups below must land after the pass-2 stores to the same addresses
        g0 = tl.where(row_on, (sg0 - tl.exp(ls0) * gbar) * inv_t, 0.0)
        gq = tl.where(row_on, (sgq - tl.exp(lsq) * gbar) * inv_t, 0.0)
        gy = tl.where(row_on, (sgy - tl.exp(lsy) * gbar) * inv_t, 0.0)
        tl.store(g_row + i0, g0.to(g_ptr.dtype.element_ty), mask=v0)
        tl.store(g_row + iq, gq.to(g_ptr.dtype.element_ty), mask=vq)
        tl.store(g_row + y_safe, gy.to(g_ptr.dtype.element_ty), mask=yv)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _validate(student_logits, prior, proxy, proxy_logits, teacher_tokens, w_rows, mask, check_finite: bool) -> list:
    n, v = student_logits.shape
    for name, (idx, lp, tail) in (("prior", prior), ("proxy", proxy)):
        if idx is None:
            continue
        if idx.dim() != 2 or idx.shape[0] != n or lp.shape != idx.shape or tail.shape != (n,):
            raise ValueError(f"{name}: indices {tuple(idx.shape)}, logprobs {tuple(lp.shape)}, tail "
                             f"{tuple(tail.shape)} do not match N={n} rows of [N, K] / [N]")
        if idx.shape[1] > v:
            raise ValueError(f"{name}: K={idx.shape[1]} is larger than the vocabulary size V={v}")
    if proxy_logits is not None and proxy_logits.shape != student_logits.shape:
        raise ValueError(f"proxy_logits {tuple(proxy_logits.shape)} must match student_logits {(n, v)}")
    for name, t in (("teacher_tokens", teacher_tokens), ("w_rows", w_rows), ("mask", mask)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({n},)")
    if not check_finite:
        return []
    # the [N, V] logits are checked inside the kernel (pass 1); here only the small targets. The flags are
    # read after the kernel, together with its own, so the whole check costs one host sync
    checks = []
    for name, (idx, lp, tail) in (("prior", prior), ("proxy", proxy)):
        if idx is None:
            continue
        lpf = lp.float()
        checks.append((f"{name} logprobs", ~(torch.isnan(lpf) | (lpf == float("inf"))).any()))
        checks.append((f"{name} tail", torch.isfinite(tail).all()))
        checks.append((f"{name} indices", ((idx >= -1) & (idx < v)).all()))
    if w_rows is not None:
        checks.append(("w_rows", torch.isfinite(w_rows).all()))
    return checks


def _raise_on_bad(checks, bad: torch.Tensor, proxy_logits) -> None:
    flags = torch.cat([torch.stack([c for _, c in checks]).to(torch.int32) if checks else bad[:0],
                       (bad > 0).any().to(torch.int32)[None] ^ 1]).cpu().tolist()  # 1 = fine
    for (name, _), ok in zip(checks, flags):
        if not ok:
            what = "indices outside [-1, V)" if name.endswith("indices") else "NaN or infinite values"
            raise ValueError(f"triton_fused_posterior_kd: {name} contains {what}")
    if not flags[-1]:
        row = int(bad.nonzero()[0, 0])
        what = ("proxy_logits" if proxy_logits is not None and not bool(torch.isfinite(proxy_logits[row]).all())
                else "student_logits")
        raise ValueError(f"triton_fused_posterior_kd: NaN or infinite values in {what} (row {row})")


def sparse_kd_forward(
    student_logits: torch.Tensor, prior_idx, prior_logp, prior_tail, proxy_idx=None, proxy_logp=None,
    proxy_tail=None, proxy_logits=None, *, mode: str = "log_linear", a: float = 1.0, b: float = 1.0,
    w_rows=None, teacher_tokens=None, evidence: float = 0.0, divergence: str = "forward_kl", beta: float = 0.5,
    temperature: float = 1.0, mask=None, tail: str = "bucket", inplace: bool = False, compute_grad: bool = True,
    check_finite: bool = True, grad_out: torch.Tensor | None = None, block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel (no autograd). Returns (loss [N] fp32, grad w.r.t. student_logits or None).

    `grad_out` (a preallocated [N, V] buffer) and `block_v` exist for tests and the fused-linear op.
    """
    if mode not in MODE_CODES:
        raise ValueError(f"mode must be one of {sorted(MODE_CODES)}, got {mode!r}")
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCE_CODES)}, got {divergence!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    online = proxy_logits is not None
    if mode == "none":
        if online or proxy_idx is not None:
            raise ValueError('mode="none" uses the prior alone: pass no proxy')
    elif not online and proxy_idx is None:
        raise ValueError(f"mode={mode!r} needs a sparse proxy (proxy_idx/logp/tail) or dense proxy_logits")
    elif online and proxy_idx is not None:
        raise ValueError("pass either a sparse proxy or dense proxy_logits, not both")
    if mode == "mixture" and w_rows is None:
        raise ValueError('mode="mixture" needs w_rows (the per-row mixture weight)')
    if online and mode == "log_linear" and b < 0:
        raise ValueError(f"online log-linear needs b >= 0, got {b}")
    if evidence < 0:
        raise ValueError(f"evidence must be >= 0, got {evidence}")
    if evidence > 0 and teacher_tokens is None:
        raise ValueError("evidence > 0 needs teacher_tokens")
    div = DIVERGENCE_CODES[divergence]
    if divergence == "jsd" and beta <= 0.0:
        div = DIVERGENCE_CODES["forward_kl"]  # TRL/Liger convention: jsd β=0 is forward KL, β=1 reverse KL
    elif divergence == "jsd" and beta >= 1.0:
        div = DIVERGENCE_CODES["reverse_kl"]
    if divergence == "skew_kl" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"skew_kl needs 0 <= alpha <= 1, got {beta}")

    z = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    n, v = z.shape
    proxy = (proxy_idx, proxy_logp, proxy_tail)
    checks = _validate(z, (prior_idx, prior_logp, prior_tail), proxy, proxy_logits, teacher_tokens, w_rows, mask,
                       check_finite)

    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    if compute_grad:
        grad = z if inplace else (grad_out if grad_out is not None else torch.empty_like(z))
    else:
        grad = loss  # never written (COMPUTE_GRAD=False)
    if n == 0:
        return loss, grad if compute_grad else None

    k0 = prior_idx.shape[1]
    kq = proxy_idx.shape[1] if proxy_idx is not None else 1
    dummy = loss
    prior_idx = prior_idx.to(torch.int32).contiguous()
    prior_logp = prior_logp.contiguous()
    prior_tail = prior_tail.float().contiguous()
    ql = proxy_logits if proxy_logits is None or proxy_logits.stride(-1) == 1 else proxy_logits.contiguous()
    if block_v is None:  # measured on an H100: large blocks amortise the per-block reductions of pass 1
        block_v = min(16384, _next_pow2(v))
    if num_warps is None:
        num_warps = 16 if block_v >= 16384 else 8 if block_v >= 4096 else 4
    bad = torch.zeros(n if check_finite else 1, dtype=torch.int32, device=z.device)
    sparse_kd_kernel[(n,)](
        z, z.stride(0), grad, grad.stride(0) if compute_grad else 0, loss,
        prior_idx, prior_logp, prior_tail, k0,
        proxy_idx.to(torch.int32).contiguous() if proxy_idx is not None else dummy,
        proxy_logp.contiguous() if proxy_logp is not None else dummy,
        proxy_tail.float().contiguous() if proxy_tail is not None else dummy, kq,
        ql if ql is not None else dummy, ql.stride(0) if ql is not None else 0,
        w_rows.float().contiguous() if w_rows is not None else dummy,
        teacher_tokens.to(torch.int32).contiguous() if teacher_tokens is not None else dummy,
        mask.to(torch.int8).contiguous() if mask is not None else dummy, bad,
        v, float(a), float(b), float(evidence), float(beta), 1.0 / float(temperature),
        MODE=MODE_CODES[mode], ONLINE=online, DIV=div, BUCKET=tail == "bucket",
        HAS_Y=teacher_tokens is not None, HAS_MASK=mask is not None, TEMPERED=float(temperature) != 1.0,
        COMPUTE_GRAD=compute_grad, CHECK=check_finite, K0P=max(16, _next_pow2(k0)), KQP=max(16, _next_pow2(kq)), BLOCK_V=block_v,
        num_warps=num_warps,
    )
    if check_finite:
        _raise_on_bad(checks, bad, ql)
    return loss, grad if compute_grad else None


class SparseKDFunction(torch.autograd.Function):
    """Per-row loss; the gradient is computed in the forward pass and only scaled in backward."""

    @staticmethod
    def forward(ctx, student_logits, prior_idx, prior_logp, prior_tail, proxy_idx, proxy_logp, proxy_tail,
                proxy_logits, kwargs):
        loss, grad = sparse_kd_forward(
            student_logits, prior_idx, prior_logp, prior_tail, proxy_idx, proxy_logp, proxy_tail, proxy_logits,
            compute_grad=student_logits.requires_grad, **kwargs)
        ctx.save_for_backward(grad.detach() if grad is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 9
        # skip the [N, V] multiply when the upstream gradient is a broadcast 1 (e.g. loss.sum())
        if grad_output.stride(0) == 0 and grad_output.numel() > 0:
            if grad_output[0].item() != 1.0:
                grad.mul_(grad_output[0].to(grad.dtype))
        else:
            grad.mul_(grad_output[:, None].to(grad.dtype))
        return (grad,) + (None,) * 8


def triton_fused_posterior_kd(
    student_logits: torch.Tensor, prior_idx: torch.Tensor, prior_logp: torch.Tensor, prior_tail: torch.Tensor,
    proxy_idx: torch.Tensor | None = None, proxy_logp: torch.Tensor | None = None,
    proxy_tail: torch.Tensor | None = None, proxy_logits: torch.Tensor | None = None, *,
    mode: str = "log_linear", a: float = 1.0, b: float = 1.0, w_rows: torch.Tensor | None = None,
    teacher_tokens: torch.Tensor | None = None, evidence: float = 0.0, divergence: str = "forward_kl",
    beta: float = 0.5, temperature: float = 1.0, mask: torch.Tensor | None = None, tail: str = "bucket",
    inplace: bool = False, check_finite: bool = True, _block_v: int | None = None,
) -> torch.Tensor:
    """Per-row loss (float32 [N]) of the posterior target (docs/MATH.md) against softmax(student_logits / T).

    Differentiable w.r.t. `student_logits` only (targets are constants). With `inplace=True` the gradient is
    written into `student_logits` during the forward pass (no extra [N, V] buffer): the logits' values are
    gone afterwards, so nothing else may read them (compute any other loss on them first).
    `beta` is the resolved β of jsd or α of skew_kl. NaN/inf inputs raise ValueError unless
    `check_finite=False`; the logits are checked inside the kernel's first pass (the error is raised after the
    kernel ran, so with inplace=True the logits are already overwritten), the targets with small reductions;
    one host sync in all.
    """
    kwargs = dict(mode=mode, a=a, b=b, w_rows=w_rows, teacher_tokens=teacher_tokens, evidence=evidence,
                  divergence=divergence, beta=beta, temperature=temperature, mask=mask, tail=tail,
                  inplace=inplace, check_finite=check_finite, block_v=_block_v)
    return SparseKDFunction.apply(student_logits, prior_idx, prior_logp, prior_tail, proxy_idx, proxy_logp,
                                  proxy_tail, proxy_logits, kwargs)
