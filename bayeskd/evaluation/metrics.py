"""Estimation quality of a target estimate against a readable (lab) teacher.

Every metric compares the teacher's full distribution (`teacher_logprobs`, [N, V] log-probabilities) with an
estimate of it, which is either a `SparseDist` or a dense [N, V] tensor of log-probabilities. A `SparseDist` is
read exactly as `SparseDist.to_dense` reads it (docs/MATH.md): its tail is spread uniformly over its unlisted
tokens, `tau = tail / (V - |S|)` each (0 when the row lists all V tokens). A sparse estimate is never expanded
to [N, V]; the teacher is processed in row chunks (`chunk_rows`, default about 4M elements a chunk) converted to
float64, so memory stays bounded and all accumulation is float64.

The estimate is compared as stored: its `temperature` is not applied, and a dense estimate is taken to be
log-probabilities already (it is not renormalised). NaN or +inf in the teacher or a dense estimate is an error.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from bayeskd.core.sparse import SparseDist

CHUNK_ELEMENTS = 1 << 22  # teacher elements converted to float64 at a time

Estimate = SparseDist | torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Input checks and chunking

def _check(teacher_logprobs: torch.Tensor, estimate: Estimate, fn: str) -> tuple[int, int]:
    if not isinstance(teacher_logprobs, torch.Tensor) or teacher_logprobs.dim() != 2:
        shape = tuple(teacher_logprobs.shape) if isinstance(teacher_logprobs, torch.Tensor) else type(teacher_logprobs)
        raise ValueError(f"{fn}: teacher_logprobs must be a [N, V] tensor, got {shape}")
    n, v = teacher_logprobs.shape
    if isinstance(estimate, SparseDist):
        if estimate.vocab_size != v:
            raise ValueError(f"{fn}: estimate has vocabulary size V={estimate.vocab_size}, teacher has V={v}")
        if estimate.num_rows != n:
            raise ValueError(f"{fn}: estimate has {estimate.num_rows} rows, teacher has {n}")
        if estimate.indices.dim() != 2 or estimate.logprobs.shape != estimate.indices.shape \
                or estimate.tail.shape != (n,):
            raise ValueError(f"{fn}: malformed SparseDist (indices {tuple(estimate.indices.shape)}, logprobs "
                             f"{tuple(estimate.logprobs.shape)}, tail {tuple(estimate.tail.shape)})")
    elif isinstance(estimate, torch.Tensor):
        if estimate.dim() != 2:
            raise ValueError(f"{fn}: a dense estimate must be [N, V] log-probabilities, got {tuple(estimate.shape)}")
        if estimate.shape[1] != v:
            raise ValueError(f"{fn}: estimate has vocabulary size V={estimate.shape[1]}, teacher has V={v}")
        if estimate.shape[0] != n:
            raise ValueError(f"{fn}: estimate has {estimate.shape[0]} rows, teacher has {n}")
    else:
        raise ValueError(f"{fn}: estimate must be a SparseDist or a [N, V] tensor, got {type(estimate).__name__}")
    return n, v


def _chunks(n: int, v: int, chunk_rows: int | None):
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    step = chunk_rows or max(1, CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _finite_logprobs(x: torch.Tensor, what: str) -> torch.Tensor:
    """float64 copy of a chunk of log-probabilities; -inf (probability 0) is allowed, NaN and +inf are not."""
    x = x.to(torch.float64)
    if torch.isnan(x).any() or (x == math.inf).any():
        raise ValueError(f"{what} contains NaN or +inf")
    return x


def _sparse_parts(est: SparseDist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(listed mask [n,K], listed probabilities float64 [n,K] (0 at padding), per-unlisted-token tau float64 [n],
    number of unlisted tokens [n]) — the same numbers `to_dense(torch.float64)` writes."""
    listed = est.indices >= 0
    lp = est.logprobs.to(torch.float64)
    if torch.isnan(lp).any() or torch.isnan(est.tail).any():
        raise ValueError("estimate SparseDist contains NaN")
    probs = torch.where(listed, lp.exp(), torch.zeros((), dtype=torch.float64, device=lp.device))
    unlisted = est.vocab_size - listed.sum(dim=1)
    tail = est.tail.to(torch.float64)
    tau = torch.where(unlisted > 0, tail / unlisted.clamp(min=1).to(torch.float64), torch.zeros_like(tail))
    return listed, probs, tau, unlisted


def _padded_index(est: SparseDist, v: int) -> torch.Tensor:
    """int64 indices with padding (-1) mapped to the extra column `v` of a [n, V+1] buffer."""
    idx = est.indices.long()
    return torch.where(idx >= 0, idx, torch.full_like(idx, v))


# ----------------------------------------------------------------------------------------------------------------
# Metrics

def kl_teacher_to_estimate(teacher_logprobs: torch.Tensor, estimate: Estimate, *, floor: float | None = None,
                           chunk_rows: int | None = None) -> torch.Tensor:
    """KL(teacher ‖ estimate) per row, float64 [N].

    `KL = Σ_v p(v) (log p(v) - log q(v))` with `p` the teacher and `q` the estimate (for a `SparseDist`, `q` is its
    listed probability or `tau` for an unlisted token). Terms with `p(v) = 0` contribute 0. Where the estimate
    gives probability 0 (a listed `-inf`, or `tau = 0` because the tail is 0) to a token the teacher gives mass,
    the row's KL is **+inf**. With `floor` every estimate probability is first raised to at least `floor`
    (`q ← max(q, floor)`, not renormalised, so the floored KL is finite and can be slightly below 0).
    """
    n, v = _check(teacher_logprobs, estimate, "kl_teacher_to_estimate")
    if floor is not None and not floor > 0:
        raise ValueError(f"kl_teacher_to_estimate: floor must be > 0, got {floor}")
    log_floor = math.log(floor) if floor is not None else None
    out = torch.empty(n, dtype=torch.float64, device=teacher_logprobs.device)
    sparse = isinstance(estimate, SparseDist)
    if sparse:
        listed, _, tau_all, _ = _sparse_parts(estimate)
        idx_all = _padded_index(estimate, v)
    for rows in _chunks(n, v, chunk_rows):
        lp_t = _finite_logprobs(teacher_logprobs[rows], "teacher_logprobs")
        p_t = lp_t.exp()
        zero = torch.zeros((), dtype=torch.float64, device=lp_t.device)
        neg_entropy = torch.where(p_t > 0, p_t * lp_t, zero).sum(dim=1)
        if sparse:
            lq = torch.where(listed[rows], estimate.logprobs[rows].to(torch.float64), zero)
            tau = tau_all[rows]
            if log_floor is not None:
                lq = lq.clamp(min=log_floor)
                tau = tau.clamp(min=floor)
            p_pad = torch.cat([p_t, torch.zeros(p_t.shape[0], 1, dtype=p_t.dtype, device=p_t.device)], dim=1)
            idx = idx_all[rows]
            p_listed = p_pad.gather(1, idx)  # 0 at padding
            cross = torch.where(p_listed > 0, p_listed * lq, zero).sum(dim=1)
            mass_unlisted = p_pad.scatter(1, idx, 0.0).sum(dim=1)  # exactly 0 when every token is listed
            cross = cross + torch.where(mass_unlisted > 0, mass_unlisted * tau.log(), zero)
        else:
            lq = _finite_logprobs(estimate[rows], "estimate")
            if log_floor is not None:
                lq = lq.clamp(min=log_floor)
            cross = torch.where(p_t > 0, p_t * lq, zero).sum(dim=1)
        out[rows] = neg_entropy - cross
    return out


def _sparse_argmax(est: SparseDist) -> torch.Tensor:
    """The estimate's argmax, lowest index on ties: as `est.to_dense(torch.float64).argmax(1)`, without densifying."""
    v = est.vocab_size
    listed, probs, tau, unlisted = _sparse_parts(est)
    idx = est.indices.long()
    p = torch.where(listed, probs, torch.full_like(probs, -1.0))
    best = p.max(dim=1).values if est.k > 0 else torch.full_like(tau, -1.0)
    big = torch.full_like(idx, v)
    best_listed = torch.where(listed & (p == best[:, None]), idx, big).min(dim=1).values if est.k > 0 \
        else torch.full((est.num_rows,), v, dtype=torch.long, device=tau.device)
    low_unlisted = _lowest_unlisted(est, 1)[:, 0]
    has_unlisted = unlisted > 0
    return torch.where(has_unlisted & (tau > best), low_unlisted,
                       torch.where(has_unlisted & (tau == best), torch.minimum(low_unlisted, best_listed),
                                   best_listed))


def _lowest_unlisted(est: SparseDist, m: int) -> torch.Tensor:
    """The `m` lowest unlisted token indices per row, int64 [n, m]; `V` where a row has fewer than `m`.

    Uses only the sorted listed indices: the j-th unlisted token is `j + #(listed indices below it)`.
    """
    v = est.vocab_size
    idx = est.indices.long()
    srt = torch.sort(torch.where(idx >= 0, idx, torch.full_like(idx, v)), dim=1).values  # [n, K], padding last
    # Iterate j-th unlisted = j + number of listed indices <= candidate, to a fixed point (at most K+1 rounds).
    cand = torch.arange(m, device=idx.device)[None].expand(est.num_rows, m).clone()
    base = cand.clone()
    for _ in range(est.k + 1):
        nxt = base + (srt[:, None, :] <= cand[:, :, None]).sum(dim=2)
        if torch.equal(nxt, cand):
            break
        cand = nxt
    return torch.where(cand < v, cand, torch.full_like(cand, v))


def top1_match(teacher_logprobs: torch.Tensor, estimate: Estimate, *, chunk_rows: int | None = None) -> torch.Tensor:
    """bool [N]: the estimate's most likely token equals the teacher's (each argmax takes the lowest index on ties).

    For a `SparseDist` the argmax is its largest listed entry, unless the per-token tail `tau` exceeds it, in which
    case it is the lowest unlisted token (if `tau` equals it exactly, the lower of the two indices) — exactly
    `estimate.to_dense(torch.float64).argmax(1)`.
    """
    n, v = _check(teacher_logprobs, estimate, "top1_match")
    t_arg = torch.empty(n, dtype=torch.long, device=teacher_logprobs.device)
    e_arg = _sparse_argmax(estimate) if isinstance(estimate, SparseDist) else None
    if e_arg is None:
        e_arg = torch.empty(n, dtype=torch.long, device=teacher_logprobs.device)
    for rows in _chunks(n, v, chunk_rows):
        t_arg[rows] = _finite_logprobs(teacher_logprobs[rows], "teacher_logprobs").argmax(dim=1)
        if not isinstance(estimate, SparseDist):
            e_arg[rows] = _finite_logprobs(estimate[rows], "estimate").argmax(dim=1)
    return t_arg == e_arg


def _sparse_topk_indices(est: SparseDist, k: int) -> torch.Tensor:
    """The estimate's k most likely tokens, int64 [n, k], ties to the lowest index (as a stable descending sort of
    `to_dense(torch.float64)`). Candidates: the listed entries plus the k lowest unlisted tokens (all at `tau`)."""
    v = est.vocab_size
    listed, probs, tau, _ = _sparse_parts(est)
    idx = torch.where(listed, est.indices.long(), torch.full_like(est.indices, v, dtype=torch.long))
    p = torch.where(listed, probs, torch.full_like(probs, -1.0))
    low = _lowest_unlisted(est, k)
    p_low = torch.where(low < v, tau[:, None].expand_as(low), torch.full_like(low, -1.0, dtype=torch.float64))
    cand_idx = torch.cat([idx, low], dim=1)
    cand_p = torch.cat([p, p_low], dim=1)
    order = torch.sort(cand_idx, dim=1, stable=True).indices  # by index ascending ...
    cand_idx, cand_p = cand_idx.gather(1, order), cand_p.gather(1, order)
    order = torch.sort(cand_p, dim=1, descending=True, stable=True).indices  # ... then probability descending
    return cand_idx.gather(1, order)[:, :k]


def topk_mass_coverage(teacher_logprobs: torch.Tensor, estimate: Estimate, k: int, *,
                       chunk_rows: int | None = None) -> torch.Tensor:
    """float64 [N] in [0, 1]: how much of the teacher's top-k mass the estimate's top-k tokens hold.

    `coverage = Σ_{v ∈ topk(q)} p(v) / Σ_{v ∈ topk(p)} p(v)`, where `topk(q)` is the estimate's k most likely
    tokens (ties to the lowest index; for a `SparseDist` unlisted tokens all sit at `tau`, so they enter in index order)
    and the denominator is the sum of the teacher's k largest probabilities. 1 means the estimate's top-k carries
    as much teacher mass as the teacher's own top-k (the same set, up to teacher ties); 0 means none of it.
    """
    n, v = _check(teacher_logprobs, estimate, "topk_mass_coverage")
    if not isinstance(k, int) or not 1 <= k <= v:
        raise ValueError(f"topk_mass_coverage: k must be an int in [1, V={v}], got {k!r}")
    out = torch.empty(n, dtype=torch.float64, device=teacher_logprobs.device)
    sparse = isinstance(estimate, SparseDist)
    for rows in _chunks(n, v, chunk_rows):
        p_t = _finite_logprobs(teacher_logprobs[rows], "teacher_logprobs").exp()
        best = p_t.topk(k, dim=1).values.sum(dim=1)
        if sparse:
            top = _sparse_topk_indices(estimate[rows], k)
        else:
            lq = _finite_logprobs(estimate[rows], "estimate")
            top = torch.sort(lq, dim=1, descending=True, stable=True).indices[:, :k]
        out[rows] = p_t.gather(1, top).sum(dim=1) / best
    return out


def smoothed_one_hot(tokens: torch.Tensor, vocab_size: int, eps: float = 0.1) -> SparseDist:
    """The baseline estimate: `1 - eps` on the observed token, `eps` spread uniformly over the other `V - 1`.

    A K=1 `SparseDist`: index `tokens`, log-probability `log(1 - eps)`, tail `eps`. Requires `0 <= eps < 1` and
    every token in `[0, V)` (mask out ignored positions, e.g. -100 labels, before calling).
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise ValueError(f"smoothed_one_hot: tokens must be 1-D [N], got shape {tuple(tokens.shape)}")
    if not 0 <= eps < 1:
        raise ValueError(f"smoothed_one_hot: eps must be in [0, 1), got {eps}")
    if vocab_size < 1 or (vocab_size == 1 and eps > 0):
        raise ValueError(f"smoothed_one_hot: vocab_size={vocab_size} leaves nowhere to put eps={eps}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0].item()
        raise ValueError(f"smoothed_one_hot: token {bad} outside [0, V={vocab_size})")
    n = tokens.shape[0]
    return SparseDist(
        tokens.to(torch.int32)[:, None],
        torch.full((n, 1), math.log1p(-eps), dtype=torch.float32, device=tokens.device),
        torch.full((n,), eps, dtype=torch.float32, device=tokens.device),
        int(vocab_size),
    )


def summarize(metrics: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> dict[str, float]:
    """Mean of each metric over the positions where `mask` is True (all positions when `mask` is None).

    Boolean metrics give the fraction True. The mean is taken in float64; an infinite KL makes its mean inf.
    A metric with no unmasked positions gives NaN. Each metric must have the mask's shape.
    """
    out: dict[str, float] = {}
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"summarize: mask must be a bool tensor, got {mask.dtype}")
    for name, value in metrics.items():
        value = torch.as_tensor(value)
        if mask is not None and value.shape != mask.shape:
            raise ValueError(f"summarize: metric {name!r} has shape {tuple(value.shape)}, mask has "
                             f"{tuple(mask.shape)}")
        vals = value.to(torch.float64)
        if mask is not None:
            vals = vals[mask.to(vals.device)]
        out[name] = float(vals.mean()) if vals.numel() else float("nan")
    return out


def observed_token_check(teacher_logprobs: torch.Tensor, sequences: Sequence, eos_token_id: int | None = None,
                         valid: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """Are the observed tokens samples of the teacher? At positions chosen without looking at the token, the mean
    of −log p(y) − H(p) is 0 when y ~ p; each group gets its mean and standard error: "first" (each response's
    first row), "rest" (the others). EOS is a token, not a position: its check is the expected number of EOS
    (Σ p(EOS) over all rows) against the observed number (what a spurious EOS on cut-off responses inflates).
    `teacher_logprobs` [N, V]: the teacher's rows of the response tokens `sequences` (one array per record, N
    tokens in all, e.g. `TokenizedData.response_sequences()`); `valid` [N] bool: the rows to use (all by default)."""
    tokens = torch.from_numpy(np.concatenate([np.asarray(s) for s in sequences]).astype(np.int64))
    first = torch.zeros(len(tokens), dtype=torch.bool)
    starts = torch.tensor([0] + [len(s) for s in sequences[:-1]]).cumsum(0)
    first[starts[starts < len(tokens)]] = True  # (a record without response rows has no first row)
    rows = torch.arange(len(tokens)) if valid is None else torch.nonzero(valid.cpu()).flatten()
    tokens, first = tokens[rows], first[rows]
    gap = torch.empty(len(rows), dtype=torch.float64)
    p_eos = torch.empty(len(rows), dtype=torch.float64)
    # in row chunks: float64 copies of all N x V rows would be 8x the teacher's float32 rows (~20 GB at V = 50 k)
    for part in _chunks(len(rows), teacher_logprobs.shape[1], None):
        lp = teacher_logprobs[rows[part].to(teacher_logprobs.device)].double()
        nll = -lp.gather(1, tokens[part].to(lp.device)[:, None])[:, 0]
        gap[part] = (nll - (-(lp.exp() * torch.nan_to_num(lp, neginf=0.0)).sum(-1))).cpu()
        if eos_token_id is not None:
            p_eos[part] = lp[:, eos_token_id].exp().cpu()
    out: dict[str, dict[str, float]] = {}
    for name, m in (("first", first), ("rest", ~first)):
        g = gap[m]
        out[name] = {"rows": int(m.sum()), "gap": float(g.mean()) if len(g) else math.nan,
                     "stderr": float(g.std() / math.sqrt(len(g))) if len(g) > 1 else math.nan}
    if eos_token_id is not None:
        p = p_eos
        out["eos"] = {"rows": int(len(tokens)), "expected": float(p.sum()),
                      "stderr": float((p * (1 - p)).sum().sqrt()), "observed": int((tokens == eos_token_id).sum())}
    return out
