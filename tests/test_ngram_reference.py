"""NGramPrior against a brute-force, dictionary-based reference written from docs/MATH.md ("The n-gram prior"),
not from the library's code: every order of interpolated modified Kneser-Ney (continuation counts, discounts,
the distribution at every context, middle orders included), and a Markov source that the smoothings recover,
each equal to its own formula and measurably different from the others'."""
from collections import Counter, defaultdict
from itertools import product

import numpy as np

from bayeskd.priors.ngram import NGramPrior

BOS = "<s>"


class BruteNGram:
    """Dictionaries of n-gram tuples; p_n computed recursively straight from the formulas."""

    def __init__(self, seqs, order, vocab_size, smoothing, alpha=1.0):
        self.N, self.V, self.smoothing, self.alpha = order, vocab_size, smoothing, alpha
        self.raw = {n: Counter() for n in range(1, order + 1)}
        for s in seqs:
            padded = [BOS] * (order - 1) + [int(t) for t in s]
            for t in range(order - 1, len(padded)):
                for n in range(1, order + 1):
                    self.raw[n][tuple(padded[t - n + 1: t + 1])] += 1
        self.a = {}
        for n in range(1, order + 1):
            if smoothing != "kneser_ney" or n == order:
                self.a[n] = dict(self.raw[n])
                continue
            left = defaultdict(set)  # N1+(. g): distinct tokens seen before g
            for g in self.raw[n + 1]:
                left[g[1:]].add(g[0])
            self.a[n] = {g: (c if n >= 2 and g[0] == BOS else len(left[g])) for g, c in self.raw[n].items()}
        self.D = {n: self._discounts(self.a[n]) for n in self.a}
        self.rows = {n: defaultdict(dict) for n in self.a}  # context -> {w: a}
        for n in self.a:
            for g, c in self.a[n].items():
                self.rows[n][g[:-1]][g[-1]] = c
        self.raw_rows = {n: defaultdict(dict) for n in self.raw}
        for n in self.raw:
            for g, c in self.raw[n].items():
                self.raw_rows[n][g[:-1]][g[-1]] = c

    @staticmethod
    def _discounts(a):
        nk = [sum(1 for c in a.values() if c == k) for k in (1, 2, 3, 4)]
        y = nk[0] / (nk[0] + 2 * nk[1]) if nk[0] + 2 * nk[1] > 0 else 0.0
        out = []
        for k in (1, 2, 3):
            d = k - (k + 1) * y * nk[k] / nk[k - 1] if nk[k - 1] > 0 else 0.0
            if d <= 0:
                d = out[-1] if out else 0.5
            out.append(min(d, float(k)))
        return out

    def p(self, n, h, w):
        """p_n(w | h), h the last n - 1 tokens (tuple)."""
        if n == 0:
            return 1.0 / self.V
        lower = self.p(n - 1, h[1:], w)
        row = self.rows[n].get(h)
        if not row:  # unseen context: the lower order unchanged
            return lower
        if self.smoothing == "kneser_ney":
            D, A = self.D[n], sum(row.values())
            a = row.get(w, 0)
            own = max(a - D[min(a, 3) - 1], 0.0) if a else 0.0
            gamma = sum(D[min(c, 3) - 1] for c in row.values()) / A
            return own / A + gamma * lower
        raw = self.raw_rows[n][h]
        c, tot = raw.get(w, 0), sum(raw.values())
        extra = len(raw) if self.smoothing == "witten_bell" else self.alpha
        return (c + extra * lower) / (tot + extra)

    def dist(self, context):
        h = tuple(([BOS] * (self.N - 1) + [int(t) for t in context])[-(self.N - 1):]) if self.N > 1 else ()
        return np.array([self.p(self.N, h, w) for w in range(self.V)])


def _decode(key, n, base, V):
    digits = [(int(key) // base ** i) % base for i in range(n)][::-1]
    return tuple(BOS if d == V else d for d in digits)


def _all_contexts(V, length):
    """Every context `prob` can see: up to `length` tokens (shorter ones are BOS-padded)."""
    return [list(c) for m in range(length + 1) for c in product(range(V), repeat=m)]


def test_kneser_ney_every_order_matches_brute_force(rng):
    V, N = 6, 4
    r = V - 2  # a token followed only once, at a sequence start, so some contexts are deepest at order 2;
    # V - 1 never occurs, so contexts ending with it are deepest at order 1
    seqs = [rng.integers(0, V - 2, size=int(rng.integers(1, 14))) for _ in range(30)]
    seqs[0] = np.append(seqs[0], r)
    seqs.append(np.array([r, 0]))
    prior = NGramPrior(order=N, smoothing="kneser_ney", vocab_size=V).fit(seqs)
    ref = BruteNGram(seqs, N, V, "kneser_ney")
    # middle orders' statistics: continuation counts (raw at the top and after BOS) and MKN discounts
    for n in range(1, N + 1):
        o = prior._ord[n - 1]
        got = {_decode(k, n, prior.base, V): int(a) for k, a in zip(o.keys, o.adj)}
        assert got == ref.a[n], f"order {n}: adjusted counts differ"
        np.testing.assert_allclose(prior.discounts()[n - 1], ref.D[n], rtol=1e-12, err_msg=f"order {n}")
    # the distribution at every context of length 0..N-1: contexts unseen at order N but seen below it give
    # exactly the middle orders' p_n
    levels = Counter()
    for ctx in _all_contexts(V, N - 1):
        np.testing.assert_allclose(prior.prob(ctx), ref.dist(ctx), rtol=1e-10, atol=1e-15, err_msg=str(ctx))
        h = tuple(([BOS] * (N - 1) + ctx)[-(N - 1):])
        levels[max([n for n in range(1, N + 1) if h[len(h) - n + 1:] in ref.rows[n]] + [0])] += 1
    assert all(levels[n] for n in range(1, N + 1)), f"every order must be the deepest seen somewhere: {levels}"
    # models of every order 1..N, at every position of the corpus (the top-K rows at K = V)
    for n in range(1, N + 1):
        p_n = NGramPrior(order=n, smoothing="kneser_ney", vocab_size=V).fit(seqs)
        r_n = BruteNGram(seqs, n, V, "kneser_ney")
        dense = p_n.topk(seqs, V).to_dense(dtype=__import__("torch").float64).numpy()
        want = np.stack([r_n.dist(s[:t]) for s in seqs for t in range(len(s))])
        np.testing.assert_allclose(dense, want, atol=2e-6, err_msg=f"order {n}")


def _markov_corpus(rng, trans, n_seq, length):
    V = len(trans)
    cum = np.cumsum(trans, axis=1)
    seqs = []
    for _ in range(n_seq):
        s = np.empty(length, np.int64)
        s[0] = rng.integers(V)
        u = rng.random(length)
        for t in range(1, length):
            s[t] = min(np.searchsorted(cum[s[t - 1]], u[t]), V - 1)
        seqs.append(s)
    return seqs


SMOOTHINGS = ("kneser_ney", "witten_bell", "dirichlet")


def test_markov_source_recovered_and_smoothings_told_apart(rng):
    """A sparse first-order Markov source: each smoothing recovers it (small KL to the true transitions) and equals
    its own brute-force formula at every context, while the other smoothings' formulas differ there by far more
    than the tolerance (so a swapped or mixed-up smoothing fails)."""
    V = 8
    trans = rng.dirichlet(np.full(V, 0.3), size=V)  # peaked rows: the smoothings disagree on the rare tokens
    seqs = _markov_corpus(rng, trans, n_seq=20, length=400)
    contexts = _all_contexts(V, 1)
    refs = {sm: np.stack([BruteNGram(seqs, 2, V, sm, alpha=2.0).dist(c) for c in contexts]) for sm in SMOOTHINGS}
    for sm in SMOOTHINGS:
        prior = NGramPrior(order=2, smoothing=sm, vocab_size=V, alpha=2.0).fit(seqs)
        got = np.stack([prior.prob(c) for c in contexts])
        np.testing.assert_allclose(got, refs[sm], rtol=1e-10, err_msg=sm)
        for other in SMOOTHINGS:
            if other != sm:
                assert np.abs(got - refs[other]).max() > 1e-4, (sm, other)
        kl = [np.sum(trans[a] * np.log(trans[a] / got[1 + a])) for a in range(V)]
        assert np.mean(kl) < 0.05, (sm, np.mean(kl))
