"""Sparse KD losses against posterior targets (docs/MATH.md is the contract), and the one backend dispatch.

Three implementations compute the same numbers:
- the reference, `combine` (bayeskd.posterior.combine) + `sparse_kd_loss`: plain PyTorch with autograd, works
  in float64. It is the source of truth; the others are tested against it.
- `fused_posterior_kd_torch`: the CPU path. Rows in chunks; per row one log-sum-exp over the student logits,
  the posterior formed on the union support only (never an [N, V] target) and the gradient written in closed
  form, optionally into the logits buffer itself (`inplace=True`, like Liger's cross entropy).
- the Triton kernels (`bayeskd.kernels.sparse_kd`), used on CUDA.
`fused_posterior_kd` picks between the last two (`pick_backend`). The lm_head-fused ops (loss from the hidden
states, no [N, V] logits) live in `bayeskd.linear_losses`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from bayeskd.posterior.adaptive import Theta
from bayeskd.posterior.combine import (NEG_INF, _check_dist, _check_logits, _check_mask, _check_scalars,
                                      _check_teacher_tokens, _combine_rows, _mixture_mode, _prepare_proxy, combine)
from bayeskd.sparse import SparseDist

TARGET_FLOOR = 1e-12  # reverse KL needs log p; a zero target is floored here (docs/MATH.md)
LOG_FLOOR = math.log(TARGET_FLOOR)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
TAILS = ("bucket", "ignore")

__all__ = ["TARGET_FLOOR", "combine", "sparse_kd_loss", "fused_posterior_kd", "fused_posterior_kd_torch"]


def _resolve_beta(divergence: str, beta: float | None) -> float:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if beta is None:
        beta = 0.1 if divergence == "skew_kl" else 0.5
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return float(beta)


# ----------------------------------------------------------------------------------------------------------
# reference loss

def _tempered_target(lp_u: torch.Tensor, log_tail: torch.Tensor, R: torch.Tensor, T: float, tail: str):
    """log p_T on U and on the bucket (None for tail="ignore"), normalised over the categories."""
    x = lp_u / T
    if tail == "ignore":
        return x - torch.logsumexp(x, dim=1, keepdim=True), None
    # R tokens of tau = tail/R each, tempered: R * tau^(1/T), i.e. log R + (log tail - log R) / T
    log_r = R.to(x.dtype).clamp(min=1).log()
    bucket = torch.where(R > 0, log_r + (log_tail - log_r) / T, torch.full_like(log_tail, NEG_INF))
    log_z = torch.logsumexp(torch.cat([x, bucket[:, None]], dim=1), dim=1)
    return x - log_z[:, None], bucket - log_z


def _kl(log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """Σ x log(x/y) with 0 log 0 = 0; both masked to finite values where x = 0 so autograd stays NaN-free."""
    x = log_x.exp()
    pos = x > 0
    return torch.where(pos, x * (torch.where(pos, log_x, 0.0) - torch.where(pos, log_y, 0.0)), 0.0).sum(dim=1)


def _logaddexp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logaddexp whose gradient stays finite where both inputs are -inf (padding categories)."""
    both = torch.isneginf(x) & torch.isneginf(y)
    out = torch.logaddexp(x.masked_fill(both, 0.0), y.masked_fill(both, 0.0))
    return out.masked_fill(both, NEG_INF)


def _log_mix(log_x: torch.Tensor, log_y: torch.Tensor, wx: float) -> torch.Tensor:
    """log(wx * x + (1 - wx) * y)."""
    lwx = math.log(wx) if wx > 0 else NEG_INF
    lwy = math.log1p(-wx) if wx < 1 else NEG_INF
    return _logaddexp(log_x + lwx, log_y + lwy)


def _divergence(log_p: torch.Tensor, log_s: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence over the categories ([n, C] log-probabilities, -inf for absent ones)."""
    if divergence == "jsd" and beta in (0.0, 1.0):  # TRL/Liger convention
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return _kl(log_p, log_s)
    if divergence == "reverse_kl":
        return _kl(log_s, log_p.clamp(min=LOG_FLOOR))
    if divergence == "jsd":  # m = (1 - beta) s + beta p
        log_m = _log_mix(log_p, log_s, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_s, log_m)
    if divergence == "skew_kl":  # m = alpha p + (1 - alpha) s
        return _kl(log_p, _log_mix(log_p, log_s, beta))
    return 0.5 * (log_p.exp() - log_s.exp()).abs().sum(dim=1)  # tvd


def _student_categories(z: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, R: torch.Tensor, T: float,
                        tail: str):
    """log s on U and on the bucket (None for tail="ignore"), dense and readable (reference only)."""
    log_s = torch.log_softmax(z / T, dim=1)
    log_su = log_s.gather(1, idx).masked_fill(~valid, NEG_INF)
    if tail == "ignore":
        return log_su - torch.logsumexp(log_su, dim=1, keepdim=True), None
    in_u = torch.zeros_like(log_s, dtype=torch.bool)
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    in_u[rows[valid], idx[valid]] = True  # padding slots (clamped to index 0) must not write
    # rows with R = 0 have no bucket; leave them unmasked so logsumexp (and its gradient) stays finite
    outside = log_s.masked_fill(in_u & (R > 0)[:, None], NEG_INF)
    return log_su, torch.where(R > 0, torch.logsumexp(outside, dim=1), NEG_INF)


def sparse_kd_loss(student_logits: torch.Tensor, target: SparseDist, divergence: str = "forward_kl",
                   beta: float | None = None, temperature: float = 1.0, mask: torch.Tensor | None = None,
                   tail: str = "bucket") -> torch.Tensor:
    """Per-row divergence [N] between a sparse target and softmax(student_logits / T) (reference, autograd).

    Categories are the target's listed entries plus, with tail="bucket", one bucket of every other token;
    tail="ignore" renormalises both distributions over the listed entries. `beta` is jsd's β (default 0.5;
    0 = forward KL, 1 = reverse KL) or skew_kl's α (default 0.1). Masked rows (mask False) give 0 and no gradient.
    Computes in float64 when the logits or the target are float64, else in float32.
    """
    beta = _resolve_beta(divergence, beta)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_dist(target, "target")
    _check_logits(student_logits, "student_logits", target.vocab_size, target.num_rows)
    mask = _check_mask(mask, target.num_rows)
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, target.logprobs.dtype) else torch.float32

    # only the kept rows enter the computation, so masked rows get an exact 0 and an exact zero gradient
    keep = torch.arange(target.num_rows) if mask is None else mask.nonzero()[:, 0].to(student_logits.device)
    t = target[keep]
    z = student_logits.index_select(0, keep).to(dtype)
    valid = t.indices >= 0
    if tail == "ignore" and (~valid).all(dim=1).any():
        raise ValueError('tail="ignore" needs at least one listed target entry in every unmasked row')
    idx = t.indices.long().clamp(min=0)
    R = t.vocab_size - valid.sum(dim=1)
    lp_u = t.logprobs.to(dtype).masked_fill(~valid, NEG_INF)
    log_tail = t.tail.to(dtype).clamp(min=0).log()
    log_pu, log_pb = _tempered_target(lp_u, log_tail, R, temperature, tail)
    log_su, log_sb = _student_categories(z, idx, valid, R, temperature, tail)
    if tail == "bucket":
        log_pu, log_su = torch.cat([log_pu, log_pb[:, None]], 1), torch.cat([log_su, log_sb[:, None]], 1)
    loss = _divergence(log_pu, log_su, divergence, beta)
    if mask is None:
        return loss
    return torch.zeros(target.num_rows, dtype=dtype, device=loss.device).index_put((keep,), loss)


# ----------------------------------------------------------------------------------------------------------
# fused posterior + divergence: shared argument handling

@dataclass
class _Args:
    """Validated, resolved arguments of the fused loss: what every backend receives."""
    vocab_size: int
    prior_idx: torch.Tensor
    prior_lp: torch.Tensor
    prior_tail: torch.Tensor
    proxy_idx: torch.Tensor | None
    proxy_lp: torch.Tensor | None
    proxy_tail: torch.Tensor | None
    proxy_logits: torch.Tensor | None
    mode: str  # "none", "log_linear" or "mixture" (Dirichlet and adaptive are mixtures with per-row weights)
    a: float
    b: float
    w_rows: torch.Tensor | None  # float32 [N] for mixture
    teacher_tokens: torch.Tensor | None  # int64 [N]
    evidence: float
    divergence: str
    beta: float
    temperature: float
    mask: torch.Tensor | None  # bool [N]
    tail: str
    inplace: bool
    chunk_rows: int | None = None


def _prepare(student_logits, prior, proxy, mode, a, b, c, w, teacher_tokens, evidence, divergence, beta,
             temperature, mask, tail, inplace, check_values: bool = True, student_values: bool = True,
             theta: Theta | None = None) -> _Args:
    # The Triton kernel checks values (NaN/inf, index range) inside its own passes: the Triton path skips the
    # host-side checks here, which would cost extra passes over the logits and several host syncs.
    _check_dist(prior, "prior", values=check_values)
    n, v = prior.num_rows, prior.vocab_size
    _check_logits(student_logits, "student_logits", v, n, values=check_values and student_values)
    _check_scalars(mode, a, b, c, w, evidence, teacher_tokens, theta=theta)
    beta = _resolve_beta(divergence, beta)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    proxy_sd, proxy_logits = _prepare_proxy(prior, proxy, check_values)
    mask = _check_mask(mask, n)
    y = _check_teacher_tokens(teacher_tokens, n, v, mask)
    mode, w_rows = _mixture_mode(prior, proxy, mode, c, w, theta)
    w_rows = None if w_rows is None else w_rows.float()  # the kernels take float32 weights
    dev = student_logits.device
    to = lambda t, dt=None: None if t is None else t.to(device=dev, dtype=dt).contiguous()  # noqa: E731
    return _Args(
        v, to(prior.indices, torch.int32), to(prior.logprobs, torch.float32), to(prior.tail, torch.float32),
        *((to(proxy_sd.indices, torch.int32), to(proxy_sd.logprobs, torch.float32),
           to(proxy_sd.tail, torch.float32)) if proxy_sd is not None else (None, None, None)),
        to(proxy_logits), mode, float(a), float(b), to(w_rows), to(y), float(evidence), divergence, beta,
        float(temperature), to(mask), tail, bool(inplace))


# ----------------------------------------------------------------------------------------------------------
# the CPU path: chunked, closed-form gradient, no [N, V] target

CHUNK_BYTES = 32 << 20  # float32 scratch per chunk (fewer, larger chunks: fewer op launches per row)


def _divergence_grads(log_p: torch.Tensor, log_s: torch.Tensor, divergence: str, beta: float):
    """h = s_c * g_c and g_c = ∂loss/∂s_c (docs/MATH.md table) per category; both 0 where s_c = 0 (except
    forward KL's h = -p_c, its limit)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    s = log_s.exp()
    has_s = s > 0
    if divergence == "forward_kl":
        g = -(log_p - log_s).exp()
    elif divergence == "reverse_kl":
        g = log_s - log_p.clamp(min=LOG_FLOOR) + 1
    elif divergence == "jsd":
        g = (1 - beta) * (log_s - _log_mix(log_p, log_s, beta))
    elif divergence == "skew_kl":
        g = -(1 - beta) * (log_p - _log_mix(log_p, log_s, beta)).exp()
    else:
        g = 0.5 * torch.sign(s - log_p.exp())
    g = torch.where(has_s, g, 0.0)
    h = -log_p.exp() if divergence == "forward_kl" else s * g
    return h, g


def _chunk_loss_and_grad(work: torch.Tensor, rows: torch.Tensor, args: _Args) -> torch.Tensor:
    """Loss of the rows `rows`; `work` ([n, V], float32/64) holds their student logits on entry and the
    gradient w.r.t. them on return."""
    n, v = work.shape
    T = args.temperature
    sel = lambda t: None if t is None else t[rows]  # noqa: E731
    U, lp, log_tail, R = _combine_rows(
        v, sel(args.prior_idx), sel(args.prior_lp), sel(args.prior_tail), sel(args.proxy_idx),
        sel(args.proxy_lp), sel(args.proxy_tail), sel(args.proxy_logits), mode=args.mode, a=args.a, b=args.b,
        w_rows=sel(args.w_rows), teacher_tokens=sel(args.teacher_tokens), evidence=args.evidence,
        dtype=work.dtype)
    valid = U >= 0
    if args.tail == "ignore" and not valid.any(dim=1).all():
        raise ValueError('tail="ignore" needs at least one listed target entry in every unmasked row')
    flat = (torch.arange(n, device=U.device)[:, None] * v + U.clamp(min=0))[valid]  # U's slots in work
    if T != 1.0:
        work.mul_(1.0 / T)
    x_u = work.gather(1, U.clamp(min=0)).masked_fill(~valid, NEG_INF)  # z/T on U (NaN/inf rejected in _prepare)
    log_pu, log_pb = _tempered_target(lp, log_tail, R, T, args.tail)

    if args.tail == "bucket":
        # shift the outside tokens by their own max, so the bucket's share cannot underflow to 0 (an inf forward
        # KL) when U holds the row's max by a wide margin (e.g. fp16 logits near ±65504)
        work.view(-1)[flat] = NEG_INF
        mo = work.amax(dim=1)
        mo = torch.where(R > 0, mo, torch.zeros_like(mo))  # no outside token: avoid -inf - -inf
        work.sub_(mo[:, None]).exp_()  # exp(z/T - max outside U), 0 on U
        # logs relative to the row's max keep them small, as accurate as fp32 allows
        mx = torch.maximum(mo, x_u.amax(dim=1))
        x_u = x_u - mx[:, None]
        log_out = torch.where(R > 0, work.sum(dim=1).log() + (mo - mx), NEG_INF)  # summed directly, no 1 - Σ
        log_total = torch.logaddexp(log_out, torch.logsumexp(x_u, dim=1))
        log_su = x_u - log_total[:, None]
        log_sb = log_out - log_total
        log_p, log_s = torch.cat([log_pu, log_pb[:, None]], 1), torch.cat([log_su, log_sb[:, None]], 1)
    else:  # categories U only, the student renormalised over U: nothing outside U matters
        log_su = x_u - torch.logsumexp(x_u, dim=1, keepdim=True)
        log_p, log_s = log_pu, log_su

    loss = _divergence(log_p, log_s, args.divergence, args.beta)
    h, g = _divergence_grads(log_p, log_s, args.divergence, args.beta)
    g_bar = h.sum(dim=1)
    if args.tail == "bucket":  # outside U: (1/T) s(v) (g_B - g_bar), s(v) = work * exp(mo - mx - log_total)
        work.mul_(((g[:, -1] - g_bar) * (mo - mx - log_total).exp() / T)[:, None])
    else:
        work.zero_()
    grad_u = (h[:, : U.shape[1]] - log_su.exp() * g_bar[:, None]) / T
    work.view(-1)[flat] = grad_u[valid]
    return loss


def _fused_forward(z: torch.Tensor, grad: torch.Tensor, args: _Args) -> torch.Tensor:
    """Per-row losses; writes the gradient w.r.t. z into `grad` (which may be z itself)."""
    n, v = z.shape
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    loss = torch.zeros(n, dtype=torch.float32, device=z.device)
    if args.mask is None:
        keep = torch.arange(n, device=z.device)
    else:
        keep = args.mask.nonzero()[:, 0]
        grad.index_fill_(0, (~args.mask).nonzero()[:, 0], 0)  # masked rows: gradient 0
    chunk = args.chunk_rows or max(1, CHUNK_BYTES // (4 * v))
    scratch = None
    for i in range(0, len(keep), chunk):
        rows = keep[i: i + chunk]
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        if r1 - r0 == len(rows) and grad.dtype == cdt:
            # contiguous rows: work directly in the gradient's rows (the logits themselves when in place)
            work = grad[r0:r1]
            if grad.data_ptr() != z.data_ptr():
                work.copy_(z[r0:r1])
            loss[rows] = _chunk_loss_and_grad(work, rows, args).float()
            continue
        if scratch is None:
            scratch = torch.empty(min(chunk, n), v, dtype=cdt, device=z.device)
        work = scratch[: len(rows)]
        torch.index_select(z, 0, rows, out=work) if z.dtype == cdt else work.copy_(z[rows])
        loss[rows] = _chunk_loss_and_grad(work, rows, args).float()
        if r1 - r0 == len(rows):
            grad[r0:r1].copy_(work)
        else:
            grad.index_copy_(0, rows, work.to(grad.dtype))
    return loss


class _FusedPosteriorKD(torch.autograd.Function):
    """Loss in forward, gradient computed there too and handed out (scaled per row) in backward."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, args: _Args) -> torch.Tensor:
        z = student_logits.detach()
        grad = z if args.inplace else torch.empty_like(z)
        loss = _fused_forward(z, grad, args)
        ctx.save_for_backward(grad)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError("fused_posterior_kd: backward can run only once (the gradient is scaled in place)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if not bool((grad_loss == 1).all()):  # e.g. per-row weights or a mean: scale each row
            grad.mul_(grad_loss.to(grad.dtype)[:, None])
        return grad, None


def fused_posterior_kd_torch(student_logits: torch.Tensor, prior: SparseDist,
                             proxy: SparseDist | torch.Tensor | None = None, *, mode: str = "log_linear",
                             a: float = 1.0, b: float = 1.0, c: float = 1.0, w: float = 0.5,
                             theta: Theta | None = None,
                             teacher_tokens: torch.Tensor | None = None, evidence: float = 0.0,
                             divergence: str = "forward_kl", beta: float | None = None, temperature: float = 1.0,
                             mask: torch.Tensor | None = None, tail: str = "bucket", inplace: bool = False,
                             chunk_rows: int | None = None) -> torch.Tensor:
    """The PyTorch path of `fused_posterior_kd` (see there), usable on any device; float32 math."""
    args = _prepare(student_logits, prior, proxy, mode, a, b, c, w, teacher_tokens, evidence, divergence, beta,
                    temperature, mask, tail, inplace, theta=theta)
    args.chunk_rows = chunk_rows
    return _FusedPosteriorKD.apply(student_logits, args)


# ----------------------------------------------------------------------------------------------------------
# dispatcher

def pick_backend(backend: str, device: torch.device) -> str:
    """"torch" or "triton" for `backend` ("auto": Triton on CUDA, PyTorch elsewhere; the environment variable
    BAYESKD_BACKEND=torch|triton overrides it). Every fused op of bayeskd dispatches here."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        env = os.environ.get("BAYESKD_BACKEND", "").strip().lower()
        if env not in ("", "auto", "torch", "triton"):
            raise ValueError(f"BAYESKD_BACKEND must be 'torch' or 'triton', got {env!r}")
        backend = env if env in ("torch", "triton") else ("triton" if device.type == "cuda" else "torch")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the Triton backend needs CUDA tensors (got {device.type}); on CPU it runs only under "
                           "the interpreter: set TRITON_INTERPRET=1 before importing triton, or use backend='torch'")
    return backend


def fused_posterior_kd(student_logits: torch.Tensor, prior: SparseDist,
                       proxy: SparseDist | torch.Tensor | None = None, *, mode: str = "log_linear",
                       a: float = 1.0, b: float = 1.0, c: float = 1.0, w: float = 0.5,
                       theta: Theta | None = None,
                       teacher_tokens: torch.Tensor | None = None, evidence: float = 0.0,
                       divergence: str = "forward_kl", beta: float | None = None, temperature: float = 1.0,
                       mask: torch.Tensor | None = None, tail: str = "bucket", inplace: bool = False,
                       backend: str = "auto") -> torch.Tensor:
    """Per-row loss [N] of the posterior of `prior` and `proxy` against softmax(student_logits / T).

    Equals sparse_kd_loss(student_logits, combine(prior, proxy, ...), ...) (no top_k truncation) without
    materialising any [N, V] target; differentiable w.r.t. student_logits only. `proxy` is a SparseDist, dense
    [N, V] proxy logits (online mode) or None (the prior alone). With inplace=True the gradient is written into
    the logits buffer during the forward pass: their values are gone afterwards (compute every other use of
    them first) and backward may run only once. backend: see `pick_backend`.
    """
    chosen = pick_backend(backend, student_logits.device)
    args = _prepare(student_logits, prior, proxy, mode, a, b, c, w, teacher_tokens, evidence, divergence, beta,
                    temperature, mask, tail, inplace, check_values=chosen == "torch", theta=theta)
    if chosen == "torch":
        return _FusedPosteriorKD.apply(student_logits, args)
    from bayeskd.kernels.sparse_kd import triton_fused_posterior_kd  # lazy: triton is heavy to import
    return triton_fused_posterior_kd(
        student_logits, args.prior_idx, args.prior_lp, args.prior_tail, args.proxy_idx, args.proxy_lp,
        args.proxy_tail, args.proxy_logits, mode=args.mode, a=args.a, b=args.b, w_rows=args.w_rows,
        teacher_tokens=args.teacher_tokens, evidence=args.evidence, divergence=args.divergence, beta=args.beta,
        temperature=args.temperature, mask=args.mask, tail=args.tail, inplace=args.inplace)
