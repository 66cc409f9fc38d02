"""Counting for the n-gram prior: token input, packed n-gram keys, raw count tables and their derived statistics.

Tables. Each n-gram (oldest token first) is packed into one int64 key, base B = V+1 (digit V is the internal BOS
padding), most recent token in the lowest digit: key = ctx_key * B + w. Sorting the keys of one order therefore
groups each context's continuations into one contiguous range (a CSR table without a trie), and the suffix of an
n-gram (its oldest token dropped) is key % B**(n-1). Only the raw counts of every order are stored (saved,
merged); every other statistic (continuation counts, per-context totals, count-of-counts, discounts) is derived
from them (`_Order`), so merging shards and re-deriving is exactly the same as counting everything at once.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Any

import numpy as np
import torch


def _find(table: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Index of each query key in the sorted `table`, -1 where absent. Sorting the queries first makes the
    binary searches cache-friendly (several times faster than random-order searchsorted on large tables)."""
    out = np.full(len(q), -1, dtype=np.int64)
    if len(table) == 0 or len(q) == 0:
        return out
    order = np.argsort(q, kind="stable") if len(q) > 1024 else np.arange(len(q))
    qs = q[order]
    i = np.minimum(np.searchsorted(table, qs), len(table) - 1)
    out[order] = np.where(table[i] == qs, i, -1)
    return out


def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Start offsets of the runs of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))


def _as_array(seq: Any, where: str) -> np.ndarray:
    if isinstance(seq, torch.Tensor):
        seq = seq.detach().cpu().numpy()
    a = np.asarray(seq)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D sequence of token ids, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{where}: token ids must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _is_single_sequence(x: Any) -> bool:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim == 1
    if isinstance(x, (list, tuple)) and len(x) > 0:
        return isinstance(x[0], (int, np.integer))
    return False


def _mkn_discounts(nk: np.ndarray) -> np.ndarray:
    """Chen & Goodman's D1, D2, D3+ from the count-of-counts n1..n4, at most k so that a count k never goes
    negative; where the formula is undefined or not positive (tiny or odd corpora) the previous discount is
    reused (0.5 for D1), so every context keeps some mass for the lower orders."""
    n1, n2, n3, n4 = (float(x) for x in nk)
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.0
    d = []
    for k, (a, b) in enumerate(((n1, n2), (n2, n3), (n3, n4)), start=1):
        dk = k - (k + 1) * y * b / a if a > 0 else 0.0
        if dk <= 0:  # not Zipf-like counts: a zero discount would leave gamma = 0 and unseen tokens at p = 0
            dk = d[-1] if d else 0.5
        d.append(min(dk, float(k)))
    return np.array(d)


class _Order:
    """Derived tables of one order n (rebuilt from the raw keys/counts by `_finalize`)."""

    def __init__(self, n: int, keys: np.ndarray, raw: np.ndarray, adj: np.ndarray, base: int):
        self.n, self.keys, self.raw, self.adj, self.base = n, keys, raw, adj, base
        ctx = keys // base
        starts = _runs(ctx)
        self.ctx_keys = ctx[starts]
        self.ctx_start = np.append(starts, len(keys)).astype(np.int64)
        self.size = np.diff(self.ctx_start)  # T(h): distinct continuations
        empty = len(keys) == 0
        self.A = np.zeros(0, np.int64) if empty else np.add.reduceat(adj, starts)
        self.craw = np.zeros(0, np.int64) if empty else np.add.reduceat(raw, starts)
        # N1, N2, N3+ per context (for the MKN gamma): one reduceat over a 3-column indicator
        self.NB = np.zeros((0, 3), np.int64) if empty else np.stack(
            [np.add.reduceat(m.view(np.int8), starts, dtype=np.int64) for m in (adj == 1, adj == 2, adj >= 3)], 1)
        self.nk = np.bincount(np.minimum(adj, 5), minlength=6)[1:5]  # count-of-counts n1..n4
        self.D = np.zeros(3)
        self.num = adj.astype(np.float64)
        self._word = self._word32 = self._ctx_id = None
        self.suf: np.ndarray | None = None  # entry -> entry of its suffix in order n-1 (lazy)
        self.perm: np.ndarray | None = None  # entries grouped by context, largest num first (lazy)
        self.dense_num: np.ndarray | None = None  # [V] num by word (order 1 only, lazy)

    # query-time tables, built on first use so that counting stays cheap
    @property
    def word(self) -> np.ndarray:
        if self._word is None:
            self._word = self.keys % self.base
        return self._word

    @property
    def word32(self) -> np.ndarray:
        if self._word32 is None:
            self._word32 = self.word.astype(np.int32)
        return self._word32

    @property
    def ctx_id(self) -> np.ndarray:
        if self._ctx_id is None:
            self._ctx_id = np.repeat(np.arange(len(self.ctx_keys), dtype=np.int64), self.size)
        return self._ctx_id


def layout(arrs: list[np.ndarray], order: int, bos: int, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """All sequences in one flat array, each preceded by order-1 BOS pads (so no n-gram crosses a sequence
    boundary), and `eos_id` after each sequence when it is not None; returns it and the positions of the tokens to
    predict."""
    pad, e = order - 1, int(eos_id is not None)
    lens = np.array([len(a) for a in arrs], dtype=np.int64)
    seqlen = lens + e
    starts = np.concatenate(([0], np.cumsum(seqlen + pad)))
    flat = np.full(int(starts[-1]), bos, dtype=np.int64)
    before = np.concatenate(([0], np.cumsum(seqlen)[:-1]))
    pred = np.arange(int(seqlen.sum()), dtype=np.int64) + np.repeat(starts[:-1] + pad - before, seqlen)
    tokens = np.concatenate(arrs) if arrs else np.zeros(0, np.int64)
    if e:
        vals = np.full(len(pred), eos_id, dtype=np.int64)
        vals[np.arange(len(tokens)) + np.repeat(np.arange(len(arrs)), lens)] = tokens
        flat[pred] = vals
    else:
        flat[pred] = tokens
    return flat, pred


def count_ngrams(arrs: list[np.ndarray], order: int, base: int, bos: int,
                 eos_id: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Raw count tables of `arrs`: per order (index n-1), the sorted unique packed n-grams and their counts."""
    flat, pred = layout(arrs, order, bos, eos_id)
    if len(pred) == 0:
        raise ValueError("fit: empty input (the sequences hold no tokens)")
    key = flat[pred]
    keys, counts = [], []
    for n in range(1, order + 1):
        if n > 1:  # prepend the next-older token as the new most significant digit
            key = key + flat[pred - (n - 1)] * base ** (n - 1)
        srt = np.sort(key)
        starts = _runs(srt)
        keys.append(srt[starts])
        counts.append(np.diff(np.append(starts, len(srt))).astype(np.int64))
    return keys, counts


def _merge_tables(tables: list[tuple[list[np.ndarray], list[np.ndarray]]]) -> tuple[list, list]:
    """Sum raw count tables (lists of per-order keys/counts) by a sorted merge of their keys."""
    keys, counts = [], []
    for n in range(len(tables[0][0])):
        k = np.concatenate([t[0][n] for t in tables])
        c = np.concatenate([t[1][n] for t in tables])
        o = np.argsort(k, kind="stable")
        k, c = k[o], c[o]
        starts = _runs(k)
        keys.append(k[starts])
        counts.append(np.add.reduceat(c, starts).astype(np.int64))
    return keys, counts



def count_parallel(arrs: list[np.ndarray], num_proc: int, order: int, base: int, bos: int,
                   eos_id: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`count_ngrams` of shards of `arrs` in `num_proc` processes (spawn-safe), their tables merged."""
    num_proc = max(1, min(int(num_proc), len(arrs)))
    # contiguous shards of about equal token counts
    cum = np.cumsum([len(a) for a in arrs])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, num_proc) / num_proc)
    bounds = np.concatenate(([0], cuts, [len(arrs)]))
    shards = [arrs[bounds[i]:bounds[i + 1]] for i in range(num_proc) if bounds[i + 1] > bounds[i]]
    shards = [s for s in shards if sum(len(a) for a in s) > 0]
    if len(shards) == 1:
        return count_ngrams(shards[0], order, base, bos, eos_id)
    with mp.get_context("spawn").Pool(len(shards)) as pool:
        tables = pool.starmap(count_ngrams, [(s, order, base, bos, eos_id) for s in shards])
    return _merge_tables(tables)


def check_k(k: Any, vocab_size: int) -> None:
    """A prior's top-K is 1 <= K <= V."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > vocab_size:
        raise ValueError(f"k={k} is larger than the vocabulary size V={vocab_size}")
