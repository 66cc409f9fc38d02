"""Posterior targets and sparse KD losses (docs/MATH.md is the contract).

Three implementations compute the same numbers:
- the reference, `combine` + `sparse_kd_loss`: plain PyTorch with autograd, works in float64. It is the
  source of truth; the others are tested against it.
- `fused_posterior_kd_torch`: the CPU path. Rows in chunks; per row one log-sum-exp over the student logits,
  the posterior formed on the union support only (never an [N, V] target) and the gradient written in closed
  form, optionally into the logits buffer itself (`inplace=True`, like Liger's cross entropy).
- the Triton kernels (`bayeskd.kernels.sparse_kd`), used on CUDA.
`fused_posterior_kd` picks between the last two.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bayeskd.sparse import SparseDist

TARGET_FLOOR = 1e-12  # reverse KL needs log p; a zero target is floored here (docs/MATH.md)
LOG_FLOOR = math.log(TARGET_FLOOR)
MODES = ("log_linear", "dirichlet", "mixture")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
TAILS = ("bucket", "ignore")
NEG_INF = float("-inf")

__all__ = ["TARGET_FLOOR", "combine", "sparse_kd_loss", "fused_posterior_kd", "fused_posterior_kd_torch"]


# ----------------------------------------------------------------------------------------------------------
# validation

def _check_logits(x: torch.Tensor, name: str, vocab_size: int | None = None, rows: int | None = None,
                  values: bool = True) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, V], got shape {tuple(x.shape)}")
    if vocab_size is not None and x.shape[1] != vocab_size:
        raise ValueError(f"{name} has V={x.shape[1]} but the prior has V={vocab_size}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows but the prior has {rows}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    # one float32 row sum finds NaN and +-inf without an [N, V] boolean temporary
    if values and not torch.isfinite(x.sum(dim=1, dtype=torch.float32)).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_dist(d: SparseDist, name: str, vocab_size: int | None = None, rows: int | None = None,
                values: bool = True) -> None:
    if not isinstance(d, SparseDist):
        raise TypeError(f"{name} must be a SparseDist, got {type(d).__name__}")
    if vocab_size is not None and d.vocab_size != vocab_size:
        raise ValueError(f"{name} has V={d.vocab_size} but the prior has V={vocab_size}")
    if rows is not None and d.num_rows != rows:
        raise ValueError(f"{name} has {d.num_rows} rows but the prior has {rows}")
    if d.indices.dim() != 2 or d.logprobs.shape != d.indices.shape or d.tail.shape != (d.num_rows,):
        raise ValueError(f"{name}: indices {tuple(d.indices.shape)}, logprobs {tuple(d.logprobs.shape)} and tail "
                         f"{tuple(d.tail.shape)} must be [N, K], [N, K] and [N]")
    if d.indices.dtype.is_floating_point:
        raise ValueError(f"{name}: indices must be integers, got {d.indices.dtype}")
    if not values:
        return
    if ((d.indices < -1) | (d.indices >= d.vocab_size)).any():
        raise ValueError(f"{name}: a token index is outside [0, V={d.vocab_size})")
    listed = d.indices >= 0
    lp = d.logprobs
    if torch.isnan(lp).any() or (lp[listed] == float("inf")).any() or not torch.isfinite(d.tail).all():
        raise ValueError(f"{name} contains NaN or infinite values in logprobs or tail")


def _check_scalars(mode, a, b, c, w, evidence, teacher_tokens, top_k=None, vocab_size=None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, v in (("a", a), ("b", b), ("c", c), ("w", w), ("evidence", evidence)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if w > 1:
        raise ValueError(f"w must be in [0, 1], got {w}")
    if mode == "dirichlet" and c <= 0:
        raise ValueError(f"Dirichlet mode needs a concentration c > 0, got {c}")
    if evidence > 0 and teacher_tokens is None:
        raise ValueError("evidence > 0 needs teacher_tokens")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, V={vocab_size}]")


def _check_teacher_tokens(y: torch.Tensor | None, rows: int, vocab_size: int, mask=None) -> torch.Tensor | None:
    if y is None:
        return None
    if y.shape != (rows,) or y.dtype.is_floating_point:
        raise ValueError(f"teacher_tokens must be an integer tensor of shape ({rows},), got {y.dtype} "
                         f"{tuple(y.shape)}")
    y = y.long()
    if mask is not None:  # masked rows (prompt, padding) often carry -100: they are never used
        y = torch.where(mask, y, torch.zeros_like(y))
    if ((y < 0) | (y >= vocab_size)).any():
        bad = y[(y < 0) | (y >= vocab_size)][0].item()
        raise ValueError(f"teacher token {bad} is outside [0, V={vocab_size}); mask such rows")
    return y


def _check_mask(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != (rows,):
        raise ValueError(f"mask must have shape ({rows},), got {tuple(mask.shape)}")
    return mask.bool()


def _resolve_beta(divergence: str, beta: float | None) -> float:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if beta is None:
        beta = 0.1 if divergence == "skew_kl" else 0.5
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return float(beta)


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


def _combine_rows(vocab_size: int, prior_idx, prior_lp, prior_tail, proxy_idx=None, proxy_lp=None,
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
    if "context_count" not in prior.extras:
        raise ValueError('mode="dirichlet" needs the prior\'s continuation counts in prior.extras["context_count"] '
                         "(an n-gram prior provides them); use mode=\"mixture\" for a fixed weight")
    n = prior.extras["context_count"].to(torch.float64).reshape(-1)
    if n.shape != (prior.num_rows,) or not torch.isfinite(n).all() or (n < 0).any():
        raise ValueError('prior.extras["context_count"] must be finite, >= 0 and have one value per row')
    return n / (c + n)


def _prepare_proxy(prior: SparseDist, proxy, values: bool = True):
    """(proxy SparseDist or None, proxy logits or None), validated against the prior."""
    if proxy is None:
        return None, None
    if isinstance(proxy, torch.Tensor):
        _check_logits(proxy, "proxy logits", prior.vocab_size, prior.num_rows, values)
        return None, proxy
    _check_dist(proxy, "proxy", prior.vocab_size, prior.num_rows, values)
    return proxy, None


# ----------------------------------------------------------------------------------------------------------
# reference

def combine(prior: SparseDist, proxy: SparseDist | torch.Tensor | None = None, mode: str = "log_linear",
            a: float = 1.0, b: float = 1.0, c: float = 1.0, w: float = 0.5,
            teacher_tokens: torch.Tensor | None = None, evidence: float = 0.0,
            top_k: int | None = None) -> SparseDist:
    """Posterior of `prior` and `proxy` (a SparseDist, or dense [N, V] proxy logits = online mode).

    Modes: log-linear p ∝ p0^a q^b, mixture w p0 + (1-w) q, Dirichlet (mixture with per-row w = n/(c+n), n =
    prior.extras["context_count"]). `proxy=None` gives the prior itself. Teacher tokens join the support;
    `evidence` e adds e observations of them. The result lists the union support sorted by probability
    (K = the largest union, padded with -1/-inf), or its `top_k` largest entries with the rest in the tail.
    """
    _check_dist(prior, "prior")
    v = prior.vocab_size
    _check_scalars(mode, a, b, c, w, evidence, teacher_tokens, top_k, v)
    proxy_sd, proxy_logits = _prepare_proxy(prior, proxy)
    y = _check_teacher_tokens(teacher_tokens, prior.num_rows, v)
    dtype = torch.float64 if torch.float64 in (prior.logprobs.dtype, getattr(proxy, "dtype", None),
                                               getattr(proxy_sd, "logprobs", prior.logprobs).dtype) else torch.float32
    w_rows = None
    if proxy is None:
        mode = "none"
    elif mode == "dirichlet":
        w_rows, mode = _dirichlet_w(prior, c), "mixture"
    elif mode == "mixture":
        w_rows = torch.full((prior.num_rows,), w, dtype=torch.float64)
    U, lp, log_tail, _ = _combine_rows(
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
    k = top_k if top_k is not None else max(int((U >= 0).sum(dim=1).max()), 1)
    if k < U.shape[1]:
        tail = tail + lp[:, k:].exp().sum(dim=1)  # dropped entries join the tail
        U, lp = U[:, :k], lp[:, :k]
    elif k > U.shape[1]:
        pad = k - U.shape[1]
        U = F.pad(U, (0, pad), value=-1)
        lp = F.pad(lp, (0, pad), value=NEG_INF)
    lp = lp.masked_fill(U < 0, NEG_INF)
    return SparseDist(U.to(torch.int32), lp, tail, v, prior.temperature)


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
    mode: str  # "none", "log_linear" or "mixture" (Dirichlet is a mixture with per-row weights)
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
             temperature, mask, tail, inplace, check_values: bool = True) -> _Args:
    # The Triton kernel checks values (NaN/inf, index range) inside its own passes: the Triton path skips the
    # host-side checks here, which would cost extra passes over the logits and several host syncs.
    _check_dist(prior, "prior", values=check_values)
    n, v = prior.num_rows, prior.vocab_size
    _check_logits(student_logits, "student_logits", v, n, values=check_values)
    _check_scalars(mode, a, b, c, w, evidence, teacher_tokens)
    beta = _resolve_beta(divergence, beta)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    proxy_sd, proxy_logits = _prepare_proxy(prior, proxy, check_values)
    mask = _check_mask(mask, n)
    y = _check_teacher_tokens(teacher_tokens, n, v, mask)
    w_rows = None
    if proxy is None:
        mode = "none"
    elif mode == "dirichlet":
        w_rows, mode = _dirichlet_w(prior, c).float(), "mixture"
    elif mode == "mixture":
        w_rows = torch.full((n,), w, dtype=torch.float32, device=student_logits.device)
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
    mx = work.amax(dim=1)  # NaN/inf were rejected up front (_prepare), so this shift is finite
    x_u = (work.gather(1, U.clamp(min=0)) - mx[:, None]).masked_fill(~valid, NEG_INF)  # shifted z/T on U
    log_pu, log_pb = _tempered_target(lp, log_tail, R, T, args.tail)

    if args.tail == "bucket":
        work.sub_(mx[:, None]).exp_()  # exp(z/T - max): softmax * total
        work.view(-1)[flat] = 0.0
        sum_out = work.sum(dim=1)  # the bucket's share, summed directly (no 1 - Σ cancellation)
        total = sum_out + x_u.exp().sum(dim=1)
        log_su = x_u - total.log()[:, None]
        log_sb = torch.where(R > 0, sum_out.log() - total.log(), NEG_INF)
        log_p, log_s = torch.cat([log_pu, log_pb[:, None]], 1), torch.cat([log_su, log_sb[:, None]], 1)
    else:  # categories U only, the student renormalised over U: nothing outside U matters
        log_su = x_u - torch.logsumexp(x_u, dim=1, keepdim=True)
        log_p, log_s = log_pu, log_su

    loss = _divergence(log_p, log_s, args.divergence, args.beta)
    h, g = _divergence_grads(log_p, log_s, args.divergence, args.beta)
    g_bar = h.sum(dim=1)
    if args.tail == "bucket":  # outside U: (1/T) s(v) (g_B - g_bar), s(v) = work / total
        work.mul_(((g[:, -1] - g_bar) / (T * total))[:, None])
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
                             teacher_tokens: torch.Tensor | None = None, evidence: float = 0.0,
                             divergence: str = "forward_kl", beta: float | None = None, temperature: float = 1.0,
                             mask: torch.Tensor | None = None, tail: str = "bucket", inplace: bool = False,
                             chunk_rows: int | None = None) -> torch.Tensor:
    """The PyTorch path of `fused_posterior_kd` (see there), usable on any device; float32 math."""
    args = _prepare(student_logits, prior, proxy, mode, a, b, c, w, teacher_tokens, evidence, divergence, beta,
                    temperature, mask, tail, inplace)
    args.chunk_rows = chunk_rows
    return _FusedPosteriorKD.apply(student_logits, args)


# ----------------------------------------------------------------------------------------------------------
# dispatcher

def _pick_backend(backend: str, device: torch.device) -> str:
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
                       teacher_tokens: torch.Tensor | None = None, evidence: float = 0.0,
                       divergence: str = "forward_kl", beta: float | None = None, temperature: float = 1.0,
                       mask: torch.Tensor | None = None, tail: str = "bucket", inplace: bool = False,
                       backend: str = "auto") -> torch.Tensor:
    """Per-row loss [N] of the posterior of `prior` and `proxy` against softmax(student_logits / T).

    Equals sparse_kd_loss(student_logits, combine(prior, proxy, ...), ...) (no top_k truncation) without
    materialising any [N, V] target; differentiable w.r.t. student_logits only. `proxy` is a SparseDist, dense
    [N, V] proxy logits (online mode) or None (the prior alone). With inplace=True the gradient is written into
    the logits buffer during the forward pass: their values are gone afterwards (compute every other use of
    them first) and backward may run only once. backend: "auto" (Triton on CUDA, PyTorch elsewhere; the
    environment variable BAYESKD_BACKEND=torch|triton overrides it), "torch" or "triton".
    """
    chosen = _pick_backend(backend, student_logits.device)
    args = _prepare(student_logits, prior, proxy, mode, a, b, c, w, teacher_tokens, evidence, divergence, beta,
                    temperature, mask, tail, inplace, check_values=chosen == "torch")
    if chosen == "torch":
        return _FusedPosteriorKD.apply(student_logits, args)
    from bayeskd.kernels.sparse_kd import triton_fused_posterior_kd  # lazy: triton is heavy to import
    return triton_fused_posterior_kd(
        student_logits, args.prior_idx, args.prior_lp, args.prior_tail, args.proxy_idx, args.proxy_lp,
        args.proxy_tail, args.proxy_logits, mode=args.mode, a=args.a, b=args.b, w_rows=args.w_rows,
        teacher_tokens=args.teacher_tokens, evidence=args.evidence, divergence=args.divergence, beta=args.beta,
        temperature=args.temperature, mask=args.mask, tail=args.tail, inplace=args.inplace)
