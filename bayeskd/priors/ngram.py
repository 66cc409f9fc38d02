"""N-gram priors over the student's vocabulary: the `NGramPrior` model (construction, fit/merge, smoothing,
dense `prob`, save/load and the `topk` entry point) and `fit_parallel`.

Counting (token input, packed int64 n-gram keys, raw count tables, merging shard tables, the derived per-order
statistics) lives in `bayeskd.priors.counting`; the exact fast top-K query machinery, mixed into `NGramPrior`, in
`bayeskd.priors.topk`.

Smoothing. Every smoothing used here is interpolated: for a seen context h of order n,
    p_n(w|h) = scale(h) * num_n(h, w) + gamma(h) * p_{n-1}(w|h'),       h' = h without its oldest token,
with p_0 uniform over V, and p_n = p_{n-1} when h was not seen. With a(h, w) the count used at that order:
    kneser_ney   num = max(a - D(a), 0), scale = 1/A(h), gamma = (D1 N1(h) + D2 N2(h) + D3 N3+(h)) / A(h)
                 (a = raw count at the highest order, continuation count N1+(. h w) below it; n-grams that
                 start with BOS keep raw counts, as nothing can precede BOS)
    witten_bell  num = c, scale = 1/(c(h) + T(h)), gamma = T(h)/(c(h) + T(h))
    dirichlet    num = c, scale = 1/(c(h) + alpha), gamma = alpha/(c(h) + alpha)
    mle          num = c, scale = 1/c(h), gamma = 0 (the highest seen order only; zeros elsewhere)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bayeskd.priors.counting import (_as_array, _find, _is_single_sequence, _merge_tables, _mkn_discounts, _Order,
                                     _runs, check_k, count_ngrams, count_parallel, layout)
from bayeskd.priors.topk import TopKMixin
from bayeskd.core.sparse import SparseDist
from bayeskd.core.names import CONTEXT_COUNT
from bayeskd.integrity import RECORD, atomic_path, atomic_write_bytes, verify_checksums, write_checksums

SMOOTHINGS = ("kneser_ney", "witten_bell", "dirichlet", "mle")
FORMAT_VERSION = 1
INT64_MAX = 2**63 - 1
CHUNK = 1 << 20  # query positions per chunk: bounds the memory of the per-order top-K lists


class NGramPrior(TopKMixin):
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
        return layout(arrs, self.order, self.bos, self.eos_id if eos else None)

    def _count(self, arrs: list[np.ndarray]) -> None:
        self.keys, self.counts = count_ngrams(arrs, self.order, self.base, self.bos, self.eos_id)

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
        # each file renamed into place whole, then their checksum record: `load` trusts only a recorded prior
        with atomic_path(d / "tables.safetensors") as tmp:
            save_file(tensors, str(tmp))
        atomic_write_bytes(d / "config.json", (json.dumps({"format": "bayeskd.ngram_prior",
                                                           "version": FORMAT_VERSION, **self.config()},
                                                          indent=2) + "\n").encode())
        write_checksums(d, ["tables.safetensors", "config.json"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NGramPrior":
        d = Path(path)
        # the checksum record first: a deleted config.json of a saved prior is named as missing, not "not a prior"
        if not (d / "config.json").exists() and not (d / RECORD).exists():
            raise FileNotFoundError(f"{d}: no config.json; not a saved NGramPrior")
        verify_checksums(d, hint=f"the prior is damaged; count it again (remove {d} and rerun estimate-prior)")
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

    # ------------------------------------------------------------------ top-K queries (machinery: TopKMixin)
    def topk(self, sequences: Any, k: int, leave_one_out: bool = False, contexts: Any = None) -> SparseDist:
        """The prior at every position of `sequences` (one sequence or a list): row t is the distribution of
        token t given the tokens before it (BOS-padded), rows concatenated in order, K entries each, sorted by
        descending probability.

        extras["context_count"]: the raw count of the position's highest-order context (order-1 tokens),
        after removing the position's own occurrence with leave_one_out; 0 when unseen.
        leave_one_out: each position's own n-grams are removed from the counts first (raw counts at every order,
        the continuation counts whose (n+1)-gram type disappears, and the affected context totals and N1/N2/N3+);
        the MKN discounts stay those of the full corpus.
        contexts: the prompts before the sequences; unused (an n-gram's context starts at BOS), accepted so every
        Prior is queried the same way.
        """
        self._check_fitted()
        V = self.vocab_size
        check_k(k, V)
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
                          extras={CONTEXT_COUNT: torch.from_numpy(cc)})


def fit_parallel(sequences: Iterable[Sequence[int]], num_proc: int, **config) -> NGramPrior:
    """Count shards of `sequences` in `num_proc` processes (spawn-safe) and merge their tables."""
    prior = NGramPrior(**config)
    arrs = prior._arrays(sequences, "fit")
    if sum(len(a) for a in arrs) == 0:
        raise ValueError("fit: empty input (the sequences hold no tokens)")
    prior.keys, prior.counts = count_parallel(arrs, num_proc, prior.order, prior.base, prior.bos, prior.eos_id)
    prior._finalize()
    return prior
