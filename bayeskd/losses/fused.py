"""The fused posterior + divergence loss from student logits (`fused_posterior_kd`) and the ONE backend dispatch
(`pick_backend`) every fused op of bayeskd goes through.

Per rows: the posterior of prior and proxy on the union support (`bayeskd.core.combine.combine_rows`), never an
[N, V] target, and the divergence against softmax(logits / T). Two backends compute the same numbers as the
reference (`combine` + `bayeskd.losses.divergences.sparse_kd_loss`):
- PyTorch (`fused_posterior_kd_torch`), any device: rows in chunks; per row one log-sum-exp over the student logits
  and the gradient written in closed form, optionally into the logits buffer itself (`inplace=True`, like Liger's
  cross entropy);
- Triton (`bayeskd.kernels.sparse_kd`), on CUDA.
`LossArgs` and `prepare_args` are the validated arguments every backend receives, also those of the lm_head ops
(`bayeskd.losses.linear`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from bayeskd.core.adaptive import Theta
from bayeskd.core.checks import check_dist, check_logits, check_mask, check_proxy, check_scalars, check_teacher_tokens
from bayeskd.core.combine import combine_rows, mixture_mode
from bayeskd.core.sparse import NEG_INF, SparseDist
from bayeskd.losses.divergences import TAILS, divergence_grads, resolve_beta, row_divergence, tempered_target

__all__ = ["LossArgs", "prepare_args", "fused_forward", "fused_posterior_kd_torch", "pick_backend",
           "fused_posterior_kd"]


# ----------------------------------------------------------------------------------------------------------
# shared argument handling

@dataclass
class LossArgs:
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


def prepare_args(student_logits, prior, proxy, mode, a, b, c, w, teacher_tokens, evidence, divergence, beta,
                 temperature, mask, tail, inplace, check_values: bool = True, student_values: bool = True,
                 theta: Theta | None = None) -> LossArgs:
    # The Triton kernel checks values (NaN/inf, index range) inside its own passes: the Triton path skips the
    # host-side checks here, which would cost extra passes over the logits and several host syncs.
    check_dist(prior, "prior", values=check_values)
    n, v = prior.num_rows, prior.vocab_size
    check_logits(student_logits, "student_logits", v, n, values=check_values and student_values)
    check_scalars(mode, a, b, c, w, evidence, teacher_tokens, theta=theta)
    beta = resolve_beta(divergence, beta)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    proxy_sd, proxy_logits = check_proxy(prior, proxy, check_values)
    mask = check_mask(mask, n)
    y = check_teacher_tokens(teacher_tokens, n, v, mask)
    mode, w_rows = mixture_mode(prior, proxy, mode, c, w, theta)
    w_rows = None if w_rows is None else w_rows.float()  # the kernels take float32 weights
    dev = student_logits.device
    to = lambda t, dt=None: None if t is None else t.to(device=dev, dtype=dt).contiguous()  # noqa: E731
    return LossArgs(
        v, to(prior.indices, torch.int32), to(prior.logprobs, torch.float32), to(prior.tail, torch.float32),
        *((to(proxy_sd.indices, torch.int32), to(proxy_sd.logprobs, torch.float32),
           to(proxy_sd.tail, torch.float32)) if proxy_sd is not None else (None, None, None)),
        to(proxy_logits), mode, float(a), float(b), to(w_rows), to(y), float(evidence), divergence, beta,
        float(temperature), to(mask), tail, bool(inplace))


# ----------------------------------------------------------------------------------------------------------
# the CPU path: chunked, closed-form gradient, no [N, V] target

CHUNK_BYTES = 32 << 20  # float32 scratch per chunk (fewer, larger chunks: fewer op launches per row)


def _chunk_loss_and_grad(work: torch.Tensor, rows: torch.Tensor, args: LossArgs) -> torch.Tensor:
    """Loss of the rows `rows`; `work` ([n, V], float32/64) holds their student logits on entry and the
    gradient w.r.t. them on return."""
    n, v = work.shape
    T = args.temperature
    sel = lambda t: None if t is None else t[rows]  # noqa: E731
    U, lp, log_tail, R = combine_rows(
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
    x_u = work.gather(1, U.clamp(min=0)).masked_fill(~valid, NEG_INF)  # z/T on U (NaN/inf rejected in prepare_args)
    log_pu, log_pb = tempered_target(lp, log_tail, R, T, args.tail)

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

    loss = row_divergence(log_p, log_s, args.divergence, args.beta)
    h, g = divergence_grads(log_p, log_s, args.divergence, args.beta)
    g_bar = h.sum(dim=1)
    if args.tail == "bucket":  # outside U: (1/T) s(v) (g_B - g_bar), s(v) = work * exp(mo - mx - log_total)
        work.mul_(((g[:, -1] - g_bar) * (mo - mx - log_total).exp() / T)[:, None])
    else:
        work.zero_()
    grad_u = (h[:, : U.shape[1]] - log_su.exp() * g_bar[:, None]) / T
    work.view(-1)[flat] = grad_u[valid]
    return loss


def fused_forward(z: torch.Tensor, grad: torch.Tensor, args: LossArgs) -> torch.Tensor:
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
    def forward(ctx, student_logits: torch.Tensor, args: LossArgs) -> torch.Tensor:
        z = student_logits.detach()
        grad = z if args.inplace else torch.empty_like(z)
        loss = fused_forward(z, grad, args)
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
    args = prepare_args(student_logits, prior, proxy, mode, a, b, c, w, teacher_tokens, evidence, divergence, beta,
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
    args = prepare_args(student_logits, prior, proxy, mode, a, b, c, w, teacher_tokens, evidence, divergence, beta,
                    temperature, mask, tail, inplace, check_values=chosen == "torch", theta=theta)
    if chosen == "torch":
        return _FusedPosteriorKD.apply(student_logits, args)
    from bayeskd.kernels.sparse_kd import triton_fused_posterior_kd  # lazy: triton is heavy to import
    return triton_fused_posterior_kd(
        student_logits, args.prior_idx, args.prior_lp, args.prior_tail, args.proxy_idx, args.proxy_lp,
        args.proxy_tail, args.proxy_logits, mode=args.mode, a=args.a, b=args.b, w_rows=args.w_rows,
        teacher_tokens=args.teacher_tokens, evidence=args.evidence, divergence=args.divergence, beta=args.beta,
        temperature=args.temperature, mask=args.mask, tail=args.tail, inplace=args.inplace)
