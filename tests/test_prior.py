"""NGramPrior: normalisation, hand-computed Kneser-Ney, merge, leave-one-out, top-K against the dense
distribution, save/load and input errors (every order against a brute-force reference, and the Markov source the
smoothings recover: tests/test_ngram_reference.py)."""
from collections import Counter

import numpy as np
import pytest
import torch

from bayeskd.priors.ngram import NGramPrior, fit_parallel

SMOOTHINGS = ["kneser_ney", "witten_bell", "dirichlet", "mle"]


def _corpus(rng, V, n_seq=60, max_len=25):
    return [rng.integers(0, V, size=int(rng.integers(1, max_len))) for _ in range(n_seq)]


def _dense(dist):
    return dist.to_dense(torch.float64).numpy()


def _check_topk_matches_prob(prior, seqs, k, atol=2e-6):
    """Each topk row lists the k largest probabilities of prob() at that position, with matching values."""
    dist = prior.topk(seqs, k)
    dist.validate()
    r = 0
    for s in seqs:
        for t in range(len(s)):
            p = prior.prob(s[:t])
            idx = dist.indices[r].numpy()
            val = np.where(idx >= 0, np.exp(dist.logprobs[r].double().numpy()), 0.0)
            expect = np.sort(p)[::-1][:k]
            np.testing.assert_allclose(np.sort(val)[::-1], expect, atol=atol)
            listed = idx >= 0
            np.testing.assert_allclose(val[listed], p[idx[listed]], atol=atol)
            assert np.all(np.diff(val[listed]) <= 1e-7), "rows must be sorted by descending probability"
            r += 1
    assert r == dist.num_rows


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_distributions_sum_to_one_seen_and_unseen(smoothing, rng):
    V = 40
    prior = NGramPrior(order=3, smoothing=smoothing, vocab_size=V).fit(_corpus(rng, V))
    seen = prior.keys[2][0]  # a seen trigram: its context was seen
    contexts = [[], [int(seen // prior.base % prior.base), int(seen % prior.base)], [V - 1] * 7,
                list(rng.integers(0, V, 5))]
    for ctx in contexts:
        p = prior.prob(ctx)
        assert p.shape == (V,) and p.dtype == np.float64
        assert abs(p.sum() - 1) < 1e-12 and (p >= 0).all()
        if smoothing != "mle":
            assert (p > 0).all()
    # dense reconstruction of topk with k = V reproduces prob() everywhere
    query = [rng.integers(0, V, 12), np.array([3, 3, 3])]
    dense = _dense(prior.topk(query, V))
    np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-5)
    rows = [prior.prob(s[:t]) for s in query for t in range(len(s))]
    np.testing.assert_allclose(dense, np.stack(rows), atol=1e-6)


def test_kneser_ney_matches_hand_computation():
    # order 2, V = 4; the reference below is written straight from Chen & Goodman's interpolated MKN formulas.
    V, BOS = 4, "<s>"
    corpus = [[3, 1, 0, 1], [0, 1], [0, 2, 2], [3, 0, 1, 2], [3, 2], [3, 1, 2]]
    prior = NGramPrior(order=2, smoothing="kneser_ney", vocab_size=V).fit(corpus)

    big = Counter((([BOS] + s)[i], ([BOS] + s)[i + 1]) for s in corpus for i in range(len(s)))
    # unigram level: continuation counts N1+(. w) = number of distinct left neighbours (BOS included)
    cont = Counter(w for (_, w) in big)

    def discounts(counts):
        n = [sum(1 for c in counts if c == k) for k in (1, 2, 3, 4)]
        assert all(n), f"the hand example needs every count-of-count nonzero, got {n}"
        y = n[0] / (n[0] + 2 * n[1])
        return [1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]]

    def disc(D, c):
        return D[min(c, 3) - 1]

    D2, D1 = discounts(list(big.values())), discounts(list(cont.values()))
    np.testing.assert_allclose(prior.discounts(), [D1, D2])
    tot1 = sum(cont.values())
    gamma1 = sum(disc(D1, c) for c in cont.values()) / tot1
    p1 = [max(cont[w] - disc(D1, cont[w]), 0) / tot1 + gamma1 / V if cont[w] else gamma1 / V for w in range(V)]

    def p2(v, w):
        row = {b: c for (a, b), c in big.items() if a == v}
        if not row:
            return p1[w]
        tot = sum(row.values())
        gamma = sum(disc(D2, c) for c in row.values()) / tot
        own = max(row[w] - disc(D2, row[w]), 0) / tot if w in row else 0.0
        return own + gamma * p1[w]

    for ctx, v in (([], BOS), ([0], 0), ([2, 1], 1), ([2], 2), ([3], 3), ([1, 3], 3)):
        np.testing.assert_allclose(prior.prob(ctx), [p2(v, w) for w in range(V)], rtol=1e-12)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_merge_equals_fit_on_union(smoothing, rng):
    V = 30
    a, b = _corpus(rng, V, 40), _corpus(rng, V, 30)
    cfg = dict(order=4, smoothing=smoothing, vocab_size=V)
    merged = NGramPrior(**cfg).fit(a).merge(NGramPrior(**cfg).fit(b))
    full = NGramPrior(**cfg).fit(a + b)
    for n in range(4):
        np.testing.assert_array_equal(merged.keys[n], full.keys[n])
        np.testing.assert_array_equal(merged.counts[n], full.counts[n])
        np.testing.assert_array_equal(merged._ord[n].adj, full._ord[n].adj)
    for ctx in ([], [1], [2, 3, 4], list(rng.integers(0, V, 6))):
        np.testing.assert_allclose(merged.prob(ctx), full.prob(ctx), atol=1e-12, rtol=0)
    d1, d2 = merged.topk(a[:3], 5), full.topk(a[:3], 5)
    assert torch.equal(d1.indices, d2.indices) and torch.equal(d1.logprobs, d2.logprobs)


def test_parallel_fit_equals_serial(rng):
    V = 50
    seqs = _corpus(rng, V, 80)
    serial = NGramPrior(order=3, vocab_size=V).fit(seqs)
    par = fit_parallel(seqs, 2, order=3, vocab_size=V)
    for n in range(3):
        np.testing.assert_array_equal(par.keys[n], serial.keys[n])
        np.testing.assert_array_equal(par.counts[n], serial.counts[n])


def _without_occurrence(prior, seq, t):
    """A copy of `prior` whose raw tables lack the n-grams of position t of `seq` (every order), re-derived with
    the original discounts (leave-one-out keeps the full corpus' discounts)."""
    out = NGramPrior(**prior.config())
    N, B = prior.order, prior.base
    hist = [prior.bos] * (N - 1) + [int(x) for x in seq]
    for n in range(1, N + 1):
        toks = hist[t + N - n: t + N]
        key = sum(tok * B ** j for j, tok in enumerate(reversed(toks)))
        keys, counts = prior.keys[n - 1].copy(), prior.counts[n - 1].copy()
        i = int(np.searchsorted(keys, key))
        assert keys[i] == key
        counts[i] -= 1
        out.keys.append(keys[counts > 0])
        out.counts.append(counts[counts > 0])
    out._finalize(discounts=prior.discounts())
    return out


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_leave_one_out_equals_refit_without_that_occurrence(smoothing, rng):
    V = 25
    seqs = _corpus(rng, V, 50, 20)
    prior = NGramPrior(order=3, smoothing=smoothing, vocab_size=V).fit(seqs)
    dense = _dense(prior.topk(seqs[:4], V, leave_one_out=True))
    dist = prior.topk(seqs[:4], 6, leave_one_out=True)
    dist.validate()
    offsets = np.cumsum([0] + [len(s) for s in seqs[:4]])
    for _ in range(6):
        si = int(rng.integers(4))
        t = int(rng.integers(len(seqs[si])))
        ref = _without_occurrence(prior, seqs[si], t)
        p = ref.prob(seqs[si][:t])
        r = offsets[si] + t
        np.testing.assert_allclose(dense[r], p, atol=1e-6)
        val = np.where(dist.indices[r] >= 0, dist.logprobs[r].double().exp().numpy(), 0)
        np.testing.assert_allclose(np.sort(val)[::-1], np.sort(p)[::-1][:6], atol=1e-6)
        ctx_key = sum(tok * ref.base ** j for j, tok in enumerate(reversed(
            ([ref.bos] * 2 + [int(x) for x in seqs[si]])[t: t + 2])))
        o = ref._ord[2]
        c = np.searchsorted(o.ctx_keys, ctx_key)
        expect = o.craw[c] if c < len(o.ctx_keys) and o.ctx_keys[c] == ctx_key else 0
        assert dist.extras["context_count"][r].item() == expect


def test_leave_one_out_one_sentence_falls_back_to_lower_orders():
    V = 30
    sent = np.arange(10)  # all tokens distinct: every n-gram of order >= 2 occurs once
    mle = NGramPrior(order=3, smoothing="mle", vocab_size=V).fit([sent])
    plain, loo = mle.topk(sent, 10), mle.topk(sent, 10, leave_one_out=True)
    assert (plain.extras["context_count"] == 1).all()
    assert (loo.extras["context_count"] == 0).all()
    # without LOO the trigram model is certain of the observed token; with LOO only the unigrams of the other
    # nine tokens remain: uniform 1/9 over them and 0 for the token itself
    assert torch.allclose(plain.logprobs[:, 0].exp(), torch.ones(10))
    dense = _dense(loo)
    for t in range(10):
        expect = np.where(np.arange(V) < 10, 1 / 9, 0.0)
        expect[t] = 0
        np.testing.assert_allclose(dense[t], expect, atol=1e-6)
    # smoothed models: the observed token loses most of its probability under LOO
    # (Witten-Bell: with only singletons the MKN discount D1 is 1 and Kneser-Ney is uniform either way)
    wb = NGramPrior(order=3, smoothing="witten_bell", vocab_size=V).fit([sent])
    p_plain = _dense(wb.topk(sent, V))[np.arange(10), sent]
    p_loo = _dense(wb.topk(sent, V, leave_one_out=True))[np.arange(10), sent]
    assert (p_loo < 0.5 * p_plain).all()


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_topk_agrees_with_prob(smoothing, rng):
    V = 50
    seqs = _corpus(rng, V, 80)
    prior = NGramPrior(order=3, smoothing=smoothing, vocab_size=V).fit(seqs)
    query = seqs[:3] + [rng.integers(0, V, 15)]  # seen and unseen contexts
    _check_topk_matches_prob(prior, query, 7)


@pytest.mark.parametrize("smoothing", ["kneser_ney", "witten_bell"])
def test_topk_contexts_with_many_continuations(smoothing, rng):
    # contexts followed by more distinct tokens than the seen-candidate cap take the certified path
    V = 400
    seqs = [rng.integers(0, V, 2000) for _ in range(40)]
    prior = NGramPrior(order=2, smoothing=smoothing, vocab_size=V).fit(seqs)
    assert prior._ord[1].size.max() > 128
    _check_topk_matches_prob(prior, [seqs[0][:60], rng.integers(0, V, 30)], 16)
    loo = _dense(prior.topk(seqs[0][:20], V, leave_one_out=True))
    top = prior.topk(seqs[0][:20], 16, leave_one_out=True)
    for t in (0, 5, 19):
        expect = np.sort(loo[t])[::-1][:16]
        got = np.sort(top.logprobs[t].double().exp().numpy())[::-1]
        np.testing.assert_allclose(got, expect, atol=1e-6)


def test_eos_and_bos_ids():
    V = 10
    prior = NGramPrior(order=2, smoothing="mle", vocab_size=V, eos_id=9).fit([[1, 2], [1, 3]])
    np.testing.assert_allclose(prior.prob([2])[9], 1.0)  # EOS is predicted after the last token
    np.testing.assert_allclose(prior.prob([])[1], 1.0)  # after BOS padding: the first token
    assert prior.topk([[1, 2]], 2).num_rows == 2  # one row per token, no EOS row


def test_save_load_round_trip(tmp_path, rng):
    V = 60
    seqs = _corpus(rng, V)
    prior = NGramPrior(order=4, smoothing="dirichlet", alpha=0.5, vocab_size=V, bos_id=0).fit(seqs)
    prior.save(tmp_path / "p")
    back = NGramPrior.load(tmp_path / "p")
    assert back.config() == prior.config()
    for n in range(4):
        np.testing.assert_array_equal(back.keys[n], prior.keys[n])
        np.testing.assert_array_equal(back.counts[n], prior.counts[n])
    ctx = list(rng.integers(0, V, 5))
    assert np.array_equal(back.prob(ctx), prior.prob(ctx))
    d1, d2 = back.topk(seqs[:3], 8, True), prior.topk(seqs[:3], 8, True)
    assert torch.equal(d1.indices, d2.indices) and torch.equal(d1.logprobs, d2.logprobs)


def test_errors_name_the_problem():
    V = 10
    prior = NGramPrior(order=3, vocab_size=V).fit([[1, 2, 3]])
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        prior.topk([[1, 2]], V + 1)
    with pytest.raises(ValueError, match="empty"):
        NGramPrior(order=3, vocab_size=V).fit([])
    with pytest.raises(ValueError, match="empty"):
        NGramPrior(order=3, vocab_size=V).fit([[], []])
    with pytest.raises(ValueError, match=r"token id 10.*outside the vocabulary"):
        NGramPrior(order=3, vocab_size=V).fit([[1, 2], [3, 10]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prior.topk([[1, -1]], 2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prior.prob([11])
    with pytest.raises(ValueError, match="integers"):
        prior.topk([[1.5, 2.0]], 2)
    with pytest.raises(ValueError, match="int64 key"):
        NGramPrior(order=4, vocab_size=200_000)
    with pytest.raises(ValueError, match="unknown smoothing"):
        NGramPrior(order=2, vocab_size=V, smoothing="good_turing")
    with pytest.raises(RuntimeError, match="not fitted"):
        NGramPrior(order=2, vocab_size=V).prob([1])


def _reference_merge(PW, PV, SW, SV, K):
    """Stable merge by sorting: parent items first, then seen ones; parent items whose word is seen dropped."""
    W, P = [], []
    for pw, pv, sw, sv in zip(PW, PV, SW, SV):
        seen = set(sw[sw >= 0].tolist())
        items = [(v, w) for w, v in zip(pw, pv) if w not in seen] + [(v, w) for w, v in zip(sw, sv) if w >= 0]
        order = sorted(range(len(items)), key=lambda i: -items[i][0])  # Python's sort is stable
        W.append([items[i][1] for i in order[:K]])
        P.append([items[i][0] for i in order[:K]])
    return np.array(W, np.int32), np.array(P)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 40])
def test_merge_sorted_matches_stable_sort(m):
    from bayeskd.priors.topk import _merge_sorted
    rng = np.random.default_rng(m)
    K, R, V = 8, 300, 80
    levels = np.array([0.1, 0.2, 0.3, 0.5])  # few distinct values: many ties, between and within the lists
    PW = np.stack([rng.permutation(V)[:K] for _ in range(R)]).astype(np.int32)
    PV = -np.sort(-rng.choice(levels, (R, K)), axis=1)
    SW = np.full((R, m), -1, np.int32)
    SV = np.full((R, m), -np.inf)
    for r in range(R):
        n_seen = int(rng.integers(1, m + 1))
        pool = np.concatenate((PW[r], np.setdiff1d(np.arange(V), PW[r])))  # seen words often in the parent list
        SW[r, :n_seen] = rng.choice(pool[: K + max(4, m)], n_seen, replace=False)
        SV[r, :n_seen] = -np.sort(-rng.choice(levels, n_seen))
    W, P = _merge_sorted(PW, PV, SW, SV, K)
    W_ref, P_ref = _reference_merge(PW, PV, SW, SV, K)
    np.testing.assert_array_equal(W, W_ref)
    np.testing.assert_array_equal(P, P_ref)


@pytest.mark.parametrize("loo", [False, True])
def test_topk_independent_of_chunking(monkeypatch, loo, rng):
    # small position and row chunks, contexts seen and unseen: the same rows as one pass
    import bayeskd.priors.ngram as prior_mod
    import bayeskd.priors.topk as topk_mod
    V = 200
    seqs = [rng.integers(0, V, 300) for _ in range(10)]
    prior = NGramPrior(order=3, vocab_size=V).fit(seqs)
    query = seqs[:3] if loo else seqs[:3] + [rng.integers(0, V, 50)]
    ref = prior.topk(query, 16, leave_one_out=loo)
    monkeypatch.setattr(prior_mod, "CHUNK", 37)
    monkeypatch.setattr(topk_mod, "ROW_CHUNK", 5)
    got = prior.topk(query, 16, leave_one_out=loo)
    for a, b in ((ref.indices, got.indices), (ref.logprobs, got.logprobs), (ref.tail, got.tail),
                 (ref.extras["context_count"], got.extras["context_count"])):
        assert torch.equal(a, b)


def test_leave_one_out_on_other_data_is_refused():
    # issue 15: leave-one-out on sequences the prior was not fitted on used to subtract other occurrences' counts
    rng = np.random.default_rng(15)
    print("seed", 15)
    fitted = [rng.integers(0, 30, 50) for _ in range(20)]
    prior = NGramPrior(order=3, vocab_size=30).fit(fitted)
    prior.topk(fitted[3:7], 5, leave_one_out=True)  # any part of the fitted data is fine
    other = [rng.integers(0, 30, 50) for _ in range(3)]
    with pytest.raises(ValueError, match="not the data it was fitted on.*leave_one_out=False"):
        prior.topk(other, 5, leave_one_out=True)
    assert prior.topk(other, 5).num_rows == 150  # without leave-one-out: the plain prior


def test_estimate_posterior_refuses_leave_one_out_on_records_the_prior_did_not_count(tmp_path, tiny_tokenizer_dir):
    import json

    from bayeskd.data import load_teacher_records
    from bayeskd.posterior.estimate import _check_counted_on, estimate_posterior
    from bayeskd.priors.estimate import estimate_prior

    def write(path, words):
        path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"{w} and {w}"}) + "\n"
                                for i, w in enumerate(words)))
        return str(path)

    a = write(tmp_path / "a.jsonl", [f"alpha{i}" for i in range(12)])
    b = write(tmp_path / "b.jsonl", [f"beta{i}" for i in range(12)])
    estimate_prior(a, tiny_tokenizer_dir, out=str(tmp_path / "prior"), order=2, top_k=4, max_records=8)
    counted = load_teacher_records(a)[0]
    _check_counted_on(tmp_path / "prior", counted[:8])  # the counted records, or some of them in any order: fine
    _check_counted_on(tmp_path / "prior", counted[5:1:-1])
    for data, kw in ((b, {}), (a, {"max_records": 10})):  # other records; more records than were counted
        with pytest.raises(ValueError, match="are not among those the prior was counted on.*--no-leave-one-out"):
            estimate_posterior(data, str(tmp_path / "prior"), "no-proxy-needed", str(tmp_path / "post"), **kw)
