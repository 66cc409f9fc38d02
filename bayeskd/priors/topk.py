"""Exact fast top-K queries of the n-gram prior (the machinery behind `NGramPrior.topk`).

For a seen context h, every token unseen after h scores gamma(h) * p_{n-1}(w|h'), so the top-K of h lies in
seen(h) ∪ topK(h'). Lists are built bottom-up over orders, once per unique query row, with rank-merges of the
(already sorted) parent list and the few seen continuations. Contexts with more than SEEN_CAP continuations keep
only their SEEN_CAP largest as candidates; rows where that cannot be certified exact fall back to a dense pass.
"""
from __future__ import annotations

import numpy as np
import torch

from bayeskd.priors.counting import _find

ROW_CHUNK = 1 << 13  # rows merged at once: bounds the [rows, K] temporaries of one merge
SEEN_CAP = 128  # contexts with more continuations than this keep only their SEEN_CAP largest as candidates


class TopKMixin:
    """The per-chunk top-K machinery of `NGramPrior`, which supplies: order, base, vocab_size, smoothing, bos,
    `_ord` (the per-order `counting._Order` tables) and the smoothing formulas `_num` and `_coeffs`."""

    def _suf(self, n: int) -> np.ndarray:
        o = self._ord[n - 1]
        if o.suf is None:
            o.suf = _find(self._ord[n - 2].keys, o.keys % self.base ** (n - 1))
        return o.suf

    def _perm(self, n: int) -> np.ndarray:
        o = self._ord[n - 1]
        if o.perm is None:
            o.perm = np.lexsort((-o.num, o.ctx_id))
        return o.perm

    @staticmethod
    def _finish_rows(W: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Output form of top-K rows: (ids int32, log-probs float32, tail mass float32); zero-probability
        entries (only MLE has them) become padding (-1, -inf)."""
        tail = np.maximum(1.0 - P.sum(axis=1), 0.0).astype(np.float32)
        P32 = P.astype(np.float32)
        with np.errstate(divide="ignore"):
            lp = np.log(P32)
        zero = P <= 0
        if zero.any():
            W = W.copy()
            W[zero], lp[zero] = -1, -np.inf
        return W, lp, tail

    def _topk_chunk(self, flat: np.ndarray, p: np.ndarray, K: int, loo: bool, idx_out: np.ndarray,
                    lp_out: np.ndarray, tail_out: np.ndarray, cc_out: np.ndarray) -> None:
        N, B, V = self.order, self.base, self.vocab_size
        kn = self.smoothing == "kneser_ney"
        w_t = flat[p]
        # per order: context id of the position's history and (LOO) entry id of its n-gram
        cids, ents, hkey = [], [], np.zeros(len(p), np.int64)
        for n in range(1, N + 1):
            if n > 1:
                hkey = hkey + flat[p - (n - 1)] * B ** (n - 2)
            o = self._ord[n - 1]
            cids.append(_find(o.ctx_keys, hkey))
            ents.append(_find(o.keys, hkey * B + w_t) if loo else None)
        deltas = []
        if loo:
            # a position of the fitted corpus has its own n-gram counted at every order; one that was never counted
            # proves these sequences are other data, where leave-one-out would remove other occurrences' counts
            unseen = int((ents[N - 1] < 0).sum())
            if unseen:
                raise ValueError(f"leave_one_out: {unseen} of {len(p)} positions have an order-{N} n-gram this prior "
                                 "never counted, so these sequences are not the data it was fitted on (leave-one-out "
                                 "would remove counts that belong to other occurrences); query them with "
                                 "leave_one_out=False (estimate-posterior --no-leave-one-out) or fit the prior on them")
            for n in range(1, N + 1):
                e = ents[n - 1]
                d = e >= 0
                if kn and n < N:
                    # the continuation count drops only when this position's (n+1)-gram type disappears
                    e1 = ents[n]
                    gone = (e1 >= 0) & (self._ord[n].raw[np.maximum(e1, 0)] == 1)
                    bos_first = (flat[p - (n - 1)] == self.bos) if n >= 2 else np.zeros(len(p), bool)
                    d = d & (gone | bos_first)
                deltas.append(d)

        # order 0: the uniform distribution, listed as tokens 0..K-1
        prev = {"W": np.arange(K, dtype=np.int32)[None], "P": np.full((1, K), 1.0 / V),
                "coef": np.ones((1, 1)), "cid": np.zeros((1, 0), np.int64), "e": np.zeros((1, 0), np.int64),
                "d": np.zeros((1, 0), np.int64), "lw": np.full(1, -1, np.int64)}
        prev_row = np.zeros(len(p), np.int64)
        final_lists, final_row = [], np.zeros(len(p), np.int64)
        final_order = np.full(len(p), -1, np.int64)
        alive = np.ones(len(p), bool)
        for n in range(1, N + 1):
            o = self._ord[n - 1]
            cid = cids[n - 1]
            alive &= cid >= 0
            if not alive.any():
                break
            if loo:
                d = deltas[n - 1]
                own = np.where(d, 2 * ents[n - 1] + 1, 2 * cid)
            else:
                own = cid
            R_prev = len(prev["W"])
            rows = np.flatnonzero(alive)
            key = own[rows] * R_prev + prev_row[rows]
            uniq, inv = np.unique(key, return_inverse=True)
            own_u, par = uniq // R_prev, uniq % R_prev
            if loo:
                dr = own_u & 1
                e_r = np.where(dr == 1, own_u >> 1, -1)
                cid_r = np.where(dr == 1, o.ctx_id[np.maximum(e_r, 0)], own_u >> 1)
            else:
                dr, e_r, cid_r = np.zeros(len(uniq), np.int64), np.full(len(uniq), -1), own_u
            cur, rank = self._level(n, prev, par, cid_r, e_r, dr, K)
            inv = rank[inv.reshape(-1)]  # the level stores its rows grouped by candidate width
            prev_row = np.zeros(len(p), np.int64)
            prev_row[rows] = inv
            final_row[rows] = inv
            final_order[rows] = len(final_lists)
            final_lists.append((cur["W"], cur["P"]))
            prev = cur

        for i, (lw, lv) in enumerate(final_lists):
            at = np.flatnonzero(final_order == i)
            if len(at) == 0:
                continue
            if len(at) == len(p):  # every position ends at this order (every row is used): one plain gather
                Wr, lpr, tr = self._finish_rows(lw, lv)
                tr_row = torch.from_numpy(final_row)
                torch.index_select(torch.from_numpy(Wr), 0, tr_row, out=torch.from_numpy(idx_out))
                torch.index_select(torch.from_numpy(lpr), 0, tr_row, out=torch.from_numpy(lp_out))
                np.take(tr, final_row, out=tail_out)
            else:
                ur, inv = np.unique(final_row[at], return_inverse=True)
                Wr, lpr, tr = self._finish_rows(lw[ur], lv[ur])
                idx_out[at], lp_out[at], tail_out[at] = Wr[inv], lpr[inv], tr[inv]
        if len(final_lists) == 0 or (final_order < 0).any():  # unseen even at order 1 (not after fitting)
            at = np.flatnonzero(final_order < 0)
            Wr, lpr, tr = self._finish_rows(prev["W"], prev["P"])
            idx_out[at], lp_out[at], tail_out[at] = Wr[0], lpr[0], tr[0]
        oN = self._ord[N - 1]
        cN = cids[N - 1]
        count = np.where(cN >= 0, oN.craw[np.maximum(cN, 0)], 0)
        if loo:
            count = count - ((cN >= 0) & (ents[N - 1] >= 0))
        cc_out[:] = count

    def _level(self, n: int, prev: dict, par: np.ndarray, cid: np.ndarray, e: np.ndarray, d: np.ndarray,
               K: int) -> tuple[dict, np.ndarray]:
        """Top-K lists of the rows of order n: (context cid, own LOO entry e with delta d, parent row par).
        Returns the level's rows (stored grouped by candidate width, so that each group is written as one
        contiguous slice) and `rank`: input row i is stored at rank[i]."""
        o, V = self._ord[n - 1], self.vocab_size
        S = o.size[cid]
        width = np.where(S > SEEN_CAP, SEEN_CAP * 2, 1 << np.ceil(np.log2(np.maximum(S, 1))).astype(np.int64))
        order = np.argsort(width, kind="stable")
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        par, cid, e, d, S, width = par[order], cid[order], e[order], d[order], S[order], width[order]
        R = len(cid)
        has = e >= 0
        es = np.maximum(e, 0)
        # context statistics after removing the row's own occurrence (d = 1) of entry e
        A, craw, T, NB = o.A[cid] - d, o.craw[cid] - d, o.size[cid].copy(), o.NB[cid].copy()
        a_old = o.adj[es]
        a_new = a_old - d
        rr = np.flatnonzero(d == 1)
        NB[rr, np.minimum(a_old[rr], 3) - 1] -= 1
        r2 = rr[a_new[rr] >= 1]
        NB[r2, np.minimum(a_new[r2], 3) - 1] += 1
        T = T - ((d == 1) & (a_new == 0))
        scale, gamma = self._coeffs(o, A, craw, T, NB)
        coef = np.concatenate((gamma[:, None] * prev["coef"][par], scale[:, None]), axis=1)
        anc_cid = np.concatenate((prev["cid"][par], cid[:, None]), axis=1)
        anc_e = np.concatenate((prev["e"][par], np.where(has & (d == 1), e, -1)[:, None]), axis=1)
        anc_d = np.concatenate((prev["d"][par], d[:, None]), axis=1)
        lw = np.where(has & (d == 1), o.word[es], prev["lw"][par])
        # value correction of the LOO word: its count is one lower at every order where d = 1
        corr = np.zeros(R)
        for m in range(1, n + 1):
            om = self._ord[m - 1]
            em, dm = anc_e[:, m - 1], anc_d[:, m - 1]
            sel = em >= 0
            if sel.any():
                a = om.adj[em[sel]]
                corr[sel] += coef[sel, m] * (self._num(om, a - dm[sel]) - om.num[em[sel]])
        out = {"coef": coef, "cid": anc_cid, "e": anc_e, "d": anc_d, "lw": lw,
               "W": np.empty((R, K), np.int32), "P": np.empty((R, K), np.float64)}

        bounds = np.flatnonzero(np.diff(width)) + 1
        bounds = np.concatenate(([0], bounds, [R]))
        bad_rows = []
        for g in range(len(bounds) - 1):
            wb = int(width[bounds[g]])
            big = wb > SEEN_CAP
            ncol = SEEN_CAP + 1 if big else wb
            for lo in range(int(bounds[g]), int(bounds[g + 1]), ROW_CHUNK):
                hi = min(lo + ROW_CHUNK, int(bounds[g + 1]))
                rb = np.arange(lo, hi)
                # seen candidates: entries of the context (its SEEN_CAP largest for big contexts, plus the LOO word)
                j = np.arange(ncol)[None]
                start = o.ctx_start[cid[rb]][:, None]
                if big:
                    SE = self._perm(n)[start + np.minimum(j, SEEN_CAP - 1)]
                    SE[:, SEEN_CAP] = np.where(has[rb] & ~(SE[:, :SEEN_CAP] == e[rb, None]).any(1), e[rb], -1)
                elif ncol == 1:
                    SE = start
                else:
                    SE = np.where(j < S[rb, None], start + j, -1)
                valid = SE >= 0
                SW = np.where(valid, o.word32[np.maximum(SE, 0)], -1)
                SV = np.full(SE.shape, -np.inf)
                vr, vc = np.nonzero(valid)
                r_abs = rb[vr]
                ch = SE[vr, vc]
                val = coef[r_abs, n] * o.num[ch]
                for m in range(n - 1, 0, -1):
                    ch = self._suf(m + 1)[ch]
                    val += coef[r_abs, m] * self._ord[m - 1].num[ch]
                val += coef[r_abs, 0] / V
                val += np.where(SW[vr, vc] == lw[r_abs], corr[r_abs], 0.0)
                SV[vr, vc] = val
                # parent candidates, scaled by this row's gamma; those also seen here are dropped (scored above)
                PW = prev["W"][par[rb]]
                PV = prev["P"][par[rb]]
                PV *= gamma[rb, None]
                if big:  # a parent word may be seen here but outside the kept SEEN_CAP: add its own term
                    ent = _find(o.keys, (o.ctx_keys[cid[rb]][:, None] * self.base + PW).ravel()).reshape(PW.shape)
                    f = ent >= 0
                    own = f & (ent == e[rb, None]) & (d[rb, None] == 1)  # the row's own LOO entry: count one lower
                    term = np.zeros(PW.shape)
                    term[f] = o.num[ent[f]]
                    term[own] = self._num(o, o.adj[ent[own]] - 1)
                    PV = PV + scale[rb, None] * term
                    # the terms broke the parent order: re-sort (stable: equal values keep their order)
                    PW, PV = _sort_rows_desc(PW, PV)
                # sort the seen candidates by value (stable: word order among ties)
                if ncol > 1:
                    SW, SV = _sort_rows_desc(SW, SV)
                Wb, Pb = _merge_sorted(PW, PV, SW, SV, K)
                if big:
                    # certify: a seen word left out (not in the parent list) scores at most
                    # scale * (its num <= the (SEEN_CAP+1)-th largest) + gamma * (parent's K-th value)
                    nxt = self._perm(n)[np.minimum(o.ctx_start[cid[rb]] + SEEN_CAP, len(o.keys) - 1)]
                    bound = scale[rb] * o.num[nxt] + gamma[rb] * prev["P"][par[rb], K - 1]
                    bad_rows.append(rb[(S[rb] > SEEN_CAP) & (bound > Pb[:, K - 1])])
                out["W"][lo:hi], out["P"][lo:hi] = Wb, Pb
        bad = np.concatenate(bad_rows) if bad_rows else np.zeros(0, np.int64)
        if len(bad):
            out["W"][bad], out["P"][bad] = self._dense_topk(bad, out, K)
        return out, rank

    def _dense_topk(self, rs: np.ndarray, rows: dict, K: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact fallback for rows `rs`: their full distributions over V, then the top K of each (ties in
        word order), in batches of rows."""
        V = self.vocab_size
        n = rows["cid"].shape[1]
        Wout, Pout = np.empty((len(rs), K), np.int32), np.empty((len(rs), K))
        step = max(1, (16 << 20) // (8 * V))
        for lo in range(0, len(rs), step):
            r = rs[lo:lo + step]
            nb = len(r)
            coef = rows["coef"][r]
            # order 1 has a single context: its terms as one dense pass (x + coef * 0.0 == x for unseen words,
            # so this equals adding the seen entries one by one)
            o1 = self._ord[0]
            if o1.dense_num is None:
                o1.dense_num = np.zeros(V)
                o1.dense_num[o1.word] = o1.num
            p = coef[:, 1:2] * o1.dense_num[None]
            p += coef[:, :1] / V
            pf = p.reshape(-1)
            for m in range(1, n + 1):
                o = self._ord[m - 1]
                if m > 1:
                    c = rows["cid"][r, m - 1]
                    st, sz = o.ctx_start[c], o.size[c]
                    ri = np.repeat(np.arange(nb), sz)
                    ent = np.arange(int(sz.sum())) + np.repeat(st - (np.cumsum(sz) - sz), sz)
                    pf[ri * V + o.word[ent]] += coef[ri, m] * o.num[ent]  # words are distinct within a context
                e, dm = rows["e"][r, m - 1], rows["d"][r, m - 1]
                sel = np.flatnonzero(e >= 0)
                if len(sel):
                    es = e[sel]
                    pf[sel * V + o.word[es]] += coef[sel, m] * (self._num(o, o.adj[es] - dm[sel]) - o.num[es])
            # the K largest of each row, ties in word order (= a stable argsort of -p, first K)
            kth = torch.topk(torch.from_numpy(p), K, dim=1, sorted=False).values.amin(1).numpy()
            cr, cw = np.nonzero(p >= kth[:, None])
            cv = p[cr, cw]
            srt = np.lexsort((cw, -cv, cr))
            cr, cw, cv = cr[srt], cw[srt], cv[srt]
            first = np.searchsorted(cr, np.arange(nb))
            take = (first[:, None] + np.arange(K)[None]).reshape(-1)
            Wout[lo:lo + nb] = cw[take].reshape(nb, K)
            Pout[lo:lo + nb] = cv[take].reshape(nb, K)
        return Wout, Pout


def _sort_rows_desc(W: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of (W, P) sorted by descending P, stable (= np.argsort(-P, kind="stable")), by torch's
    multithreaded sort."""
    tv, ti = torch.sort(torch.from_numpy(P), dim=1, descending=True, stable=True)
    return torch.gather(torch.from_numpy(W), 1, ti).numpy(), tv.numpy()


def _merge_sorted(PW: np.ndarray, PV: np.ndarray, SW: np.ndarray, SV: np.ndarray, K: int):
    """Rank-merge per row of two lists sorted by descending value: the parent list (PW, PV) [R, K] and the seen
    list (SW, SV) [R, m] (padding: word -1, value -inf). A parent item whose word is also seen is dropped (the
    seen item carries its full value); on equal values parent items go first. Returns the first K items:
    (W int32 [R, K], P float64 [R, K]). Works by gathers: for every output column, the parent item or seen item
    that lands there, from binary searches on the sorted lists (O(K + m log K) per row, no [R, K, m] temporaries).
    """
    R, m = SW.shape
    SENT = 4 * (K + m)  # "not in the parent list": larger than any parent rank
    col = np.arange(K)
    tPV = torch.from_numpy(PV)
    # position in the parent list of each seen word (SENT when absent)
    if m <= 4:
        dpos = np.empty((R, m), np.int64)
        for jj in range(m):
            eq = PW == SW[:, jj:jj + 1]
            pos = eq.argmax(1)
            dpos[:, jj] = np.where(eq[np.arange(R), pos], pos, SENT)
        tdpos = torch.from_numpy(dpos)
    else:
        sw, so = torch.sort(torch.from_numpy(PW), dim=1)
        tSW = torch.from_numpy(SW)
        loc = torch.searchsorted(sw, tSW).clamp_(max=K - 1)
        found = sw.gather(1, loc) == tSW
        tdpos = torch.where(found, so.gather(1, loc), SENT)
    # parent items with value >= each seen value (parents first on ties), less the dropped ones among them
    negP = torch.neg(tPV)
    cnt = torch.searchsorted(negP, torch.from_numpy(-SV), right=True)
    ds = torch.sort(tdpos, dim=1).values if m > 1 else tdpos
    ins = cnt - torch.searchsorted(ds, cnt)
    opos = (ins + torch.arange(m)[None]).numpy()  # output column of each seen item (>= K: not listed)
    # for every output column: seen items before it, so its kept parent rank q, then that item's parent index
    dsk = (ds - torch.arange(m)[None]).numpy()
    if m <= 4:
        q = np.broadcast_to(col, (R, K)).copy()
        for jj in range(m):
            q -= col[None] > opos[:, jj:jj + 1]
        src = q.copy()
        for jj in range(m):
            src += dsk[:, jj:jj + 1] <= q
    else:
        tq = torch.from_numpy(col).expand(R, K).contiguous()
        tq -= torch.searchsorted(torch.from_numpy(opos), tq)
        src = (tq + torch.searchsorted(torch.from_numpy(dsk), tq, right=True)).numpy()
    np.minimum(src, K - 1, out=src)  # seen columns: overwritten below
    W = np.take_along_axis(PW, src, 1)
    P = np.take_along_axis(PV, src, 1)
    sr, sc = np.nonzero(opos < K)
    oc = opos[sr, sc]
    W[sr, oc] = SW[sr, sc]
    P[sr, oc] = SV[sr, sc]
    return W, P

