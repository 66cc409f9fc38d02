"""Conditioning a posterior on revealed log-probabilities (docs/MATH.md, "Conditioning on revealed
log-probabilities") and the baselines' evidence-only target. Pure functions on tensors: the evidence rows come from
`bayeskd.posterior.evidence` (`indices` int [N, E] with -1 padding, `probs` [N, E], `lower` bool [N, E]), the
posterior from `combine`.

Per row the unlisted tokens of the posterior are one group of identical items (uniform tail), so the water-filling
below works on K + 1 items with weights (1 per listed entry, R for the tail group) and is exact and vectorized.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bayeskd.core.checks import check_dist
from bayeskd.core.sparse import NEG_INF, SparseDist, by_probability

__all__ = ["condition", "evidence_only", "apply_evidence", "MASS_TOL"]

UNREVEALED_MIN = 1e-6  # the least mass left to unrevealed tokens (see _check_evidence)
MASS_TOL = 1e-4  # revealed probabilities may sum to 1 + MASS_TOL (API rounding); they are renormalized. Beyond: error
_F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# validation

def _check_evidence(ev_indices: torch.Tensor, ev_probs: torch.Tensor, ev_lower: torch.Tensor | None, rows: int,
                    vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor]:
    """(indices int64, probs float64 scaled to sum 1 - UNREVEALED_MIN where they sum to more (to 1 where the row
    lists every token), lower bool, valid bool, A = the row's evidence mass after that), all [N, E'] with E' >= 1
    (a padding column is added when E = 0 so that per-row minima exist). Raises ValueError naming the row for
    anything a probability cannot come from."""
    if not isinstance(ev_indices, torch.Tensor) or ev_indices.dim() != 2 or ev_indices.shape[0] != rows:
        raise ValueError(f"evidence indices must be a [N={rows}, E] tensor, got "
                         f"{tuple(getattr(ev_indices, 'shape', ()))}")
    if ev_indices.dtype.is_floating_point or ev_indices.dtype == torch.bool:
        raise ValueError(f"evidence indices must be integers, got {ev_indices.dtype}")
    if not isinstance(ev_probs, torch.Tensor) or ev_probs.shape != ev_indices.shape:
        raise ValueError(f"evidence probs must have the indices' shape {tuple(ev_indices.shape)}, got "
                         f"{tuple(getattr(ev_probs, 'shape', ()))}")
    if not ev_probs.dtype.is_floating_point:
        raise ValueError(f"evidence probs must be floating point, got {ev_probs.dtype}")
    if ev_lower is None:
        ev_lower = torch.zeros(ev_indices.shape, dtype=torch.bool)
    if not isinstance(ev_lower, torch.Tensor) or ev_lower.shape != ev_indices.shape:
        raise ValueError(f"evidence lower-bound flags must have the indices' shape {tuple(ev_indices.shape)}, got "
                         f"{tuple(getattr(ev_lower, 'shape', ()))}")
    idx = ev_indices.to(device=device, dtype=torch.int64)
    p = ev_probs.to(device=device, dtype=_F64)
    low = ev_lower.to(device=device, dtype=torch.bool)
    if idx.shape[1] == 0:
        idx = torch.full((rows, 1), -1, dtype=torch.int64, device=device)
        p, low = torch.zeros(rows, 1, dtype=_F64, device=device), torch.zeros(rows, 1, dtype=torch.bool, device=device)

    def fail(bad: torch.Tensor, what: str) -> None:
        if bad.any():
            row = int(bad.reshape(rows, -1).any(dim=1).nonzero()[0])
            raise ValueError(f"evidence row {row}: {what}")

    fail((idx < -1) | (idx >= vocab_size), f"a token index is outside [0, V={vocab_size})")
    valid = idx >= 0
    fail(valid & ~torch.isfinite(p), "a probability is NaN or infinite")
    fail(valid & (p < 0), "a probability is negative")
    srt = idx.sort(dim=1).values
    fail((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0), "the same token is listed twice")
    p = p.masked_fill(~valid, 0.0)
    low = low & valid
    a = p.sum(dim=1)
    fail(a > 1 + MASS_TOL, "the revealed probabilities sum to more than 1 "
                           f"(max over rows {a.max().item():.6f}; tolerance {MASS_TOL})")
    # rounding: renormalize so that the evidence is a (sub-)distribution, and while some token is not revealed keep
    # UNREVEALED_MIN for the rest (a sharp teacher's top-20 rounds to 1, yet the others are not impossible: with
    # nothing left for them every target would give them zero and the KL to the teacher would be infinite). Built
    # in float64: torch.where on Python numbers gives float32, whose 1 - 1e-6 left them 1.0133e-6
    room = 1 - UNREVEALED_MIN * (valid.sum(dim=1) < vocab_size).to(_F64)
    over = a > room
    p = torch.where(over[:, None], p * (room / a.clamp(min=1e-300))[:, None], p)
    return idx, p, low, valid, torch.where(over, room, a)


def _check_top_k(top_k: int | None, vocab_size: int) -> None:
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, V={vocab_size}]")


# ----------------------------------------------------------------------------------------------------------
# helpers

def _match(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Per row, the column of `keys` holding each `query` token, -1 where the row does not hold it (or query < 0).
    Keys are unique per row apart from -1 padding."""
    if keys.shape[1] == 0:
        return torch.full_like(query, -1)
    skeys, order = keys.sort(dim=1)
    pos = torch.searchsorted(skeys, query.contiguous()).clamp(max=keys.shape[1] - 1)
    found = (skeys.gather(1, pos) == query) & (query >= 0)
    return torch.where(found, order.gather(1, pos), torch.full_like(query, -1))


def _sorted_topk(idx: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Entries sorted by probability (combine's order: one stable sort, unused slots last), the first `k` kept and
    the rest added to the tail, or padded with -1 / -inf up to `k`."""
    order = by_probability(idx, lp)
    idx, lp = idx.gather(1, order), lp.gather(1, order)
    if k < idx.shape[1]:
        tail = tail + lp[:, k:].to(_F64).exp().sum(dim=1).to(tail.dtype)  # dropped entries join the tail
        idx, lp = idx[:, :k], lp[:, :k]
    elif k > idx.shape[1]:
        idx = F.pad(idx, (0, k - idx.shape[1]), value=-1)
        lp = F.pad(lp, (0, k - lp.shape[1]), value=NEG_INF)
    return idx, lp.masked_fill(idx < 0, NEG_INF), tail


# ----------------------------------------------------------------------------------------------------------
# the water-filling

def _water_fill(r: torch.Tensor, w: torch.Tensor, r_low: torch.Tensor, is_low: torch.Tensor, mass: torch.Tensor,
                cap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spread `mass` [N] over capped items (posterior weight `r` [N, I], multiplicity `w` [N, I], 0 = absent) and
    uncapped lower-bound entries (`r_low` [N, E], `is_low` [N, E]): each capped item ends at min(c·r, cap), each
    lower-bound entry gains c·r_low, with c solving Σ w·min(c·r, cap) + Σ c·r_low = mass.

    This is the limit ε -> 0 of the same rule on r + ε (docs/MATH.md): when the positive-r items cannot take the
    mass (no lower-bound entry with r_low > 0 and every positive-r item at the cap leaves mass over), the rest goes
    uniformly to the zero-r items and lower-bound entries (cap still on the items); when even every item at the cap
    cannot take it and there is no lower-bound entry, the cap is relaxed: every item at the cap, the rest in
    proportion to r (uniformly when all r are 0).

    Returns (per-item value [N, I], per-lower-bound-entry gain [N, E], relaxed [N] bool).
    """
    cap_ = cap[:, None]
    present = w > 0
    pos = present & (r > 0)
    s_low = (r_low * is_low).sum(dim=1)  # slope of the uncapped lower-bound entries

    # stage 1: f(c) = Σ w·min(c·r, cap) + c·s_low is piecewise linear; its kinks are the breakpoints cap / r.
    # Sorted ascending, at breakpoint b_k the items before k are capped and the rest (with s_low) still grow:
    # f(b_k) = cap·C_k + b_k·S_k, C_k = Σ_{i<k} w_i, S_k = s_low + Σ_{i>=k} w_i r_i. The first k with
    # f(b_k) >= mass brackets c, and c = (mass - cap·C_k) / S_k on that segment.
    bp = torch.where(pos, cap_ / torch.where(pos, r, torch.ones_like(r)), torch.full_like(r, float("inf")))
    bp_s, order = bp.sort(dim=1)
    pos_s = pos.gather(1, order)
    w_s = torch.where(pos, w, torch.zeros_like(w)).gather(1, order)
    wr_s = torch.where(pos, w * r, torch.zeros_like(r)).gather(1, order)
    c_excl = w_s.cumsum(dim=1) - w_s
    s_suf = s_low[:, None] + wr_s.flip(1).cumsum(dim=1).flip(1)
    f_k = torch.where(pos_s, cap_ * c_excl + torch.where(pos_s, bp_s, torch.zeros_like(bp_s)) * s_suf,
                      torch.full_like(bp_s, float("inf")))
    hit = pos_s & (f_k >= mass[:, None])
    found = hit.any(dim=1)
    k = hit.to(torch.int8).argmax(dim=1, keepdim=True)  # the first hit
    c_found = (mass - cap * c_excl.gather(1, k)[:, 0]) / s_suf.gather(1, k)[:, 0].clamp(min=1e-300)
    w_pos = w_s.sum(dim=1)  # items that saturate at the cap
    c_lin = (mass - cap * w_pos) / s_low.clamp(min=1e-300)  # past the last breakpoint only s_low grows
    ok1 = found | (s_low > 0)
    c = torch.where(found, c_found, torch.where(s_low > 0, c_lin, torch.zeros_like(c_lin))).clamp(min=0)
    val = torch.where(present, torch.minimum(c[:, None] * r, cap_), torch.zeros_like(r))
    gain = torch.where(is_low, c[:, None] * r_low, torch.zeros_like(r_low))
    relaxed = torch.zeros_like(ok1)
    rest = (~ok1).nonzero()[:, 0]
    if rest.numel():  # rare rows: stages 2 and 3 on those only
        v2, g2, relaxed[rest] = _beyond_positive(r[rest], w[rest], is_low[rest], mass[rest], cap[rest], w_pos[rest])
        val[rest], gain[rest] = v2, g2
    return val, gain, relaxed


def _beyond_positive(r: torch.Tensor, w: torch.Tensor, is_low: torch.Tensor, mass: torch.Tensor, cap: torch.Tensor,
                     w_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stages 2 and 3 of `_water_fill`, for rows whose positive-r items cannot take the mass (every lower-bound
    entry here has r = 0). Same returns, on these rows."""
    cap_ = cap[:, None]
    present = w > 0
    pos = present & (r > 0)
    n_low = is_low.sum(dim=1).to(_F64)

    # stage 2 (the ε -> 0 limit): positive-r items at the cap, the rest m2 uniformly over the zero-r items (capped)
    # and the lower-bound entries (uncapped)
    zero = present & (r <= 0)
    z = torch.where(zero, w, torch.zeros_like(w)).sum(dim=1)
    m2 = (mass - cap * w_pos).clamp(min=0)
    d = m2 / (z + n_low).clamp(min=1)
    fits = d <= cap
    ok2 = (z + n_low > 0) & (fits | (n_low > 0))
    val2 = torch.where(pos, cap_, torch.where(zero, torch.minimum(d, cap)[:, None], torch.zeros_like(r)))
    gain2 = torch.where(fits, d, (m2 - z * cap) / n_low.clamp(min=1))[:, None].expand(is_low.shape)

    # stage 3 (relaxation; no lower-bound entry here): every item at the cap, the rest in proportion to r
    n_items = torch.where(present, w, torch.zeros_like(w)).sum(dim=1)
    m3 = (mass - cap * n_items).clamp(min=0)
    r_sum = torch.where(present, w * r, torch.zeros_like(r)).sum(dim=1)
    share = torch.where(r_sum[:, None] > 0, r / r_sum.clamp(min=1e-300)[:, None],
                        1 / n_items.clamp(min=1)[:, None].expand_as(r))
    val3 = cap_ + m3[:, None] * share

    val = torch.where(ok2[:, None], val2, val3)
    gain = torch.where(ok2[:, None] & is_low, gain2, torch.zeros_like(gain2))
    return torch.where(present, val, torch.zeros_like(val)), gain, ~ok2


# ----------------------------------------------------------------------------------------------------------
# the two public functions

def condition(posterior: SparseDist, ev_indices: torch.Tensor, ev_probs: torch.Tensor,
              ev_lower: torch.Tensor | None = None, *, top_k: int | None = None,
              cap: torch.Tensor | None = None) -> SparseDist:
    """The posterior conditioned on revealed probabilities (docs/MATH.md, "Conditioning on revealed
    log-probabilities").

    Per row, with the evidence entries E = X (exact, probabilities p) ∪ L (lower bounds l; `ev_lower`, None = all
    exact) and A = Σp + Σl: exact entries keep p; the rest M = 1 − A goes to every token outside X in proportion to
    the posterior's probability r, no token outside E above m = the row's smallest evidence probability (water-
    filling), lower-bound entries ending at l + c·r. Rows without evidence (all -1) are the posterior's row, bit for
    bit (unless `top_k` is below its number of listed entries: then truncated as `combine` truncates).
    `cap` [N]: m per row when the evidence says it better (an API always returns the sampled token's own
    probability, which may lie below its top-k list: the list's smallest value is then the true bound).

    Result: the union of the evidence and the posterior's listed tokens, sorted by probability, tail = the mass of
    the tokens neither lists (still uniform over them); K = `top_k` or max(posterior K, largest union), the
    entries past K joining the tail. float64 inside; logprobs float32 (float64 if the posterior's are), tail
    likewise. The posterior's per-row extras are carried over. Raises ValueError naming the row when the evidence
    sums to more than 1 + MASS_TOL, lists a token twice, or lists every token as exact with A < 1 − MASS_TOL.
    """
    check_dist(posterior, "posterior")
    v, n, k_post = posterior.vocab_size, posterior.num_rows, posterior.k
    _check_top_k(top_k, v)
    dev = posterior.indices.device
    e_idx, e_p, e_low, e_valid, a = _check_evidence(ev_indices, ev_probs, ev_lower, n, v, dev)
    has_ev = e_valid.any(dim=1)
    lp_dtype = _F64 if posterior.logprobs.dtype == _F64 else torch.float32
    tail_dtype = _F64 if posterior.tail.dtype == _F64 else torch.float32

    # the posterior: listed probabilities, the per-token mass tau of its unlisted tokens
    p_idx = posterior.indices.long()
    p_listed = p_idx >= 0
    p_prob = torch.where(p_listed, posterior.logprobs.to(_F64).exp(), torch.zeros((), dtype=_F64, device=dev))
    n_unlisted = v - p_listed.sum(dim=1)
    tau = torch.where(n_unlisted > 0, posterior.tail.to(_F64).clamp(min=0) / n_unlisted.clamp(min=1),
                      torch.zeros((), dtype=_F64, device=dev))

    # r of each evidence token (listed value or tau); which posterior entries are evidence
    col = _match(p_idx, e_idx)
    r_ev = torch.where(col >= 0, p_prob.gather(1, col.clamp(min=0)), tau[:, None]).masked_fill(~e_valid, 0.0)
    outside = p_listed & (_match(e_idx, p_idx) < 0)  # listed by the posterior, not evidence: capped items
    n_tail = n_unlisted - (e_valid & (col < 0)).sum(dim=1)  # tokens neither lists: one group of identical items

    mass = (1 - a).clamp(min=0)
    if cap is None:
        cap = e_p.masked_fill(~e_valid, float("inf")).amin(dim=1)
    else:
        cap = torch.as_tensor(cap, dtype=_F64, device=dev).reshape(-1)
        if cap.shape != (n,) or not bool(((cap > 0) & (cap <= 1 + MASS_TOL)).all()):
            raise ValueError(f"cap must hold one value in (0, 1] per row ({n}), got shape {tuple(cap.shape)}")
    cap = torch.where(has_ev, cap, torch.ones_like(cap))  # rows without evidence: anything finite, replaced below
    r_items = torch.cat([torch.where(outside, p_prob, torch.zeros_like(p_prob)), tau[:, None]], dim=1)
    w_items = torch.cat([outside.to(_F64), n_tail.to(_F64)[:, None]], dim=1)
    val, gain, _ = _water_fill(r_items, w_items, r_ev, e_low, mass, cap)

    # every token exact evidence: nowhere for M to go; within rounding the exact entries are renormalized
    all_exact = has_ev & (w_items.sum(dim=1) == 0) & (e_low.sum(dim=1) == 0)
    stuck = all_exact & (mass > MASS_TOL)
    if stuck.any():
        row = int(stuck.nonzero()[0])
        raise ValueError(f"evidence row {row}: every token of the vocabulary is revealed exactly, but the "
                         f"probabilities sum to {a[row].item():.6f} < 1")
    e_p = torch.where(all_exact[:, None] & (a[:, None] > 0), e_p / a.clamp(min=1e-300)[:, None], e_p)

    ev_val = torch.where(e_low, e_p + gain, e_p)
    cand_idx = torch.cat([p_idx.masked_fill(~outside, -1), e_idx.masked_fill(~e_valid, -1)], dim=1)
    cand_p = torch.cat([val[:, :k_post], ev_val], dim=1)
    cand_lp = cand_p.log().masked_fill(cand_idx < 0, NEG_INF)
    tail = n_tail.to(_F64) * val[:, k_post]
    n_union = (cand_idx >= 0).sum(dim=1)
    k = top_k if top_k is not None else max(k_post, int(n_union.max()) if n > 0 else 0, 1)
    out_idx, out_lp, out_tail = _sorted_topk(cand_idx, cand_lp, tail, k)

    # rows without evidence: the posterior's own tensors, so that they stay bit for bit
    if not has_ev.all():
        v_idx, v_lp = posterior.indices.long(), posterior.logprobs.to(lp_dtype).masked_fill(~p_listed, NEG_INF)
        v_tail = posterior.tail.to(tail_dtype)
        fits = ~p_listed[:, k:].any(dim=1) if k < k_post else torch.ones(n, dtype=torch.bool, device=dev)
        pad = max(k - k_post, 0)
        v_idx_k = F.pad(v_idx, (0, pad), value=-1)[:, :k]
        v_lp_k = F.pad(v_lp, (0, pad), value=NEG_INF)[:, :k]
        t_idx, t_lp, t_tail = _sorted_topk(v_idx, v_lp, v_tail, k)  # rows with entries past top_k
        keep = ~has_ev
        out_idx = torch.where(keep[:, None], torch.where(fits[:, None], v_idx_k, t_idx), out_idx)
        out_lp = torch.where(keep[:, None], torch.where(fits[:, None], v_lp_k, t_lp), out_lp.to(lp_dtype))
        out_tail = torch.where(keep, torch.where(fits, v_tail, t_tail), out_tail.to(tail_dtype))
    return SparseDist(out_idx.to(torch.int32), out_lp.to(lp_dtype), out_tail.to(tail_dtype), v,
                      posterior.temperature, dict(posterior.extras))


def evidence_only(ev_indices: torch.Tensor, ev_probs: torch.Tensor, vocab_size: int, *,
                  top_k: int | None = None) -> SparseDist:
    """The baselines' target: the revealed entries as they are, the rest 1 − A spread uniformly over the other
    V − |E| tokens (the SparseDist tail). With the loss's tail="bucket" this is TRL's top-k + one bucket; as a
    distribution (`to_dense`) it is DistillKit's uniform tail. Lower-bound flags do not matter here: the baselines
    take every revealed value as it is. A row without evidence is the uniform distribution (no entries, tail 1).

    K = `top_k` or the largest evidence row (at least 1), sorted by probability, entries past K joining the tail.
    float32 out. Raises like `condition` (evidence above 1 + MASS_TOL, a token twice, every token listed with
    A < 1 − MASS_TOL).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    _check_top_k(top_k, vocab_size)
    dev = ev_indices.device if isinstance(ev_indices, torch.Tensor) else None
    n = int(ev_indices.shape[0]) if isinstance(ev_indices, torch.Tensor) else -1
    e_idx, e_p, _, e_valid, a = _check_evidence(ev_indices, ev_probs, None, n, vocab_size, dev)
    n_rest = vocab_size - e_valid.sum(dim=1)
    mass = (1 - a).clamp(min=0)
    stuck = (n_rest == 0) & (mass > MASS_TOL)
    if stuck.any():
        row = int(stuck.nonzero()[0])
        raise ValueError(f"evidence row {row}: every token of the vocabulary is revealed, but the probabilities "
                         f"sum to {a[row].item():.6f} < 1")
    full = (n_rest == 0) & (a > 0)
    e_p = torch.where(full[:, None], e_p / a.clamp(min=1e-300)[:, None], e_p)
    tail = torch.where(n_rest == 0, torch.zeros_like(mass), mass)
    lp = e_p.log().masked_fill(~e_valid, NEG_INF)
    k = top_k if top_k is not None else max(int(e_valid.sum(dim=1).max()) if n > 0 else 0, 1)
    idx, lp, tail = _sorted_topk(e_idx.masked_fill(~e_valid, -1), lp, tail, k)
    return SparseDist(idx.to(torch.int32), lp.to(torch.float32), tail.to(torch.float32), vocab_size)


def apply_evidence(post: SparseDist, evidence, mode: str, top_k: int) -> SparseDist:
    """The posterior rows conditioned on the revealed entries (`mode` "condition"), or replaced by them with a
    uniform tail where there are some ("evidence_only", the baselines); rows without evidence are unchanged.
    Per-row extras (the proxy's teacher-token log-probability) are kept."""
    idx, probs = torch.from_numpy(evidence.indices), torch.from_numpy(evidence.probs)
    if mode == "condition":
        out = condition(post, idx, probs, torch.from_numpy(evidence.lower), top_k=top_k,
                        cap=torch.from_numpy(evidence.cap))
    else:
        base = evidence_only(idx, probs, post.vocab_size, top_k=top_k)
        out = _merge_rows(post, base, torch.from_numpy(evidence.has))
    return SparseDist(out.indices, out.logprobs, out.tail, out.vocab_size, post.temperature, dict(post.extras))


def _merge_rows(a: SparseDist, b: SparseDist, take_b: torch.Tensor) -> SparseDist:
    """Row i from `b` where take_b[i], else from `a` (padding both to the larger K)."""
    k = max(a.k, b.k)

    def pad(d: SparseDist) -> tuple[torch.Tensor, torch.Tensor]:
        extra = k - d.k
        return (torch.nn.functional.pad(d.indices, (0, extra), value=-1),
                torch.nn.functional.pad(d.logprobs.float(), (0, extra), value=float("-inf")))

    (ai, al), (bi, bl) = pad(a), pad(b)
    m = take_b[:, None]
    return SparseDist(torch.where(m, bi, ai), torch.where(m, bl, al), torch.where(take_b, b.tail.float(),
                      a.tail.float()), a.vocab_size, a.temperature)
