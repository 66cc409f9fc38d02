"""The divergences of sparse KD over categories (the target's listed entries, plus one bucket for every other token),
their closed-form gradients, and the reference loss `sparse_kd_loss` (docs/MATH.md is the contract).

`sparse_kd_loss` is plain PyTorch with autograd and works in float64: with `bayeskd.core.combine.combine` it is the
source of truth that the fused PyTorch path (`bayeskd.losses.fused`), the lm_head ops (`bayeskd.losses.linear`) and
the Triton kernels are tested against. `tempered_target`, `row_divergence` and `divergence_grads` are the per-category
math those paths share.
"""
from __future__ import annotations

import math

import torch

from bayeskd.core.checks import check_dist, check_logits, check_mask
from bayeskd.core.sparse import NEG_INF, SparseDist

TARGET_FLOOR = 1e-12  # reverse KL needs log p; a zero target is floored here (docs/MATH.md)
LOG_FLOOR = math.log(TARGET_FLOOR)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
TAILS = ("bucket", "ignore")

__all__ = ["TARGET_FLOOR", "DIVERGENCES", "TAILS", "resolve_beta", "tempered_target", "row_divergence",
           "divergence_grads", "sparse_kd_loss"]


def resolve_beta(divergence: str, beta: float | None) -> float:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if beta is None:
        beta = 0.1 if divergence == "skew_kl" else 0.5
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return float(beta)


def tempered_target(lp_u: torch.Tensor, log_tail: torch.Tensor, R: torch.Tensor, T: float, tail: str):
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


def row_divergence(log_p: torch.Tensor, log_s: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
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
    beta = resolve_beta(divergence, beta)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_dist(target, "target")
    check_logits(student_logits, "student_logits", target.vocab_size, target.num_rows)
    mask = check_mask(mask, target.num_rows)
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
    log_pu, log_pb = tempered_target(lp_u, log_tail, R, temperature, tail)
    log_su, log_sb = _student_categories(z, idx, valid, R, temperature, tail)
    if tail == "bucket":
        log_pu, log_su = torch.cat([log_pu, log_pb[:, None]], 1), torch.cat([log_su, log_sb[:, None]], 1)
    loss = row_divergence(log_pu, log_su, divergence, beta)
    if mask is None:
        return loss
    return torch.zeros(target.num_rows, dtype=dtype, device=loss.device).index_put((keep,), loss)




def divergence_grads(log_p: torch.Tensor, log_s: torch.Tensor, divergence: str, beta: float):
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
