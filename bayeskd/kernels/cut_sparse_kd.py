"""Cut-logits sparse KD: lm_head + posterior sparse KD without ever writing the [N, V] student logits.

As Cut Cross-Entropy does for CE, the logits exist only as [BLOCK_N, BLOCK_V] tiles in on-chip memory:
  forward   `lse_kernel`: tiles of (hidden @ weight.T + bias) / T and, per row, an online max and sum over one
            split of V (splits run in parallel; the host merges their [N, splits] partials);
            `gather_kernel`: the student's logits at the union support U, one dot product per listed entry.
  head      the posterior on U, the divergence and the gradient's coefficients, from the row's (max, sum), the
            gathered logits and the sparse targets. That is [N, |U|] work, done by a callable (the PyTorch head of
            bayeskd.losses.linear), so every mode and divergence of the fused kernel runs on the same math.
  backward  `dense_bwd_kernel`: recompute each tile, form the gradient w.r.t. its logits,
                d_v = clamp(s_v gB, ±cap) - s_v ḡ        (the tail bucket's share of every token, docs/MATH.md)
            and add d @ weight to grad_hidden and d.T @ hidden to grad_weight (fp32 atomics);
            `sparse_bwd_kernel`: the corrections e_u at the listed entries (from the head), gathered rows.
The coefficients (gB, cap, ḡ, e) carry 1/T and the upstream gradient, so backward needs nothing else.
grad_weight accumulates in fp32: into the gradient itself for an fp32 weight, else in vocabulary slabs of at most
`SLAB_BYTES` that are cast into the weight's dtype one after another, so the extra memory stays one slab plus an
fp32 [N, H] for grad_hidden instead of an fp32 copy of the whole [V, H].
With tail="ignore" nothing outside U has a gradient: the dense backward pass is skipped.
CCE's gradient filtering (skipping tiles whose softmax is below bf16 resolution) is not used: with a tail bucket
every token carries gradient s_v (gB - ḡ); only tiles whose coefficients are exactly 0 (masked rows) are skipped.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import triton
import triton.language as tl

SLAB_BYTES = 128 << 20  # fp32 grad_weight accumulator per slab of the vocabulary (non-fp32 weights)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    # acc + a @ b. fp32 inputs (and the interpreter, which cannot do bf16 math): exact fp32 products, no TF32
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rok, cok, H, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of hidden @ weight.T (+ bias); rows/cols outside the masks read zeros."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        kok = ks < H
        hb = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rok[:, None] & kok[None, :], other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cok[:, None] & kok[None, :], other=0.0)
        acc = _dot(hb, tl.trans(wb), acc, DOT_FP32)  # the accumulating form lets Triton pipeline the loads
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def lse_kernel(h_ptr, w_ptr, b_ptr, m_ptr, s_ptr, m1_ptr, s1_ptr, bad_ptr, N, V, H, stride_h, stride_w, v_per_split,
                splits, inv_t, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, CHECK: tl.constexpr, TWO: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per row and split: max and sum of exp(z/T - max); with TWO also of z itself (temperature 1, for a CE)."""
    pid_s = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rok = rows < N
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    S = tl.zeros([BLOCK_N], dtype=tl.float32)
    m1 = tl.full([BLOCK_N], float("-inf"), tl.float32)
    S1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_bad = tl.zeros([BLOCK_N], dtype=tl.int32)
    start = pid_s * v_per_split
    end = tl.minimum(start + v_per_split, V)
    for v in range(start, end, BLOCK_V):
        cols = (v + tl.arange(0, BLOCK_V)).to(tl.int64)
        cok = cols < end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rok, cok, H, stride_h, stride_w, HAS_BIAS, DOT_FP32,
                         BLOCK_N, BLOCK_V, BLOCK_H)
        if CHECK:  # NaN/inf in hidden or weight show up here; checked on the host after the launch
            n_bad += tl.sum((cok[None, :] & ((z != z) | (tl.abs(z) == float("inf")))).to(tl.int32), axis=1)
        x = tl.where(cok[None, :], z * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        S = S * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
        if TWO:
            x1 = tl.where(cok[None, :], z, float("-inf"))
            m1_new = tl.maximum(m1, tl.max(x1, axis=1))
            m1_safe = tl.where(m1_new == float("-inf"), 0.0, m1_new)
            S1 = S1 * tl.exp(m1 - m1_safe) + tl.sum(tl.exp(x1 - m1_safe[:, None]), axis=1)
            m1 = m1_new
    out = rows * splits + pid_s
    tl.store(m_ptr + out, m, mask=rok)
    tl.store(s_ptr + out, S, mask=rok)
    if TWO:
        tl.store(m1_ptr + out, m1, mask=rok)
        tl.store(s1_ptr + out, S1, mask=rok)
    if CHECK:
        tl.store(bad_ptr + out, n_bad, mask=rok)


@triton.jit
def gather_kernel(h_ptr, w_ptr, b_ptr, idx_ptr, out_ptr, H, J, stride_h, stride_w,
                   HAS_BIAS: tl.constexpr, JP: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r, j] = hidden[r] · weight[idx[r, j]] (+ bias), 0 where idx < 0."""
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, JP)
    idx = tl.load(idx_ptr + row * J + o, mask=o < J, other=-1).to(tl.int64)
    ok = idx >= 0
    acc = tl.zeros([JP], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        kok = ks < H
        hb = tl.load(h_ptr + row * stride_h + ks, mask=kok, other=0.0).to(tl.float32)
        wb = tl.load(w_ptr + idx[:, None] * stride_w + ks[None, :], mask=ok[:, None] & kok[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(wb * hb[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * J + o, acc, mask=o < J)


@triton.jit
def dense_bwd_kernel(h_ptr, w_ptr, b_ptr, lse_ptr, gb_ptr, cap_ptr, gbar_ptr, lse1_ptr, c1_ptr, gh_ptr, gw_ptr,
                      gbias_ptr, N, H, v0, v1, stride_h, stride_w, inv_t,
                      HAS_BIAS: tl.constexpr, DO_H: tl.constexpr, DO_W: tl.constexpr, DO_B: tl.constexpr,
                      TWO: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (v0 + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    rok = rows < N
    cok = cols < v1
    gB = tl.load(gb_ptr + rows, mask=rok, other=0.0)
    cap = tl.load(cap_ptr + rows, mask=rok, other=0.0)
    gbar = tl.load(gbar_ptr + rows, mask=rok, other=0.0)
    if TWO:
        c1 = tl.load(c1_ptr + rows, mask=rok, other=0.0)
    else:
        c1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    if tl.max(tl.abs(gB) + tl.abs(gbar) + tl.abs(c1), axis=0) > 0:  # tiles of masked rows have no gradient
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rok, cok, H, stride_h, stride_w, HAS_BIAS, DOT_FP32,
                         BLOCK_N, BLOCK_V, BLOCK_H)
        lse = tl.load(lse_ptr + rows, mask=rok, other=0.0)
        s = tl.where(rok[:, None] & cok[None, :], tl.exp(z * inv_t - lse[:, None]), 0.0)
        d = tl.minimum(tl.maximum(s * gB[:, None], -cap[:, None]), cap[:, None]) - s * gbar[:, None]
        if TWO:  # a second loss at temperature 1 (CE when the KD's T is not 1): + c1 softmax(z)
            lse1 = tl.load(lse1_ptr + rows, mask=rok, other=0.0)
            d += tl.where(rok[:, None] & cok[None, :], tl.exp(z - lse1[:, None]), 0.0) * c1[:, None]
        if DO_B:
            tl.atomic_add(gbias_ptr + cols, tl.sum(d, axis=0), mask=cok)
        if not DOT_FP32:
            d = d.to(h_ptr.dtype.element_ty)  # tensor-core operands, as the logits' own gradient would be
        for k in range(0, H, BLOCK_H):
            ks = k + tl.arange(0, BLOCK_H)
            kok = ks < H
            if DO_H:
                wb = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cok[:, None] & kok[None, :],
                             other=0.0)
                tl.atomic_add(gh_ptr + rows[:, None] * H + ks[None, :], _dot(d, wb, None, DOT_FP32),
                              mask=rok[:, None] & kok[None, :])
            if DO_W:
                hb = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rok[:, None] & kok[None, :],
                             other=0.0)
                tl.atomic_add(gw_ptr + (cols - v0)[:, None] * H + ks[None, :], _dot(tl.trans(d), hb, None, DOT_FP32),
                              mask=cok[:, None] & kok[None, :])


@triton.jit
def sparse_bwd_kernel(h_ptr, w_ptr, idx_ptr, e_ptr, gh_ptr, gw_ptr, gbias_ptr, H, J, v0, v1, stride_h, stride_w,
                       DO_B: tl.constexpr, DO_H: tl.constexpr, DO_W: tl.constexpr,
                       JP: tl.constexpr, BLOCK_H: tl.constexpr):
    """The listed entries' corrections: grad_hidden[r] += Σ_j e_rj weight[idx_rj] (DO_H: one program per row
    owns its row, no atomics) and grad_weight[idx_rj] += e_rj hidden[r] for idx in the slab [v0, v1)."""
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, JP)
    idx = tl.load(idx_ptr + row * J + o, mask=o < J, other=-1).to(tl.int64)
    e = tl.load(e_ptr + row * J + o, mask=o < J, other=0.0)
    ok = idx >= 0
    in_slab = ok & (idx >= v0) & (idx < v1)
    if DO_B:  # the bias gradient is a full-V fp32 buffer: the launcher sets this in the first slab only
        tl.atomic_add(gbias_ptr + idx, e, mask=ok)
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        kok = ks < H
        if DO_H:
            wb = tl.load(w_ptr + idx[:, None] * stride_w + ks[None, :], mask=ok[:, None] & kok[None, :],
                         other=0.0).to(tl.float32)
            gh = tl.load(gh_ptr + row * H + ks, mask=kok, other=0.0)
            tl.store(gh_ptr + row * H + ks, gh + tl.sum(e[:, None] * wb, axis=0), mask=kok)
        if DO_W:
            hb = tl.load(h_ptr + row * stride_h + ks, mask=kok, other=0.0).to(tl.float32)
            tl.atomic_add(gw_ptr + (idx - v0)[:, None] * H + ks[None, :], e[:, None] * hb[None, :],
                          mask=in_slab[:, None] & kok[None, :])


# ------------------------------------------------------------------------------------------------ launchers

def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_blocks(dtype: torch.dtype, aligned: bool = True, two: bool = False) -> dict[str, int]:
    """Tiles of the matmul kernels; small under the interpreter (its cost is per element). On a GPU (not timed
    yet): 128 x 128 x 64 with 8 warps, a usual Hopper bf16 GEMM tile, which sm_90 compiles without register spills
    (benchmarks/compile_check.py); 128 rows halve grad_weight's atomic adds against 64. `aligned`: the hidden size,
    the row strides and the pointers are multiples of 16, which the JIT specialises for (pipelined, vectorised
    loads); otherwise 128 x 128 x 64 spills and 64 x 128 x 32 does not. `two`: the forward kernel keeping a second
    (max, sum) at temperature 1, which spills at 128 rows (64 do not). fp32 runs full-precision dots on CUDA cores
    and needs smaller tiles."""
    if _interpreting():
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=4)
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, num_warps=8)
    if not aligned:
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8)
    return dict(BLOCK_N=64 if two else 128, BLOCK_V=128, BLOCK_H=64, num_warps=8)


def _aligned(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the JIT will see 16-divisible hidden size, strides and pointers (see `pick_blocks`)."""
    vals = (hidden.shape[1], hidden.stride(0), weight.stride(0), hidden.data_ptr(), weight.data_ptr())
    return all(x % 16 == 0 for x in vals)


def row_blocks(j: int, aligned: bool = True) -> dict[str, int]:
    """The per-row kernels (gather, sparse backward): J slots padded to JP, [JP, BLOCK_H] tiles of at most 8192
    elements (2048 unaligned: without vectorised loads the same tiles spill)."""
    jp = max(16, _next_pow2(j))
    return dict(JP=jp, BLOCK_H=16 if _interpreting() else max(16, min(128, (8192 if aligned else 2048) // jp)),
                num_warps=4)


def _splits(n_row_blocks: int, v_blocks: int, device: torch.device) -> int:
    """How many parallel splits of V the forward pass uses: enough programs to fill the GPU ~4 times over."""
    if device.type != "cuda":
        return min(2, v_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_blocks, math.ceil(4 * sms / max(1, n_row_blocks))))


def row_stats(hidden, weight, bias, temperature: float, *, check_finite: bool = True, blocks=None, splits=None,
              with_t1: bool = False):
    """(max, sum) per row of z/T, z = hidden @ weight.T + bias: logsumexp(z/T) = max + log(sum). `with_t1`: also
    (max, sum) of z itself, from the same tiles: (max, sum, max1, sum1)."""
    n, h = hidden.shape
    v = weight.shape[0]
    bs = blocks or pick_blocks(hidden.dtype, _aligned(hidden, weight), two=with_t1)
    nb, vb = triton.cdiv(n, bs["BLOCK_N"]), triton.cdiv(v, bs["BLOCK_V"])
    sp = splits or _splits(nb, vb, hidden.device)
    per = triton.cdiv(vb, sp) * bs["BLOCK_V"]
    sp = triton.cdiv(v, per)  # no empty split
    m = torch.empty(n, sp, dtype=torch.float32, device=hidden.device)
    s = torch.empty_like(m)
    m1, s1 = (torch.empty_like(m), torch.empty_like(m)) if with_t1 else (m, s)
    bad = torch.zeros(n, sp, dtype=torch.int32, device=hidden.device) if check_finite else m
    lse_kernel[(nb, sp)](hidden, weight, bias if bias is not None else m, m, s, m1, s1, bad, n, v, h,
                          hidden.stride(0), weight.stride(0), per, sp, 1.0 / temperature, HAS_BIAS=bias is not None,
                          DOT_FP32=_dot_fp32(hidden), CHECK=check_finite, TWO=with_t1, **bs)
    if check_finite and n:
        rows = (bad.sum(1) > 0).nonzero()
        if len(rows):
            raise ValueError(f"cut_sparse_kd: NaN or infinite values in the student logits (hidden @ weight.T"
                             f"{' + bias' if bias is not None else ''}), row {int(rows[0, 0])}")
    mx, total = _merge_splits(m, s)
    return (mx, total, *_merge_splits(m1, s1)) if with_t1 else (mx, total)


def _merge_splits(m: torch.Tensor, s: torch.Tensor):
    """The splits' (max, sum) pairs [N, splits] into one per row."""
    if m.shape[1] == 1:
        return m[:, 0], s[:, 0]
    mx = m.max(dim=1).values
    return mx, (s * torch.exp(m - mx[:, None])).sum(dim=1)


def _dot_fp32(hidden: torch.Tensor) -> bool:
    return hidden.dtype == torch.float32 or _interpreting()


def gather_logits(hidden, weight, bias, idx: torch.Tensor) -> torch.Tensor:
    """fp32 [N, J]: hidden[r] · weight[idx[r, j]] (+ bias[idx]), 0 where idx < 0."""
    n, h = hidden.shape
    idx = idx.to(torch.int32).contiguous()
    j = idx.shape[1]
    out = torch.empty(n, j, dtype=torch.float32, device=hidden.device)
    if n and j:
        gather_kernel[(n,)](hidden, weight, bias if bias is not None else out, idx, out, h, j, hidden.stride(0),
                             weight.stride(0), HAS_BIAS=bias is not None, **row_blocks(j, _aligned(hidden, weight)))
    return out


def _slab_rows(v: int, h: int, weight: torch.Tensor, slab_rows: int | None, block_v: int) -> int:
    if weight.dtype == torch.float32:
        return v  # accumulate in the gradient itself
    rows = slab_rows or max(block_v, SLAB_BYTES // (4 * max(1, h)) // block_v * block_v)
    return min(v, rows)


def cut_backward(saved: dict, gos: tuple, need_h: bool, need_w: bool, need_b: bool, blocks=None,
                 slab_rows: int | None = None):
    """grad_hidden, grad_weight, grad_bias from the head's coefficients scaled by the upstream gradients `gos`
    (one [N] tensor per output: the first scales the main loss's coefficients, the others their `extra` pairs)."""
    hidden, weight, bias = saved["hidden"], saved["weight"], saved["bias"]
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    go = gos[0].float()
    gB, gbar = saved["gB"] * go, saved["gbar"] * go
    cap = saved["cap"] * go.abs()  # clamp to ±cap commutes with a per-row scale of either sign
    e = saved["e"] * go[:, None]
    extra, extra_t1 = list(saved.get("extra", ())), list(saved.get("extra_t1", ()))
    for (e_i, gbar_i), go_i in zip(extra, gos[1:]):  # outputs whose gradient is linear in s
        e = e + e_i * go_i.float()[:, None]
        gbar = gbar + gbar_i * go_i.float()
    c1 = None  # outputs at temperature 1 (s1 = softmax(z)): e_i on idx plus s1·c_i everywhere
    for (e_i, c_i), go_i in zip(extra_t1, gos[1 + len(extra):]):
        e = e + e_i * go_i.float()[:, None]
        c1 = c_i * go_i.float() if c1 is None else c1 + c_i * go_i.float()
    e = e.contiguous()
    idx = saved["idx"]
    aligned = _aligned(hidden, weight)
    bs = blocks or pick_blocks(hidden.dtype, aligned)
    dot32 = _dot_fp32(hidden)
    j = idx.shape[1]
    gh = torch.zeros(n, h, dtype=torch.float32, device=dev) if need_h else None
    gw = torch.zeros_like(weight) if need_w else None
    gbias = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    slab = _slab_rows(v, h, weight, slab_rows, bs["BLOCK_V"]) if need_w else v
    slab_buf = torch.empty(slab, h, dtype=torch.float32, device=dev) if need_w and gw.dtype != torch.float32 else None
    acc = None
    for v0 in range(0, v, slab):
        v1 = min(v, v0 + slab)
        first = v0 == 0
        if need_w:  # an fp32 weight accumulates in its gradient; others in one fp32 slab buffer, reused
            acc = gw if slab_buf is None else slab_buf[: v1 - v0].zero_()
        if saved["dense"] and n:
            dense_bwd_kernel[(triton.cdiv(n, bs["BLOCK_N"]), triton.cdiv(v1 - v0, bs["BLOCK_V"]))](
                hidden, weight, bias if bias is not None else dummy, saved["lse"], gB, cap, gbar,
                saved["lse1"] if c1 is not None else dummy, c1 if c1 is not None else dummy,
                gh if gh is not None else dummy, acc if acc is not None else dummy,
                gbias if gbias is not None else dummy, n, h, v0, v1, hidden.stride(0), weight.stride(0),
                1.0 / saved["temperature"], HAS_BIAS=bias is not None, DO_H=need_h, DO_W=need_w,
                DO_B=gbias is not None, TWO=c1 is not None, DOT_FP32=dot32, **bs)
        if n and j and (need_w or (first and (need_h or need_b))):
            sparse_bwd_kernel[(n,)](
                hidden, weight, idx, e, gh if gh is not None else dummy, acc if acc is not None else dummy,
                gbias if gbias is not None else dummy, h, j, v0, v1, hidden.stride(0), weight.stride(0),
                DO_B=gbias is not None and first, DO_H=need_h and first, DO_W=need_w,
                **row_blocks(j, aligned))
        if need_w and acc is not gw:
            gw[v0:v1].copy_(acc)
    del acc, slab_buf  # the slab must not stay alive while grad_hidden is cast below
    if gh is not None and gh.dtype != hidden.dtype:
        gh = gh.to(hidden.dtype)
    if gbias is not None and bias is not None and gbias.dtype != bias.dtype:
        gbias = gbias.to(bias.dtype)
    return gh, gw, gbias


class CutSparseKDFunction(torch.autograd.Function):
    """Loss per row; backward recomputes the logits tile by tile (nothing of size [N, V] is ever stored)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, cfg):
        need_grad = any(ctx.needs_input_grad[:3])
        T = cfg["temperature"]
        stats = row_stats(hidden, weight, bias, T, check_finite=cfg["check_finite"], blocks=cfg["blocks"],
                          splits=cfg["splits"], with_t1=cfg["with_t1"])
        mx, total = stats[:2]
        gather = lambda idx: gather_logits(hidden, weight, bias, idx)  # noqa: E731
        if cfg["with_t1"]:
            loss, coef = cfg["head"](mx, total, gather, need_grad, t1=stats[2:])
        else:
            loss, coef = cfg["head"](mx, total, gather, need_grad)
        if need_grad:
            # the inputs through save_for_backward: autograd then refuses a backward after they changed in place
            ctx.save_for_backward(hidden, weight, bias)
            ctx.saved = dict(lse=(mx + total.log()).contiguous(), temperature=T, **coef)
            if cfg["with_t1"]:
                ctx.saved["lse1"] = (stats[2] + stats[3].log()).contiguous()
            ctx.cfg = cfg
        return loss

    @staticmethod
    def backward(ctx, *grad_outputs):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        hidden, weight, bias = ctx.saved_tensors
        saved = dict(ctx.saved, hidden=hidden.detach(), weight=weight.detach(),
                     bias=bias.detach() if bias is not None else None)
        gh, gw, gb = cut_backward(saved, grad_outputs, need_h, need_w, need_b, blocks=ctx.cfg["blocks"],
                                  slab_rows=ctx.cfg["slab_rows"])
        return gh, gw, gb, None


def cut_sparse_kd(hidden: torch.Tensor, weight: torch.Tensor, head: Callable, *, bias: torch.Tensor | None = None,
                  temperature: float = 1.0, check_finite: bool = True, blocks: dict[str, int] | None = None,
                  splits: int | None = None, slab_rows: int | None = None,
                  with_t1: bool = False) -> torch.Tensor | tuple:
    """Per-row loss (float32 [N]) of softmax((hidden @ weight.T + bias) / T) against a sparse target, never
    writing the [N, V] logits. Differentiable w.r.t. hidden, weight and bias.

    `head(row_max, row_sum, gather, need_grad) -> (loss [N], coefficients | None)`: the target side, given the
    row's max and sum of exp(z/T - max) and `gather(idx [N, J]) -> z [N, J]` (fp32, 0 where idx < 0).
    The coefficients are a dict of idx (int32 [N, J]), e (fp32 [N, J]: each listed entry's gradient minus the
    dense formula's value there), gB, cap, gbar (fp32 [N]: the dense gradient clamp(s gB, ±cap) - s ḡ) and dense
    (False when that part is zero everywhere), all including 1/T. A head may return a tuple of losses: the first
    has the coefficients above, each further one a pair (e_i, gbar_i) in the list `extra` (its gradient is
    e_i on idx minus s·gbar_i everywhere: CE's s - onehot(y) is e = -1 at y, gbar = -1), then each pair (e_i, c_i)
    of `extra_t1`, a loss at temperature 1 whose gradient is e_i on idx plus c_i·softmax(z): with `with_t1` the
    head is also given t1=(max, sum) of z itself, from the same pass (CE next to a KD at T != 1). Users call
    `bayeskd.losses.linear.fused_linear_posterior_kd(..., cut=True)`, which validates and supplies the head.
    `blocks`, `splits`, `slab_rows` override the launcher's choices (tests walk tails and slabs with them).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    bias = bias.contiguous() if bias is not None else None
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    cfg = dict(head=head, temperature=float(temperature), check_finite=check_finite, blocks=blocks, splits=splits,
               slab_rows=slab_rows, with_t1=with_t1)
    return CutSparseKDFunction.apply(hidden, weight, bias, cfg)
