"""N-gram priors over the student's vocabulary: vectorized counting, smoothing, exact fast top-K queries.

Tables. Each n-gram (oldest token first) is packed into one int64 key, base B = V+1 (digit V is the internal BOS
padding), most recent token in the lowest digit: key = ctx_key * B + w. Sorting the keys of one order therefore
groups each context's continuations into one contiguous range (a CSR table without a trie), and the suffix of an
n-gram (its oldest token dropped) is key % B**(n-1). Only the raw counts of every order are stored (saved,
merged); every other statistic (continuation counts, per-context totals, count-of-counts, discounts) is derived
from them, so merging shards and re-deriving is exactly the same as counting everything at once.

Smoothing. Every smoothing used here is interpolated: for a seen context h of order n,
    p_n(w|h) = scale(h) * num_n(h, w) + gamma(h) * p_{n-1}(w|h'),       h' = h without its oldest token,
with p_0 uniform over V, and p_n = p_{n-1} when h was not seen. With a(h, w) the count used at that order:
    kneser_ney   num = max(a - D(a), 0), scale = 1/A(h), gamma = (D1 N1(h) + D2 N2(h) + D3 N3+(h)) / A(h)
                 (a = raw count at the highest order, continuation count N1+(. h w) below it; n-grams that
                 start with BOS keep raw counts, as nothing can precede BOS)
    witten_bell  num = c, scale = 1/(c(h) + T(h)), gamma = T(h)/(c(h) + T(h))
    dirichlet    num = c, scale = 1/(c(h) + alpha), gamma = alpha/(c(h) + alpha)
    mle          num = c, scale = 1/c(h), gamma = 0 (the highest seen order only; zeros elsewhere)

Top-K. For a seen context h, every token unseen after h scores gamma(h) * p_{n-1}(w|h'), so the top-K of h lies in
seen(h) ∪ topK(h'). Lists are built bottom-up over orders, once per unique query row, with rank-merges of the
(already sorted) parent list and the few seen continuations.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bayeskd.sparse import SparseDist

SMOOTHINGS = ("kneser_ney", "witten_bell", "dirichlet", "mle")
FORMAT_VERSION = 1
INT64_MAX = 2**63 - 1
CHUNK = 1 << 20  # query positions per chunk: bounds the memory of the per-order top-K lists
ROW_CHUNK = 1 << 13  # rows merged at once: bounds the [rows, K] temporaries of one merge
SEEN_CAP = 128  # contexts with more continuations than this keep only their SEEN_CAP largest as candidates


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


class NGramPrior:
    """An order-N n-gram model over a vocabulary of V tokens, used as the prior p0 of bayeskd.

    BOS: every sequence is left-padded with order-1 BOS markers (the internal id V unless `bos_id` is given).
    EOS: when `eos_id` is given it is counted as the token after each sequence's last token (so `prob` predicts
    it like any other id); when it is None, the end of a sequence is not modelled at all.
    """

    def __init__(self, order: int = 4, smoothing: str = "kneser_ney", vocab_size: int | None = None,
                 alpha: float = 1.0, bos_id: int | None = None, eos_id: int | None = None):
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"unknown smoothing {smoothing!r}; choose one of {', '.join(SMOOTHINGS)}")
        if int(order) < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if smoothing == "dirichlet" and not alpha > 0:
            raise ValueError(f"dirichlet smoothing needs alpha > 0, got {alpha}")
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id)):
            if v is not None and not 0 <= int(v) < int(vocab_size):
                raise ValueError(f"{name}={v} is outside the vocabulary [0, {vocab_size})")
        self.order, self.smoothing, self.vocab_size = int(order), smoothing, int(vocab_size)
        self.alpha, self.bos_id, self.eos_id = float(alpha), bos_id, eos_id
        self.base = self.vocab_size + 1
        if self.base ** self.order > INT64_MAX:
            raise ValueError(
                f"order-{self.order} n-grams over V={self.vocab_size} do not fit an int64 key "
                f"((V+1)^{self.order} = {self.base ** self.order:.3g} > 2^63); use a lower order or a smaller vocab")
        self.bos = self.vocab_size if bos_id is None else int(bos_id)
        self.keys: list[np.ndarray] = []  # per order (index n-1): sorted unique packed n-grams
        self.counts: list[np.ndarray] = []  # raw counts, aligned with keys
        self._ord: list[_Order] = []

    # ------------------------------------------------------------------ config, sizes
    def config(self) -> dict[str, Any]:
        return {"order": self.order, "smoothing": self.smoothing, "vocab_size": self.vocab_size,
                "alpha": self.alpha, "bos_id": self.bos_id, "eos_id": self.eos_id}

    def ngram_counts(self) -> dict[str, int]:
        """Number of distinct n-grams stored per order, {"1": ..., "2": ...}."""
        return {str(n + 1): int(len(k)) for n, k in enumerate(self.keys)}

    @property
    def num_tokens(self) -> int:
        return int(self.counts[0].sum()) if self.counts else 0

    def nbytes(self) -> int:
        """Bytes of the stored (saved) tables: keys and raw counts of every order."""
        return int(sum(k.nbytes + c.nbytes for k, c in zip(self.keys, self.counts)))

    def __repr__(self) -> str:
        return f"NGramPrior({self.config()}, ngrams={self.ngram_counts()})"

    # ------------------------------------------------------------------ layout and counting
    def _arrays(self, sequences: Any, what: str) -> list[np.ndarray]:
        if sequences is None:
            raise ValueError(f"{what}: got None instead of token sequences")
        seqs = [sequences] if _is_single_sequence(sequences) else list(sequences)
        if len(seqs) == 0:
            raise ValueError(f"{what}: empty input (no sequences)")
        arrs = [s if type(s) is np.ndarray and s.dtype == np.int64 and s.ndim == 1 else
                _as_array(s, f"{what}: sequence {i}") for i, s in enumerate(seqs)]
        flat = np.concatenate(arrs) if arrs else np.zeros(0, np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.vocab_size):  # one check for the whole input
            j = int(np.flatnonzero((flat < 0) | (flat >= self.vocab_size))[0])
            i = int(np.searchsorted(np.cumsum([len(a) for a in arrs]), j, side="right"))
            raise ValueError(f"{what}: sequence {i} holds token id {int(flat[j])}, outside the vocabulary "
                             f"[0, V={self.vocab_size})")
        return arrs

    def _layout(self, arrs: list[np.ndarray], eos: bool) -> tuple[np.ndarray, np.ndarray]:
        """All sequences in one flat array, each preceded by order-1 BOS pads (so no n-gram crosses a sequence
        boundary); returns it and the positions of the tokens to predict."""
        pad, e = self.order - 1, int(eos)
        lens = np.array([len(a) for a in arrs], dtype=np.int64)
        seqlen = lens + e
        starts = np.concatenate(([0], np.cumsum(seqlen + pad)))
        flat = np.full(int(starts[-1]), self.bos, dtype=np.int64)
        before = np.concatenate(([0], np.cumsum(seqlen)[:-1]))
        pred = np.arange(int(seqlen.sum()), dtype=np.int64) + np.repeat(starts[:-1] + pad - before, seqlen)
        tokens = np.concatenate(arrs) if arrs else np.zeros(0, np.int64)
        if e:
            vals = np.full(len(pred), self.eos_id, dtype=np.int64)
            vals[np.arange(len(tokens)) + np.repeat(np.arange(len(arrs)), lens)] = tokens
            flat[pred] = vals
        else:
            flat[pred] = tokens
        return flat, pred

    def _count(self, arrs: list[np.ndarray]) -> None:
        flat, pred = self._layout(arrs, eos=self.eos_id is not None)
        if len(pred) == 0:
            raise ValueError("fit: empty input (the sequences hold no tokens)")
        key = flat[pred]
        self.keys, self.counts = [], []
        for n in range(1, self.order + 1):
            if n > 1:  # prepend the next-older token as the new most significant digit
                key = key + flat[pred - (n - 1)] * self.base ** (n - 1)
            srt = np.sort(key)
            starts = _runs(srt)
            self.keys.append(srt[starts])
            self.counts.append(np.diff(np.append(starts, len(srt))).astype(np.int64))

    def fit(self, sequences: Iterable[Sequence[int]], num_proc: int = 1) -> "NGramPrior":
        """Count all n-grams of `sequences` (token-id lists / arrays / tensors); returns self."""
        if num_proc > 1:
            other = fit_parallel(sequences, num_proc, **self.config())
            self.keys, self.counts = other.keys, other.counts
        else:
            self._count(self._arrays(sequences, "fit"))
        self._finalize()
        return self

    def merge(self, other: "NGramPrior") -> "NGramPrior":
        """A new prior with the summed counts of both (derived statistics recomputed from the merged counts)."""
        if self.config() != other.config():
            raise ValueError(f"cannot merge priors with different configs: {self.config()} vs {other.config()}")
        if not self.keys or not other.keys:
            raise ValueError("merge: both priors must be fitted")
        out = NGramPrior(**self.config())
        out.keys, out.counts = _merge_tables([(self.keys, self.counts), (other.keys, other.counts)])
        out._finalize()
        return out

    def _finalize(self, discounts: np.ndarray | None = None) -> None:
        """Derive the smoothing statistics from the raw tables. `discounts` [order, 3] overrides the MKN
        discounts (used by tests to compare leave-one-out with a re-fit)."""
        kn = self.smoothing == "kneser_ney"
        self._ord = []
        for n in range(1, self.order + 1):
            keys, raw = self.keys[n - 1], self.counts[n - 1]
            adj = raw
            if kn and n < self.order:
                # continuation count N1+(. g): each (n+1)-gram type adds one to its suffix; with order-1 BOS
                # pads every n-gram of this order is the suffix of some (n+1)-gram, so the runs align with keys
                suf = np.sort(self.keys[n] % self.base ** n)
                starts = _runs(suf)
                assert len(starts) == len(keys), "internal error: suffix table does not match lower order"
                adj = np.diff(np.append(starts, len(suf))).astype(np.int64)
                if n >= 2:
                    bos_first = keys // self.base ** (n - 1) == self.bos
                    adj = np.where(bos_first, raw, adj)
            o = _Order(n, keys, raw, adj, self.base)
            if kn:
                o.D = _mkn_discounts(o.nk) if discounts is None else np.asarray(discounts[n - 1], np.float64)
                o.num = self._num(o, adj)
            self._ord.append(o)

    def discounts(self) -> np.ndarray:
        """MKN discounts [order, 3] (D1, D2, D3+ per order); zeros for the other smoothings."""
        return np.stack([o.D for o in self._ord])

    # ------------------------------------------------------------------ smoothing formulas
    def _num(self, o: _Order, a: np.ndarray) -> np.ndarray:
        if self.smoothing != "kneser_ney":
            return a.astype(np.float64)
        d = np.concatenate(([0.0], o.D))[np.minimum(a, 3)]
        return np.maximum(a - d, 0.0)

    def _coeffs(self, o: _Order, A, craw, T, NB) -> tuple[np.ndarray, np.ndarray]:
        """(scale, gamma) per context; a context with no count left gives (0, 1): the lower order unchanged."""
        if self.smoothing == "kneser_ney":
            den, g = A.astype(np.float64), NB.astype(np.float64) @ o.D
        elif self.smoothing == "witten_bell":
            den, g = (craw + T).astype(np.float64), T.astype(np.float64)
        elif self.smoothing == "dirichlet":
            den, g = craw + self.alpha, np.full(len(craw), self.alpha)
        else:
            den, g = craw.astype(np.float64), np.zeros(len(craw))
        ok = den > 0
        safe = np.where(ok, den, 1.0)
        return np.where(ok, 1.0 / safe, 0.0), np.where(ok, g / safe, 1.0)

    def _check_fitted(self) -> None:
        if not self._ord:
            raise RuntimeError("this NGramPrior is not fitted; call fit() or load() first")

    # ------------------------------------------------------------------ dense distribution
    def prob(self, context: Sequence[int]) -> np.ndarray:
        """The full next-token distribution after `context` (float64 [V], sums to 1)."""
        self._check_fitted()
        ctx = _as_array(context, "prob: context")
        if len(ctx) and (ctx.min() < 0 or ctx.max() >= self.vocab_size):
            raise ValueError(f"prob: context holds a token id outside the vocabulary [0, V={self.vocab_size})")
        hist = np.concatenate((np.full(self.order - 1, self.bos, np.int64), ctx))
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        hkey = 0
        for n in range(1, self.order + 1):
            if n > 1:
                hkey += int(hist[len(hist) - (n - 1)]) * self.base ** (n - 2)
            o = self._ord[n - 1]
            c = int(_find(o.ctx_keys, np.array([hkey], np.int64))[0])
            if c < 0:  # unseen context: every higher order is unseen too
                break
            sl = slice(o.ctx_start[c], o.ctx_start[c + 1])
            scale, gamma = self._coeffs(o, o.A[c:c + 1], o.craw[c:c + 1], o.size[c:c + 1], o.NB[c:c + 1])
            p *= gamma[0]
            p[o.word[sl]] += scale[0] * o.num[sl]
        return p

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> None:
        self._check_fitted()
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for n, (k, c) in enumerate(zip(self.keys, self.counts), start=1):
            tensors[f"keys.{n}"] = torch.from_numpy(np.ascontiguousarray(k))
            tensors[f"counts.{n}"] = torch.from_numpy(np.ascontiguousarray(c))
        save_file(tensors, str(d / "tables.safetensors"))
        (d / "config.json").write_text(json.dumps({"format": "bayeskd.ngram_prior", "version": FORMAT_VERSION,
                                                   **self.config()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NGramPrior":
        d = Path(path)
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"{d}: no config.json; not a saved NGramPrior")
        cfg = json.loads((d / "config.json").read_text())
        if cfg.pop("format", None) != "bayeskd.ngram_prior":
            raise ValueError(f"{d}/config.json is not an NGramPrior config")
        cfg.pop("version", None)
        prior = cls(**cfg)
        t = load_file(str(d / "tables.safetensors"))
        prior.keys = [t[f"keys.{n}"].numpy() for n in range(1, prior.order + 1)]
        prior.counts = [t[f"counts.{n}"].numpy() for n in range(1, prior.order + 1)]
        prior._finalize()
        return prior

    # ------------------------------------------------------------------ top-K queries
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

    def topk(self, sequences: Any, k: int, leave_one_out: bool = False) -> SparseDist:
        """The prior at every position of `sequences` (one sequence or a list): row t is the distribution of
        token t given the tokens before it (BOS-padded), rows concatenated in order, K entries each, sorted by
        descending probability.

        extras["context_count"]: the raw count of the position's highest-order context (order-1 tokens),
        after removing the position's own occurrence with leave_one_out; 0 when unseen.
        leave_one_out: each position's own n-grams are removed from the counts first (raw counts at every order,
        the continuation counts whose (n+1)-gram type disappears, and the affected context totals and N1/N2/N3+);
        the MKN discounts stay those of the full corpus.
        """
        self._check_fitted()
        V = self.vocab_size
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > V:
            raise ValueError(f"k={k} is larger than the vocabulary size V={V}")
        arrs = self._arrays(sequences, "topk")
        flat, pred = self._layout(arrs, eos=False)
        idx = np.empty((len(pred), k), dtype=np.int32)
        lp = np.empty((len(pred), k), dtype=np.float32)
        tail = np.zeros(len(pred), dtype=np.float32)
        cc = np.zeros(len(pred), dtype=np.float32)
        for lo in range(0, len(pred), CHUNK):
            sl = slice(lo, min(lo + CHUNK, len(pred)))
            self._topk_chunk(flat, pred[sl], k, leave_one_out, idx[sl], lp[sl], tail[sl], cc[sl])
        return SparseDist(torch.from_numpy(idx), torch.from_numpy(lp), torch.from_numpy(tail), V,
                          extras={"context_count": torch.from_numpy(cc)})

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


def _count_shard(config: dict, arrs: list[np.ndarray]) -> tuple[list, list]:
    prior = NGramPrior(**config)
    prior._count(arrs)
    return prior.keys, prior.counts


def fit_parallel(sequences: Iterable[Sequence[int]], num_proc: int, **config) -> NGramPrior:
    """Count shards of `sequences` in `num_proc` processes (spawn-safe) and merge their tables."""
    prior = NGramPrior(**config)
    arrs = prior._arrays(sequences, "fit")
    if sum(len(a) for a in arrs) == 0:
        raise ValueError("fit: empty input (the sequences hold no tokens)")
    num_proc = max(1, min(int(num_proc), len(arrs)))
    # contiguous shards of about equal token counts
    cum = np.cumsum([len(a) for a in arrs])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, num_proc) / num_proc)
    bounds = np.concatenate(([0], cuts, [len(arrs)]))
    shards = [arrs[bounds[i]:bounds[i + 1]] for i in range(num_proc) if bounds[i + 1] > bounds[i]]
    shards = [s for s in shards if sum(len(a) for a in s) > 0]
    if len(shards) == 1:
        prior._count(shards[0])
    else:
        with mp.get_context("spawn").Pool(len(shards)) as pool:
            tables = pool.starmap(_count_shard, [(prior.config(), s) for s in shards])
        prior.keys, prior.counts = _merge_tables(tables)
    prior._finalize()
    return prior
