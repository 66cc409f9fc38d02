"""The posterior on the union of supports: prior x proxy (x the teacher token), the combination math of
docs/MATH.md. `combine_rows` is the exact posterior on the union (no validation), shared by the reference `combine`,
the fused PyTorch loss path and the cut op's target side (`bayeskd.losses`) and the posterior jobs; `mixture_mode`
turns Dirichlet and adaptive into mixtures with per-row weights. The Triton kernels (`bayeskd.kernels.sparse_kd`)
implement the same formulas and are tested against `combine`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bayeskd.core.adaptive import Theta, prior_weights
from bayeskd.core.checks import check_dist, check_proxy, check_scalars, check_teacher_tokens
from bayeskd.core.sparse import NEG_INF, SparseDist
from bayeskd.core.names import CONTEXT_COUNT

__all__ = ["combine", "combine_rows", "mixture_mode"]

# ----------------------------------------------------------------------------------------------------------
# posterior on the union support (shared by the reference and the CPU path; the tests check it densely)

def _mul_log(a: float, logx: torch.Tensor) -> torch.Tensor:
    """a * log x with 0 * log 0 = 0 (p^0 = 1 even where p = 0)."""
    return torch.zeros_like(logx) if a == 0 else a * logx


def _log_tau(idx: torch.Tensor, tail: torch.Tensor, vocab_size: int, dtype) -> torch.Tensor:
    """log of the per-token mass of an unlisted token; -inf when every token is listed."""
    unlisted = vocab_size - (idx >= 0).sum(dim=1)
    log_tau = tail.to(dtype).clamp(min=0).log() - unlisted.clamp(min=1).to(dtype).log()
    return torch.where(unlisted > 0, log_tau, torch.full_like(log_tau, NEG_INF))


def _lookup(idx: torch.Tensor, lp: torch.Tensor, query: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """lp at the listed entries `query` of each row, `fill[row]` where the row does not list them."""
    sidx, order = idx.long().sort(dim=1)
    pos = torch.searchsorted(sidx, query).clamp(max=idx.shape[1] - 1)
    found = (sidx.gather(1, pos) == query) & (query >= 0)
    return torch.where(found, lp.gather(1, order.gather(1, pos)), fill[:, None])


def _from_union(src: torch.Tensor, dup: torch.Tensor, valid: torch.Tensor, c0: int, c1: int, vals: torch.Tensor,
                fill: torch.Tensor, group: int) -> torch.Tensor:
    """Like `_lookup`, for the source that filled columns [c0, c1) of the union's candidates: `src` is the
    candidate column at each position of the stably sorted candidates, `dup` marks positions equal to the one
    before. A group of equal candidates holds at most one entry per source (at most `group` entries), so the
    source's value for a group sits at its head or up to group - 1 positions after it; no sort or search."""
    fill = fill[:, None]
    if c1 <= c0:
        return fill.expand(src.shape).clone()
    mine = (src >= c0) & (src < c1)
    v = vals.gather(1, (src - c0).clamp(0, c1 - c0 - 1))
    out = torch.where(mine, v, fill)
    same = torch.ones_like(dup)
    for shift in range(1, min(group, src.shape[1])):
        # position t and t + shift are in the same group: dup at t+1 .. t+shift
        same = same[:, :-1] & dup[:, shift:]
        take = same & mine[:, shift:]
        out[:, :-shift] = torch.where(take, v[:, shift:], out[:, :-shift])
    return torch.where(valid, out, fill)


def combine_rows(vocab_size: int, prior_idx, prior_lp, prior_tail, proxy_idx=None, proxy_lp=None,
                 proxy_tail=None, proxy_logits=None, *, mode="log_linear", a=1.0, b=1.0, w_rows=None,
                 teacher_tokens=None, evidence=0.0, dtype=torch.float32):
    """The posterior on U = S0 ∪ Sq (∪ {y}), exactly (docs/MATH.md); no validation.

    mode: "none" (the prior alone), "log_linear" or "mixture" (per-row weight `w_rows`). Returns U (int64
    [n, M], -1 at unused slots), log p on U ([n, M], -inf at unused slots), log tail [n] and R = V - |U| [n].
    """
    n = prior_idx.shape[0]
    cands = [prior_idx.long()]
    if proxy_idx is not None:
        cands.append(proxy_idx.long())
    if teacher_tokens is not None:
        cands.append(teacher_tokens.long()[:, None])
    srt, src = torch.cat(cands, dim=1).sort(dim=1, stable=True)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    U = srt.masked_fill(dup | (srt < 0), -1)
    valid = U >= 0
    R = vocab_size - valid.sum(dim=1)
    log_R = R.to(dtype).log()  # -inf when R = 0, which zeroes the outside mass below

    log_tau0 = _log_tau(prior_idx, prior_tail, vocab_size, dtype)
    k0 = prior_idx.shape[1]
    lp0 = _from_union(src, dup, valid, 0, k0, prior_lp.to(dtype), log_tau0, len(cands))

    if proxy_logits is not None:
        # online mode: q = softmax(l) over all V. Only two numbers per row are needed beyond U: the
        # log-sum-exp of the (scaled) proxy logits outside U, and at U.
        scale = b if mode == "log_linear" else 1.0
        work = proxy_logits.to(dtype) * scale
        lq_u = work.gather(1, U.clamp(min=0)).masked_fill(~valid, NEG_INF)
        rows = torch.arange(n, device=U.device)[:, None].expand_as(U)
        work[rows[valid], U[valid]] = NEG_INF
        lse_out = torch.logsumexp(work, dim=1)  # over the R outside tokens
        del work
        if mode == "log_linear":
            s = (_mul_log(a, lp0) + lq_u).masked_fill(~valid, NEG_INF)
            s_out = _mul_log(a, log_tau0) + lse_out  # all R outside tokens together
        elif mode == "mixture":
            lse_all = torch.logaddexp(lse_out, torch.logsumexp(lq_u, dim=1))
            lq = lq_u - lse_all[:, None]
            lq_out = lse_out - lse_all  # log of q's mass outside U
    else:
        if proxy_idx is not None:
            log_tauq = _log_tau(proxy_idx, proxy_tail, vocab_size, dtype)
            lq = _from_union(src, dup, valid, k0, k0 + proxy_idx.shape[1], proxy_lp.to(dtype), log_tauq, len(cands))
            lq_out = log_R + log_tauq
        if mode == "log_linear":
            s = (_mul_log(a, lp0) + _mul_log(b, lq)).masked_fill(~valid, NEG_INF)
            s_out = log_R + _mul_log(a, log_tau0) + _mul_log(b, log_tauq)

    if mode == "log_linear":
        log_z = torch.logsumexp(torch.cat([s, s_out[:, None]], dim=1), dim=1)
        if torch.isneginf(log_z).any():
            row = int(torch.isneginf(log_z).nonzero()[0])
            raise ValueError(f"row {row}: the log-linear posterior has no mass (prior and proxy share no token "
                             "and have zero tails)")
        lp = s - log_z[:, None]
        log_tail = s_out - log_z
    elif mode == "mixture":
        w = w_rows.to(dtype)[:, None]
        lp = torch.logaddexp(w.log() + lp0, torch.log1p(-w) + lq).masked_fill(~valid, NEG_INF)
        log_tail = torch.logaddexp(w[:, 0].log() + log_R + log_tau0, torch.log1p(-w[:, 0]) + lq_out)
    elif mode == "none":
        lp = lp0.masked_fill(~valid, NEG_INF)
        log_tail = log_R + log_tau0
    else:
        raise ValueError(f"unknown mode {mode!r}")

    if evidence > 0:  # p <- (p + e * delta_y) / (1 + e)
        at_y = U == teacher_tokens.long()[:, None]
        lp = torch.where(at_y, torch.logaddexp(lp, torch.full_like(lp, math.log(evidence))), lp)
        lp = lp - math.log1p(evidence)
        log_tail = log_tail - math.log1p(evidence)
    return U, lp, log_tail, R


def _dirichlet_w(prior: SparseDist, c: float) -> torch.Tensor:
    if CONTEXT_COUNT not in prior.extras:
        raise ValueError('mode="dirichlet" needs the prior\'s continuation counts in prior.extras["context_count"] '
                         "(an n-gram prior provides them); use mode=\"mixture\" for a fixed weight")
    n = prior.extras[CONTEXT_COUNT].to(torch.float64).reshape(-1)
    if n.shape != (prior.num_rows,) or not torch.isfinite(n).all() or (n < 0).any():
        raise ValueError('prior.extras["context_count"] must be finite, >= 0 and have one value per row')
    return n / (c + n)


def mixture_mode(prior: SparseDist, proxy, mode: str, c: float, w: float,
                 theta: Theta | None) -> tuple[str, torch.Tensor | None]:
    """(the mode `combine_rows` runs, the per-row prior weight float64 [N] for a mixture): Dirichlet and adaptive
    are mixtures whose weight comes from the rows (so the fused kernels need no mode of their own)."""
    if proxy is None:
        return "none", None
    if mode == "dirichlet":
        return "mixture", _dirichlet_w(prior, c)
    if mode == "adaptive":
        return "mixture", prior_weights(prior, proxy, theta)
    if mode == "mixture":
        return "mixture", torch.full((prior.num_rows,), w, dtype=torch.float64)
    return mode, None


# ----------------------------------------------------------------------------------------------------------
# reference

def combine(prior: SparseDist, proxy: SparseDist | torch.Tensor | None = None, mode: str = "log_linear",
            a: float = 1.0, b: float = 1.0, c: float = 1.0, w: float = 0.5,
            teacher_tokens: torch.Tensor | None = None, evidence: float = 0.0,
            top_k: int | None = None, theta: Theta | None = None) -> SparseDist:
    """Posterior of `prior` and `proxy` (a SparseDist, or dense [N, V] proxy logits = online mode).

    Modes: log-linear p ∝ p0^a q^b, mixture w p0 + (1-w) q, Dirichlet (mixture with per-row w = n/(c+n), n =
    prior.extras["context_count"]), adaptive (mixture with per-row w = σ(θ·f), `theta` the settings of
    `bayeskd.core.adaptive.fit_adaptive`). `proxy=None` gives the prior itself. Teacher tokens join the
    support; `evidence` e adds e observations of them. The result lists the union support sorted by probability
    (K = the largest union, padded with -1/-inf), or its `top_k` largest entries with the rest in the tail.
    """
    check_dist(prior, "prior")
    v = prior.vocab_size
    check_scalars(mode, a, b, c, w, evidence, teacher_tokens, top_k, v, theta)
    proxy_sd, proxy_logits = check_proxy(prior, proxy)
    y = check_teacher_tokens(teacher_tokens, prior.num_rows, v)
    dtype = torch.float64 if torch.float64 in (prior.logprobs.dtype, getattr(proxy, "dtype", None),
                                               getattr(proxy_sd, "logprobs", prior.logprobs).dtype) else torch.float32
    mode, w_rows = mixture_mode(prior, proxy, mode, c, w, theta)
    U, lp, log_tail, _ = combine_rows(
        v, prior.indices, prior.logprobs, prior.tail,
        *((proxy_sd.indices, proxy_sd.logprobs, proxy_sd.tail) if proxy_sd is not None else (None, None, None)),
        proxy_logits, mode=mode, a=a, b=b, w_rows=w_rows, teacher_tokens=y, evidence=evidence, dtype=dtype)

    # sort by probability (unused slots, -inf, go last), then keep K = top_k or the largest union
    # listed entries with p = 0 stay listed (they are categories of the loss): sort by probability, then move
    # the unused slots last with a stable sort
    # one stable ascending sort of -lp with the unused slots as NaN (NaN sorts last): the same permutation as a
    # stable descending sort of lp followed by a stable sort moving the unused slots last
    order = (-lp).masked_fill(U < 0, float("nan")).sort(dim=1, stable=True).indices
    U, lp = U.gather(1, order), lp.gather(1, order)
    tail = log_tail.exp()
    k = top_k if top_k is not None else max(int((U >= 0).sum(dim=1).max()) if U.shape[0] else 0, 1)  # N may be 0
    if k < U.shape[1]:
        tail = tail + lp[:, k:].exp().sum(dim=1)  # dropped entries join the tail
        U, lp = U[:, :k], lp[:, :k]
    elif k > U.shape[1]:
        pad = k - U.shape[1]
        U = F.pad(U, (0, pad), value=-1)
        lp = F.pad(lp, (0, pad), value=NEG_INF)
    lp = lp.masked_fill(U < 0, NEG_INF)
    return SparseDist(U.to(torch.int32), lp, tail, v, prior.temperature)
