"""The suffix prior: an unbounded-context ("infini-gram") prior over the teacher's own text, on top of an n-gram.

The corpus is every record's prompt + response (EOS included where the response ended naturally), records
separated by a marker SEP = V: `SEP r0 SEP r1 SEP ... SEP`. A suffix array of the *reversed* corpus (built with
`pydivsufsort`) lists every context read backwards, so the occurrences of any context are one contiguous range
of it, and the token that followed each occurrence is the one just before it in the reversed corpus.

For the position predicting token y after context h (prompt included), the query extends h backwards one token at
a time, narrowing the range, until no other occurrence is left (or the record start, SEP, is passed). The ranges
with distinct occurrence counts and at least `order` tokens of context are the levels j = 1..m (shallow to deep,
the `max_levels` deepest kept); each gives leave-one-out continuation counts c_j(w), total c_j and distinct
continuations T_j. Witten-Bell interpolation over the levels, starting from the n-gram (order `order`, counted on
the responses, its top-K row + uniform tail share):
    p_j(w) = (c_j(w) + β(d_j) T_j p_{j-1}(w)) / (c_j + β(d_j) T_j),   p_0 = the n-gram row,
with β(d) one weight per bucket of the level's context length d (`beta_depths` the bucket edges): fitted by
leave-one-out likelihood (`choose_beta`), a long exact repeat gets a small β (followed), a short context seen by
chance a large one (smoothed).
Leave-one-out removes the position's own occurrence (one count of y at every level, and from the n-gram). A level
with more than `max_support` occurrences is estimated from `max_support` evenly spaced ones (as infini-gram
does); below that every count is exact. docs/MATH.md has the formula.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from bayeskd.priors._suffix_query import level_stats, query_rows
from bayeskd.priors.counting import check_k
from bayeskd.priors.ngram import NGramPrior
from bayeskd.core.sparse import SparseDist
from bayeskd.core.names import CONTEXT_COUNT, MATCH_LENGTH
from bayeskd.integrity import atomic_path, atomic_write_bytes, verify_checksums, write_checksums

FORMAT = "bayeskd.suffix_prior"
FORMAT_VERSION = 1
CHUNK = 1 << 16  # query positions per chunk: bounds the [chunk, K] temporaries
BETA_GRID = tuple(2.0 ** e for e in range(-6, 8))  # 1/64 .. 128
BETA_DEPTHS = (6, 8, 12, 16, 24, 32, 48, 64)  # context lengths where the weight β(d) changes bucket


def _as_seqs(sequences: Any, what: str) -> list[np.ndarray]:
    if sequences is None:
        raise ValueError(f"{what}: got None instead of token sequences")
    if isinstance(sequences, np.ndarray) and sequences.ndim == 1 or (
            isinstance(sequences, (list, tuple)) and sequences and np.isscalar(sequences[0])):
        sequences = [sequences]
    return [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]


class SuffixPrior:
    """Unbounded-context prior: Witten-Bell over the suffix levels of a suffix array, backing off to an n-gram.

    `fit(responses, prompts)`: responses are what the prior predicts (and what the n-gram counts), prompts the
    context before each (part of the corpus too: teachers repeat their prompts). Query with the same prompts
    (`topk(..., contexts=prompts)`); without them the context starts at the response."""

    def __init__(self, order: int = 4, smoothing: str = "kneser_ney", vocab_size: int | None = None,
                 alpha: float = 1.0, max_levels: int = 4, max_support: int = 1024,
                 beta: float | Sequence[float] = 1.0, beta_depths: Sequence[int] = BETA_DEPTHS):
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if int(max_levels) < 1 or int(max_support) < 1:
            raise ValueError(f"max_levels and max_support must be >= 1, got {max_levels}, {max_support}")
        depths = tuple(int(d) for d in beta_depths)
        if any(b <= a for a, b in zip(depths, depths[1:])) or (depths and depths[0] < 1):
            raise ValueError(f"beta_depths must be increasing positive context lengths, got {beta_depths!r}")
        if int(vocab_size) >= 2**31 - 1:
            raise ValueError(f"vocab_size {vocab_size} does not fit the int32 corpus")
        self.order, self.smoothing, self.vocab_size, self.alpha = int(order), smoothing, int(vocab_size), float(alpha)
        self.max_levels, self.max_support, self.beta_depths = int(max_levels), int(max_support), depths
        self.beta = beta  # one weight per bucket of `beta_depths` (a number: the same for all)
        self.base = NGramPrior(order=order, smoothing=smoothing, vocab_size=vocab_size, alpha=alpha)
        self.rev: np.ndarray | None = None  # the reversed corpus, int32
        self.sa: np.ndarray | None = None  # its suffix array, int32

    def config(self) -> dict[str, Any]:
        return {"kind": "suffix", "order": self.order, "smoothing": self.smoothing, "vocab_size": self.vocab_size,
                "alpha": self.alpha, "max_levels": self.max_levels, "max_support": self.max_support,
                "beta": list(self.beta), "beta_depths": list(self.beta_depths)}

    @property
    def beta(self) -> tuple[float, ...]:
        """The Witten-Bell weight of a level by its context length d: `beta[i]`, i = how many of `beta_depths` are
        <= d (`beta_for`). Set it to a number (the same weight everywhere) or to one per bucket."""
        return self._beta

    @beta.setter
    def beta(self, value: float | Sequence[float]) -> None:
        nb = len(self.beta_depths) + 1
        vals = (float(value),) * nb if np.isscalar(value) else tuple(float(v) for v in value)
        if len(vals) != nb or not all(v > 0 for v in vals):
            raise ValueError(f"beta must be a number > 0 or {nb} of them (one per bucket of beta_depths "
                             f"{self.beta_depths}), got {value!r}")
        self._beta = vals

    def beta_for(self, depth: int) -> float:
        """The weight of a level whose context is `depth` tokens long."""
        return self._beta[int(np.searchsorted(self.beta_depths, depth, side="right"))]

    @property
    def num_tokens(self) -> int:
        """Corpus tokens (prompts + responses, separators excluded)."""
        return 0 if self.rev is None else int((self.rev != self.vocab_size).sum())

    def nbytes(self) -> int:
        """Bytes of the suffix structure (reversed corpus + suffix array); the n-gram's are `base.nbytes()`."""
        return 0 if self.rev is None else int(self.rev.nbytes + self.sa.nbytes)

    def __repr__(self) -> str:
        return f"SuffixPrior({self.config()}, corpus_tokens={self.num_tokens})"

    # ------------------------------------------------------------------ build
    def _corpus(self, responses: list[np.ndarray], prompts: list[np.ndarray] | None) -> np.ndarray:
        V = self.vocab_size
        if prompts is not None and len(prompts) != len(responses):
            raise ValueError(f"fit: {len(prompts)} prompts for {len(responses)} responses")
        parts = [np.full(1, V, np.int32)]
        for i, r in enumerate(responses):
            for name, s in (("prompt", None if prompts is None else prompts[i]), ("response", r)):
                if s is None or len(s) == 0:
                    continue
                if s.min() < 0 or s.max() >= V:
                    raise ValueError(f"fit: {name} {i} holds a token id outside the vocabulary [0, V={V})")
                parts.append(s.astype(np.int32))
            parts.append(np.full(1, V, np.int32))
        return np.concatenate(parts)

    def fit(self, responses: Any, prompts: Any = None, num_proc: int = 1) -> "SuffixPrior":
        """Count the n-gram on `responses` and index prompt + response of every record; returns self."""
        import pydivsufsort

        resp = _as_seqs(responses, "fit")
        if not resp:
            raise ValueError("fit: empty input (no sequences)")
        prm = None if prompts is None else _as_seqs(prompts, "fit: prompts")
        self.base.fit(resp, num_proc=num_proc)
        corpus = self._corpus(resp, prm)
        self.rev = np.ascontiguousarray(corpus[::-1])
        self.sa = np.asarray(pydivsufsort.divsufsort(self.rev), dtype=np.int32)
        return self

    def _check_fitted(self) -> None:
        if self.sa is None:
            raise RuntimeError("this SuffixPrior is not fitted; call fit() or load() first")

    # ------------------------------------------------------------------ queries
    def topk(self, sequences: Any, k: int, leave_one_out: bool = False, contexts: Any = None) -> SparseDist:
        """Row t of each sequence: the distribution of its token t given `contexts[i]` + its tokens before t, rows
        concatenated, K entries sorted by descending probability.

        extras: "context_count" (occurrences of the deepest level's context, leave-one-out; the n-gram's context
        count where no level applies) and "match_length" (tokens of the longest context that occurs elsewhere,
        the record start counting as one token).
        leave_one_out: the sequences are in the corpus (with these contexts) and their own occurrence is removed."""
        self._check_fitted()
        V = self.vocab_size
        check_k(k, V)
        seqs = _as_seqs(sequences, "topk")
        ctxs = [np.zeros(0, np.int64)] * len(seqs) if contexts is None else _as_seqs(contexts, "topk: contexts")
        if len(ctxs) != len(seqs):
            raise ValueError(f"topk: {len(ctxs)} contexts for {len(seqs)} sequences")
        base = self.base.topk(seqs, k, leave_one_out=leave_one_out)
        hist32, pos, rec_start = self._positions(seqs, ctxs, "topk")
        n = len(pos)
        idx = np.empty((n, k), np.int32)
        lp = np.empty((n, k), np.float32)
        tail = np.empty(n, np.float32)
        cc = np.empty(n, np.float32)
        ml = np.empty(n, np.float32)
        b_idx, b_lp = base.indices.numpy(), base.logprobs.numpy()
        b_tail, b_cc = base.tail.numpy(), base.extras[CONTEXT_COUNT].numpy()
        for lo in range(0, n, CHUNK):
            sl = slice(lo, min(lo + CHUNK, n))
            query_rows(self.rev, self.sa, hist32, pos[sl], rec_start[sl], b_idx[sl], b_lp[sl], b_tail[sl],
                       b_cc[sl], V, self.order, self.max_levels, self.max_support, self.beta, self.beta_depths,
                       bool(leave_one_out), idx[sl], lp[sl], tail[sl], cc[sl], ml[sl])
        return SparseDist(torch.from_numpy(idx), torch.from_numpy(lp), torch.from_numpy(tail), V,
                          extras={CONTEXT_COUNT: torch.from_numpy(cc), MATCH_LENGTH: torch.from_numpy(ml)})

    def _positions(self, seqs: list[np.ndarray], ctxs: list[np.ndarray], what: str):
        """Every query position as (flat index of its token in `hist`, start of its record in `hist`), and `hist`
        (each context + sequence, concatenated; int32)."""
        V = self.vocab_size
        hist = np.concatenate([np.concatenate((c, s)) for c, s in zip(ctxs, seqs)] or [np.zeros(0, np.int64)])
        if len(hist) and (hist.min() < 0 or hist.max() >= V):
            raise ValueError(f"{what}: a token id is outside the vocabulary [0, V={V})")
        lens = np.array([len(c) + len(s) for c, s in zip(ctxs, seqs)], np.int64)
        starts = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
        pos = np.concatenate([st + len(c) + np.arange(len(s)) for st, c, s in zip(starts, ctxs, seqs)]
                             or [np.zeros(0, np.int64)]).astype(np.int64)
        rec_start = np.repeat(starts, [len(s) for s in seqs]).astype(np.int64)
        return hist.astype(np.int32), pos, rec_start

    def choose_beta(self, responses: Any, prompts: Any = None, grid: Sequence[float] = BETA_GRID,
                    k: int = 64, sweeps: int = 4) -> tuple[tuple[float, ...], dict[str, Any]]:
        """Set `beta` (how much a level's count is trusted against its variety, one weight per bucket of the
        level's context length) to the values of `grid` whose leave-one-out prior gives the observed tokens of
        `responses` (in the corpus) the highest likelihood: the mean -log p(y) ranks priors as their KL to the
        teacher does, no truth needed. First the best single weight, then each bucket in turn (coordinate descent,
        up to `sweeps` rounds); a bucket no fitting position reaches takes the weight of the nearest shallower one
        (the single weight below all). p(y) is exact (every level's count of y over the n-gram's top-`k` row with
        its tail share), computed once for all weights. Returns (beta, table): the single weight's and every
        bucket's likelihood profile over the grid, at the final weights."""
        self._check_fitted()
        seqs = _as_seqs(responses, "choose_beta")
        ctxs = [np.zeros(0, np.int64)] * len(seqs) if prompts is None else _as_seqs(prompts, "choose_beta: prompts")
        if len(ctxs) != len(seqs):
            raise ValueError(f"choose_beta: {len(ctxs)} prompts for {len(seqs)} responses")
        grid = tuple(float(b) for b in grid)
        base = self.base.topk(seqs, min(k, self.vocab_size), leave_one_out=True)
        hist32, pos, rec_start = self._positions(seqs, ctxs, "choose_beta")
        p0_y, c_y, c_tot, c_types, depth = level_stats(
            self.rev, self.sa, hist32, pos, rec_start, base.indices.numpy(), base.logprobs.numpy(),
            base.tail.numpy(), self.vocab_size, self.order, self.max_levels, self.max_support, True)
        bucket = np.searchsorted(np.asarray(self.beta_depths), depth, side="right")
        has = c_tot > 0
        nb = len(self.beta_depths) + 1
        levels = [int((has & (bucket == b)).sum()) for b in range(nb)]

        def nll(betas: np.ndarray) -> float:
            p = p0_y.copy()
            for j in range(self.max_levels):
                bt = betas[bucket[:, j]] * c_types[:, j]
                p = np.where(has[:, j], (c_y[:, j] + bt * p) / np.where(has[:, j], c_tot[:, j] + bt, 1.0), p)
            return float(-np.log(np.maximum(p, 1e-300)).mean()) if len(p) else 0.0

        single = [nll(np.full(nb, b)) for b in grid]
        betas = np.full(nb, grid[int(np.argmin(single))])
        best = min(single)
        for _ in range(sweeps):
            moved = False
            for b in (b for b in range(nb) if levels[b]):
                for g in grid:
                    trial = betas.copy()
                    trial[b] = g
                    v = nll(trial)
                    if v < best - 1e-12:
                        best, betas, moved = v, trial, True
            if not moved:
                break
        for b in range(1, nb):  # buckets no position reached: the nearest shallower weight
            if not levels[b]:
                betas[b] = betas[b - 1]
        self.beta = betas
        edges = (self.order,) + self.beta_depths
        buckets = []
        for b in range(nb):
            prof = []
            for g in grid:
                trial = betas.copy()
                trial[b] = g
                prof.append({"beta": g, "nll": nll(trial)})
            buckets.append({"min_depth": edges[b], "levels": levels[b], "beta": float(betas[b]), "profile": prof})
        table = {"positions": len(pos), "nll": best,
                 "single": {"beta": float(grid[int(np.argmin(single))]), "nll": min(single),
                            "profile": [{"beta": g, "nll": v} for g, v in zip(grid, single)]},
                 "buckets": buckets}
        return self.beta, table

    def prob(self, context: Sequence[int], prompt: Sequence[int] | None = None) -> np.ndarray:
        """The full next-token distribution [V] after `prompt` + `context` (float64; not leave-one-out)."""
        self._check_fitted()
        ctx = np.asarray(context, np.int64).reshape(-1)
        row = self.topk([np.append(ctx, 0)], self.vocab_size, contexts=None if prompt is None else [prompt])
        p = np.zeros(self.vocab_size)
        ind, lps = row.indices[-1].numpy(), row.logprobs[-1].double().numpy()
        p[ind[ind >= 0]] = np.exp(lps[ind >= 0])
        return p / p.sum()

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> None:
        self._check_fitted()
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.base.save(d / "ngram")  # with its own checksum record
        with atomic_path(d / "suffix.safetensors") as tmp:  # whole files only, then the record (as NGramPrior)
            save_file({"reversed_corpus": self.rev, "suffix_array": self.sa}, str(tmp))
        atomic_write_bytes(d / "config.json", (json.dumps({"format": FORMAT, "version": FORMAT_VERSION,
                                                           **self.config()}, indent=2) + "\n").encode())
        write_checksums(d, ["suffix.safetensors", "config.json"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SuffixPrior":
        d = Path(path)
        verify_checksums(d, hint=f"the prior is damaged; build it again (remove {d} and rerun estimate-prior)")
        cfg = json.loads((d / "config.json").read_text())
        if cfg.pop("format", None) != FORMAT:
            raise ValueError(f"{d}/config.json is not a SuffixPrior config")
        cfg.pop("version", None)
        cfg.pop("kind", None)
        prior = cls(**cfg)
        prior.base = NGramPrior.load(d / "ngram")
        t = load_file(str(d / "suffix.safetensors"))
        prior.rev, prior.sa = t["reversed_corpus"], t["suffix_array"]
        if len(prior.rev) != len(prior.sa):
            raise ValueError(f"{d}/suffix.safetensors: corpus and suffix array differ in length (file damaged?)")
        return prior
