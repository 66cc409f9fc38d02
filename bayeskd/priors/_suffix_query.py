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
def _query_range(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, b_cc, V, order, max_levels, max_support,
                 beta, loo, out_idx, out_lp, out_tail, out_cc, out_ml, lo_q, hi_q):
    n = len(rev)
    sep = V
    K = out_idx.shape[1]
    acc = np.zeros(V + 1, np.float64)
    cnt_w = np.zeros(V + 1, np.float64)
    in_row = np.zeros(V + 1, np.bool_)
    touched = np.empty(max_levels * max_support + K + 1, np.int64)
    lv_lo = np.empty(max_levels, np.int64)
    lv_hi = np.empty(max_levels, np.int64)
    lv_cnt = np.empty(max_levels, np.int64)
    sep_lo, sep_hi = _narrow(rev, sa, 0, n, 0, sep)
    # the rank of the corpus-final SEP (reversed: suffix 0, among the SEP-led ones): an occurrence followed by
    # nothing, never a continuation. Only the context `SEP` alone (a record start without prompt) holds it: its
    # level at order 1 and its match length. A scan of the record starts, once per call.
    end_rank = -1
    for i in range(sep_lo, sep_hi):
        if sa[i] == 0:
            end_rank = i
            break
    for q in range(lo_q, hi_q):
        p = pos[q]
        rs = rec_start[q]
        y = hist[p]
        # --- narrow the range one context token at a time (the record start, SEP, is the last one)
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
                    lv_lo[nlv - 1], lv_hi[nlv - 1] = lo, hi
                else:
                    if nlv == max_levels:  # keep the deepest max_levels
                        for j in range(nlv - 1):
                            lv_lo[j], lv_hi[j], lv_cnt[j] = lv_lo[j + 1], lv_hi[j + 1], lv_cnt[j + 1]
                        nlv -= 1
                    lv_lo[nlv], lv_hi[nlv], lv_cnt[nlv] = lo, hi, cnt
                    nlv += 1
            if c == sep:
                break
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
            lo, hi = lv_lo[j], lv_hi[j]
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
            scale = (lv_cnt[j] + (1 if loo else 0)) / seen if seen > 0 else 0.0
            total = 0.0
            types = 0
            for i in range(first_t, nt):
                w = touched[i]
                cw = cnt_w[w] * scale - (1.0 if (loo and w == y) else 0.0)
                cnt_w[w] = max(cw, 0.0)
                total += cnt_w[w]
                if cnt_w[w] > 0.0:
                    types += 1
            if total > 0.0:
                alpha = total / (total + beta * types)
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


@nb.njit(cache=True, parallel=True)
def _query_parallel(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, b_cc, V, order, max_levels, max_support,
                    beta, loo, out_idx, out_lp, out_tail, out_cc, out_ml, parts):
    n = len(pos)
    for t in nb.prange(parts):
        lo = n * t // parts
        hi = n * (t + 1) // parts
        _query_range(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, b_cc, V, order, max_levels, max_support,
                     beta, loo, out_idx, out_lp, out_tail, out_cc, out_ml, lo, hi)


def query_rows(rev, sa, hist, pos, rec_start, b_idx, b_lp, b_tail, b_cc, V, order, max_levels, max_support, beta,
               loo, out_idx, out_lp, out_tail, out_cc, out_ml) -> None:
    """Fill the output rows of the query positions `pos` (indices into `hist`, records starting at `rec_start`)."""
    parts = max(1, min(nb.get_num_threads(), len(pos) // 1024 or 1))
    _query_parallel(rev, sa, hist, np.ascontiguousarray(pos), np.ascontiguousarray(rec_start), b_idx, b_lp,
                    b_tail, b_cc, int(V), int(order), int(max_levels), int(max_support), float(beta), bool(loo),
                    out_idx, out_lp, out_tail, out_cc, out_ml, parts)
