"""The compiled per-position query of `bayeskd.priors.suffix` (numba): suffix-array range narrowing, the
leave-one-out continuation counts of the deepest distinct levels, Witten-Bell over them and the n-gram row, top-K.
Read `bayeskd.priors.suffix` first; this file only makes it fast."""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def _narrow(rev, sa, lo, hi, d, c):
    """The ranks in [lo, hi) whose suffix holds token c at offset d (the ranks share their first d tokens, so the
    token at offset d is sorted there; a suffix that ends before offset d sorts first, as -1)."""
    n = len(rev)
    a, b = lo, hi
    while a < b:
        m = (a + b) >> 1
        j = sa[m] + d
        t = rev[j] if j < n else -1
        if t < c:
            a = m + 1
        else:
            b = m
    first = a
    b = hi
    while a < b:
        m = (a + b) >> 1
        j = sa[m] + d
        t = rev[j] if j < n else -1
        if t <= c:
            a = m + 1
        else:
            b = m
    return first, a


@nb.njit(cache=True, nogil=True)
def _find_levels(rev, sa, hist, p, rs, sep, sep_lo, sep_hi, end_rank, order, max_levels, loo, lv_lo, lv_hi, lv_cnt,
                 lv_d):
    """Narrow the range one context token at a time (the record start, SEP, is the last one); fill the deepest
    `max_levels` levels shallow to deep (their range, leave-one-out count and deepest context length) and return
    (levels, match length)."""
    n = len(rev)
    lo, hi, slo, shi = 0, n, sep_lo, sep_hi
    nlv = 0
    match_d = 0
    for d in range(1, p - rs + 2):
        c = hist[p - d] if d <= p - rs else sep
        lo2, hi2 = _narrow(rev, sa, lo, hi, d - 1, c)
        slo2, shi2 = _narrow(rev, sa, slo, shi, d, c)
        # occurrences followed by a real token (not by a record end nor the corpus end), less this position's own
        cnt = (hi2 - lo2) - (shi2 - slo2) - (1 if lo2 <= end_rank < hi2 else 0) - (1 if loo else 0)
        if cnt <= 0:
            break
        lo, hi, slo, shi = lo2, hi2, slo2, shi2
        match_d = d
        if d >= order:
            if nlv > 0 and lv_cnt[nlv - 1] == cnt:  # same occurrences: one level
                lv_lo[nlv - 1], lv_hi[nlv - 1], lv_d[nlv - 1] = lo, hi, d
            else:
                if nlv == max_levels:  # keep the deepest max_levels
                    for j in range(nlv - 1):
                        lv_lo[j], lv_hi[j], lv_cnt[j], lv_d[j] = lv_lo[j + 1], lv_hi[j + 1], lv_cnt[j + 1], lv_d[j + 1]
                    nlv -= 1
                lv_lo[nlv], lv_hi[nlv], lv_cnt[nlv], lv_d[nlv] = lo, hi, cnt, d
                nlv += 1
        if c == sep:
            break
    return nlv, match_d


@nb.njit(cache=True, nogil=True)
def _count_level(rev, sa, lo, hi, cnt, max_support, sep, loo, y, cnt_w, touched, nt):
    """Add the leave-one-out continuation counts of the level at ranks [lo, hi) (`cnt` occurrences) to `cnt_w`,
    listing new tokens in `touched` from `nt`; returns (nt, total, distinct continuations)."""
    width = hi - lo
    step = width / max_support if width > max_support else 1.0
    m = min(width, max_support)
    seen = 0.0
    first_t = nt
    for i in range(m):
        s = sa[lo + int(i * step)]
        if s == 0:
            continue
        w = rev[s - 1]
        if w == sep:
            continue
        if cnt_w[w] == 0.0:
            touched[nt] = w
            nt += 1
        cnt_w[w] += 1.0
        seen += 1.0
    scale = (cnt + (1 if loo else 0)) / seen if seen > 0 else 0.0
    total = 0.0
    types = 0
    for i in range(first_t, nt):
        w = touched[i]
        cw = cnt_w[w] * scale - (1.0 if (loo and w == y) else 0.0)
        cnt_w[w] = max(cw, 0.0)
        total += cnt_w[w]
        if cnt_w[w] > 0.0:
            types += 1
    return nt, total, types


@nb.njit(cache=True, nogil=True)
def _bucket(d, beta_depths):
    """The index of the weight for a level whose context is `d` tokens long: how many of `beta_depths` are <= d."""
    b = 0
    while b < len(beta_depths) and beta_depths[b] <= d:
        b += 1
    return b


@nb.njit(cache=True, nogil=True)
def _separator_ranks(rev, sa, sep):
    """The range of the SEP-led suffixes and the rank of the corpus-final SEP among them (reversed: suffix 0), an
    occurrence followed by nothing, never a continuation. Only the context `SEP` alone (a record start without
    prompt) holds it: its level at order 1 and its match length. A scan of the record starts, once per call."""
    sep_lo, sep_hi = _narrow(rev, sa, 0, len(rev), 0, sep)
    end_rank = -1
    for i in range(sep_lo, sep_hi):
        if sa[i] == 0:
            end_rank = i
            break
    return sep_lo, sep_hi, end_rank


@nb.njit(cache=True, nogil=True)
def _query_range(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, b_cc, V, order, max_levels, max_support,
                 betas, beta_depths, loo, out_idx, out_lp, out_tail, out_cc, out_ml, lo_q, hi_q):
    sep = V
    K = out_idx.shape[1]
    acc = np.zeros(V + 1, np.float64)
    cnt_w = np.zeros(V + 1, np.float64)
    in_row = np.zeros(V + 1, np.bool_)
    touched = np.empty(max_levels * max_support + K + 1, np.int64)
    lv_lo = np.empty(max_levels, np.int64)
    lv_hi = np.empty(max_levels, np.int64)
    lv_cnt = np.empty(max_levels, np.int64)
    lv_d = np.empty(max_levels, np.int64)
    sep_lo, sep_hi, end_rank = _separator_ranks(rev, sa, sep)
    for q in range(lo_q, hi_q):
        y = hist[pos[q]]
        nlv, match_d = _find_levels(rev, sa, hist, pos[q], rec_start[q], sep, sep_lo, sep_hi, end_rank, order,
                                    max_levels, loo, lv_lo, lv_hi, lv_cnt, lv_d)
        out_ml[q] = match_d
        if nlv == 0:  # no long context: the n-gram row as it is
            out_idx[q, :] = b_idx[q, :]
            out_lp[q, :] = b_lp[q, :]
            out_tail[q] = b_tail[q]
            out_cc[q] = b_cc[q]
            continue
        out_cc[q] = lv_cnt[nlv - 1]
        # --- Witten-Bell, deepest level first: coef of level j = alpha_j * prod_{i>j} (1 - alpha_i)
        nt = 0
        rest = 1.0
        for j in range(nlv - 1, -1, -1):
            first_t = nt
            nt, total, types = _count_level(rev, sa, lv_lo[j], lv_hi[j], lv_cnt[j], max_support, sep, loo, y, cnt_w,
                                            touched, nt)
            if total > 0.0:
                alpha = total / (total + betas[_bucket(lv_d[j], beta_depths)] * types)
                for i in range(first_t, nt):
                    w = touched[i]
                    acc[w] += rest * alpha * cnt_w[w] / total
                rest *= 1.0 - alpha
            # the next (shallower) level counts afresh
            for i in range(first_t, nt):
                cnt_w[touched[i]] = 0.0
        # --- the n-gram row (listed entries + uniform tail share) gets what the levels left
        listed = 0
        for i in range(K):
            if b_idx[q, i] >= 0:
                listed += 1
        share = b_tail[q] / (V - listed) if V > listed else 0.0
        for i in range(K):
            w = b_idx[q, i]
            if w < 0:
                continue
            in_row[w] = True
            touched[nt] = w  # duplicates of level tokens are dropped below
            nt += 1
            acc[w] += rest * np.exp(np.float64(b_lp[q, i]))
        # candidates: every token a level or the n-gram lists (deduplicated)
        cand = np.empty(nt, np.int64)
        cp = np.empty(nt, np.float64)
        nc = 0
        for i in range(nt):
            w = touched[i]
            if not in_row[w]:
                acc[w] += rest * share
                in_row[w] = True
            if cnt_w[w] == 0.0:
                cnt_w[w] = 1.0  # mark: a candidate already
                cand[nc] = w
                cp[nc] = acc[w]
                nc += 1
        order_ = np.argsort(-cp[:nc], kind="mergesort")
        kept = 0.0
        for i in range(K):
            if i < nc:
                w = cand[order_[i]]
                out_idx[q, i] = w
                out_lp[q, i] = np.log(cp[order_[i]])
                kept += cp[order_[i]]
            else:
                out_idx[q, i] = -1
                out_lp[q, i] = -np.inf
        out_tail[q] = max(0.0, 1.0 - kept)
        for i in range(nc):
            w = cand[i]
            acc[w] = 0.0
            cnt_w[w] = 0.0
            in_row[w] = False


@nb.njit(cache=True, nogil=True)
def _stats_range(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, V, order, max_levels, max_support, loo, p0_y,
                 c_y, c_tot, c_types, depth, lo_q, hi_q):
    sep = V
    K = b_idx.shape[1]
    cnt_w = np.zeros(V + 1, np.float64)
    touched = np.empty(max_support + 1, np.int64)
    lv_lo = np.empty(max_levels, np.int64)
    lv_hi = np.empty(max_levels, np.int64)
    lv_cnt = np.empty(max_levels, np.int64)
    lv_d = np.empty(max_levels, np.int64)
    sep_lo, sep_hi, end_rank = _separator_ranks(rev, sa, sep)
    for q in range(lo_q, hi_q):
        y = hist[pos[q]]
        listed = 0
        p0_y[q] = -1.0
        for i in range(K):
            if b_idx[q, i] >= 0:
                listed += 1
                if b_idx[q, i] == y:
                    p0_y[q] = np.exp(np.float64(b_lp[q, i]))
        if p0_y[q] < 0.0:
            p0_y[q] = b_tail[q] / (V - listed) if V > listed else 0.0
        nlv, _ = _find_levels(rev, sa, hist, pos[q], rec_start[q], sep, sep_lo, sep_hi, end_rank, order, max_levels,
                              loo, lv_lo, lv_hi, lv_cnt, lv_d)
        for j in range(max_levels):
            c_y[q, j], c_tot[q, j], c_types[q, j], depth[q, j] = 0.0, 0.0, 0.0, 0
        for j in range(nlv):
            nt, total, types = _count_level(rev, sa, lv_lo[j], lv_hi[j], lv_cnt[j], max_support, sep, loo, y, cnt_w,
                                            touched, 0)
            c_y[q, j], c_tot[q, j], c_types[q, j], depth[q, j] = cnt_w[y], total, types, lv_d[j]
            for i in range(nt):
                cnt_w[touched[i]] = 0.0


@nb.njit(cache=True, parallel=True)
def _query_parallel(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, b_cc, V, order, max_levels, max_support,
                    betas, beta_depths, loo, out_idx, out_lp, out_tail, out_cc, out_ml, parts):
    n = len(pos)
    for t in nb.prange(parts):
        lo = n * t // parts
        hi = n * (t + 1) // parts
        _query_range(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, b_cc, V, order, max_levels, max_support,
                     betas, beta_depths, loo, out_idx, out_lp, out_tail, out_cc, out_ml, lo, hi)


@nb.njit(cache=True, parallel=True)
def _stats_parallel(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, V, order, max_levels, max_support, loo, p0_y,
                    c_y, c_tot, c_types, depth, parts):
    n = len(pos)
    for t in nb.prange(parts):
        _stats_range(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, V, order, max_levels, max_support, loo,
                     p0_y, c_y, c_tot, c_types, depth, n * t // parts, n * (t + 1) // parts)


def _parts(n: int) -> int:
    return max(1, min(nb.get_num_threads(), n // 1024 or 1))


def query_rows(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, b_cc, V, order, max_levels, max_support, betas,
               beta_depths, loo, out_idx, out_lp, out_tail, out_cc, out_ml) -> None:
    """Fill the output rows of the query positions `pos` (indices into `hist`, records starting at `rec_start`);
    a level whose context is d tokens long has weight `betas[i]`, i = how many of `beta_depths` are <= d."""
    _query_parallel(rev, sa, hist, np.ascontiguousarray(pos), np.ascontiguousarray(rec_start), b_idx, b_lp,
                    b_tail, b_cc, int(V), int(order), int(max_levels), int(max_support),
                    np.asarray(betas, np.float64), np.asarray(beta_depths, np.int64), bool(loo),
                    out_idx, out_lp, out_tail, out_cc, out_ml, _parts(len(pos)))


def level_stats(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, V, order, max_levels, max_support, loo):
    """What the likelihood of the observed token needs at every query position, whatever the weights: its n-gram
    probability p0_y [n], and per level (shallow to deep, [n, max_levels], zeros past the last) its continuation
    count c_y, the total c, the distinct continuations T and the level's context length (0: no level)."""
    n = len(pos)
    p0_y = np.empty(n, np.float64)
    c_y, c_tot, c_types = (np.empty((n, max_levels), np.float64) for _ in range(3))
    depth = np.empty((n, max_levels), np.int64)
    _stats_parallel(rev, sa, hist, np.ascontiguousarray(pos), np.ascontiguousarray(rec_start), b_idx, b_lp, b_tail,
                    int(V), int(order), int(max_levels), int(max_support), bool(loo), p0_y, c_y, c_tot, c_types,
                    depth, _parts(n))
    return p0_y, c_y, c_tot, c_types, depth
