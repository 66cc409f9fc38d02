"""SuffixPrior against a brute-force counter (every position, leave-one-out included), and where it pays."""
import numpy as np
import pytest
import torch

from bayeskd.priors.base import load_prior
from bayeskd.priors.ngram import NGramPrior
from bayeskd.priors.suffix import SuffixPrior


def _brute_dense(prompts, responses, i, t, V, order, max_levels, loo, base_row):
    """The suffix prior's distribution at response position t of record i, by scanning the corpus; also the deepest
    level's count (None without levels) and the match length (the largest d whose context occurs elsewhere)."""
    SEP = V
    corpus = [SEP]
    for p, r in zip(prompts, responses):
        corpus += list(p) + list(r) + [SEP]
    ctx = list(prompts[i]) + list(responses[i][:t])
    y = int(responses[i][t])

    def continuations(s):  # tokens that follow the occurrences of s (real tokens only: the final SEP has none)
        out = {}
        for j in range(len(corpus) - len(s)):
            if corpus[j:j + len(s)] == s and corpus[j + len(s)] != SEP:
                out[corpus[j + len(s)]] = out.get(corpus[j + len(s)], 0) + 1
        if loo:
            out[y] -= 1
        return {w: c for w, c in out.items() if c > 0}

    levels = []  # (d, counts), shallow to deep, distinct totals
    match = 0
    for d in range(1, len(ctx) + 2):
        s = [SEP] + ctx if d == len(ctx) + 1 else ctx[len(ctx) - d:]
        cont = continuations(s)
        if not cont:
            break
        match = d
        if d >= order:
            if levels and sum(levels[-1].values()) == sum(cont.values()):
                levels[-1] = cont
            else:
                levels.append(cont)
    levels = levels[-max_levels:]
    ind, lp, tail = base_row
    listed = ind >= 0
    p = np.full(V, float(tail) / (V - listed.sum()) if V > listed.sum() else 0.0)
    p[ind[listed]] = np.exp(lp[listed].astype(np.float64))
    for cont in levels:
        total, types = sum(cont.values()), len(cont)
        q = np.zeros(V)
        for w, c in cont.items():
            q[w] = c / total
        p = (total * q + types * p) / (total + types)
    return p, (sum(levels[-1].values()) if levels else None), match


def _assert_matches_brute_force(prompts, responses, V, order, loo):
    K = V
    prior = SuffixPrior(order=order, vocab_size=V, max_levels=3).fit(responses, prompts)
    rows = prior.topk(responses, K, leave_one_out=loo, contexts=prompts)
    base = prior.base.topk(responses, K, leave_one_out=loo)
    assert rows.num_rows == sum(len(r) for r in responses)
    r = 0
    for i, resp in enumerate(responses):
        for t in range(len(resp)):
            b = (base.indices[r].numpy(), base.logprobs[r].numpy(), base.tail[r].numpy())
            dense, count, match = _brute_dense(prompts or [[]] * len(responses), responses, i, t, V, order, 3, loo,
                                               b)
            assert dense.sum() == pytest.approx(1.0, abs=1e-6)
            ind = rows.indices[r].numpy()
            got = np.exp(rows.logprobs[r].double().numpy()[ind >= 0])
            np.testing.assert_allclose(got, dense[ind[ind >= 0]], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(np.sort(got)[::-1], np.sort(dense)[::-1][:len(got)], rtol=1e-5, atol=1e-7)
            assert float(rows.tail[r]) == pytest.approx(1 - got.sum(), abs=1e-5)
            if count is not None:
                assert float(rows.extras["context_count"][r]) == count
            assert float(rows.extras["match_length"][r]) == match
            r += 1


def _random_corpus(seed, V, with_prompts):
    rng = np.random.default_rng(seed)
    # a small alphabet and repeated prompts give long matches
    base_prompts = [rng.integers(0, V, 4) for _ in range(3)]
    prompts = [base_prompts[int(rng.integers(3))] for _ in range(8)] if with_prompts else None
    responses = [rng.integers(0, V, int(rng.integers(2, 9))) for _ in range(8)]
    return prompts, responses


@pytest.mark.parametrize("seed,loo,with_prompts", [(0, True, True), (1, False, True), (2, True, False)])
def test_suffix_prior_matches_brute_force(seed, loo, with_prompts):
    print("seed", seed)
    V = 7
    prompts, responses = _random_corpus(seed, V, with_prompts)
    _assert_matches_brute_force(prompts, responses, V, 2, loo)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("loo", [True, False])
@pytest.mark.parametrize("with_prompts", [False, True])
def test_suffix_prior_matches_brute_force_at_each_order(order, loo, with_prompts):
    # order 1 makes the record start (context `SEP` alone) a level: the audit (issue 27) found the corpus-final
    # SEP, followed by nothing, counted there as an occurrence
    seed = 20 + order
    print("seed", seed)
    V = 5
    prompts, responses = _random_corpus(seed, V, with_prompts)
    _assert_matches_brute_force(prompts, responses, V, order, loo)


def test_order_1_record_start_does_not_count_the_final_separator():
    # the audit's example (issue 27): row 0 is predicted after `SEP` alone, seen 3 times followed by 0, 0, 1
    responses = [np.array([0, 1, 2]), np.array([0, 2, 1]), np.array([1, 1, 1])]
    prior = SuffixPrior(order=1, vocab_size=3).fit(responses)
    loo = prior.topk(responses, 3, leave_one_out=True)
    ind = loo.indices[0].numpy()
    p = np.zeros(3)
    p[ind] = np.exp(loo.logprobs[0].double().numpy())
    # counts {0: 1, 1: 1} (own 0 removed), n-gram row [.25, .5625, .1875]: (2 q + 2 p0) / 4
    np.testing.assert_allclose(p, [0.375, 0.53125, 0.09375], rtol=1e-6)
    assert float(loo.extras["context_count"][0]) == 2
    full = prior.topk(responses, 3)
    assert float(full.extras["context_count"][0]) == 3
    # a single record with leave-one-out: no other record start, so no match at all (not 1 from the final SEP)
    one = SuffixPrior(order=2, vocab_size=3).fit([responses[0]]).topk([responses[0]], 3, leave_one_out=True)
    assert float(one.extras["match_length"][0]) == 0


def test_long_repeated_span_is_predicted_where_a_4gram_cannot():
    rng = np.random.default_rng(5)
    print("seed", 5)
    V = 6  # 216 three-token contexts, each seen ~20 times in the noise with random continuations
    span = rng.integers(0, V, 40)
    # the span appears in two records; everything else is random noise that mixes 3-token contexts
    noise = [rng.integers(0, V, 200) for _ in range(20)]
    responses = noise[:10] + [np.concatenate((rng.integers(0, V, 5), span))] + noise[10:] + \
        [np.concatenate((rng.integers(0, V, 7), span))]
    suffix = SuffixPrior(order=4, vocab_size=V).fit(responses)
    ngram = NGramPrior(order=4, vocab_size=V).fit(responses)
    query = [responses[-1]]
    s_rows = suffix.topk(query, 1, leave_one_out=True)
    n_rows = ngram.topk(query, 1, leave_one_out=True)
    # inside the span, after enough of it to be unique, the suffix prior's top-1 is the span's next token
    pos = np.arange(7 + 12, 7 + 40)
    truth = query[0][pos]
    s_hit = (s_rows.indices[pos, 0].numpy() == truth).mean()
    n_hit = (n_rows.indices[pos, 0].numpy() == truth).mean()
    assert s_hit == 1.0 and n_hit < 0.5, (s_hit, n_hit)
    assert float(s_rows.extras["match_length"][pos].min()) >= 10


@pytest.mark.parametrize("seed", [0, 1])
def test_long_exact_repeat_is_followed_with_the_fitted_weights(seed, tiny_tokenizer):
    # issue 30: random words over a 4-letter alphabet, one 40-word span in two records. One global beta, fitted
    # where nearly every long context is unique (32, the old grid's largest), followed the repeat at 0.53 and 0.55
    # top-1 on seeds 0 and 1 (the 4-gram: 0.25); one weight per context-length bucket: 0.98 and 0.97
    rng = np.random.default_rng(seed)
    print("seed", seed)

    def words(n):
        return " ".join("".join(rng.choice(list("abcd"), int(rng.integers(1, 7)))) for _ in range(n))

    span = words(40)
    texts = [words(int(rng.integers(20, 60))) for _ in range(200)]
    first, second = int(rng.integers(0, 100)), int(rng.integers(100, 200))
    texts[first] = words(8) + " " + span + " " + words(5)
    head = words(11)
    texts[second] = head + " " + span + " " + words(6)
    responses = [np.array(tiny_tokenizer(" " + t)["input_ids"]) for t in texts]
    prompts = [np.array(tiny_tokenizer(f"Write {words(3)}:")["input_ids"]) for _ in texts]
    V = len(tiny_tokenizer)
    prior = SuffixPrior(order=4, vocab_size=V).fit(responses, prompts)
    beta, table = prior.choose_beta(responses, prompts, k=64)  # as estimate-prior and the lab fit it
    assert prior.beta == beta and table["nll"] <= table["single"]["nll"]
    assert prior.beta_for(40) < 1 < table["single"]["beta"] <= prior.beta_for(prior.order)  # long: followed
    rows = prior.topk([responses[second]], 8, leave_one_out=True, contexts=[prompts[second]])
    ngram = NGramPrior(order=4, vocab_size=V).fit(responses).topk([responses[second]], 1, leave_one_out=True)
    start = len(tiny_tokenizer(" " + head)["input_ids"])
    n_span = len(tiny_tokenizer(" " + span)["input_ids"])
    pos = np.arange(start + 5, start + n_span - 1)  # inside the second copy, after its first 5 tokens
    truth = responses[second][pos]
    assert float(rows.extras["match_length"][pos].min()) >= 5  # the first copy is found
    s_hit = (rows.indices[pos, 0].numpy() == truth).mean()
    n_hit = (ngram.indices[pos, 0].numpy() == truth).mean()
    assert s_hit >= 0.95 and n_hit < 0.5, (s_hit, n_hit)
    # a fixed beta still means one weight everywhere
    prior.beta = 2.0
    assert prior.beta == (2.0,) * (len(prior.beta_depths) + 1) and prior.config()["beta"] == list(prior.beta)


def test_save_load_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    V = 11
    responses = [rng.integers(0, V, 12) for _ in range(5)]
    prompts = [rng.integers(0, V, 3) for _ in range(5)]
    prior = SuffixPrior(order=3, vocab_size=V).fit(responses, prompts)
    prior.save(tmp_path / "p")
    again = load_prior(tmp_path / "p")
    assert isinstance(again, SuffixPrior)
    a = prior.topk(responses, 4, leave_one_out=True, contexts=prompts)
    b = again.topk(responses, 4, leave_one_out=True, contexts=prompts)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs)
    p = again.prob(responses[0][:5], prompt=prompts[0])
    assert p.shape == (V,) and p.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        prior.topk(responses, V + 1)
    with pytest.raises(ValueError, match="contexts for"):
        prior.topk(responses, 2, contexts=prompts[:2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SuffixPrior(order=2, vocab_size=V).fit([np.array([1, V])])
    with pytest.raises(RuntimeError, match="not fitted"):
        SuffixPrior(vocab_size=V).topk(responses, 2)


def test_estimate_prior_kind_suffix_job(tmp_path, tiny_tokenizer_dir):
    import json

    from click.testing import CliRunner

    from bayeskd.cli import main
    from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
    from bayeskd.posterior.shards import PriorTopK
    from bayeskd.core.sparse import CacheMismatchError, ShardReader

    rng = np.random.default_rng(11)
    print("seed", 11)
    words = "the cat sat on a mat while dogs ran fast and slow over hills".split()
    lines = []
    for i in range(30):  # 10 prompts, 3 samples each: the samples share their prompt
        prompt = f"Question {i % 10}: " + " ".join(rng.choice(words, 5))
        lines.append({"prompt": prompt, "response": " ".join(rng.choice(words, int(rng.integers(3, 12)))),
                      "finish_reason": "stop"})
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "prior"
    res = CliRunner().invoke(main, ["estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir,
                                    "--kind", "suffix", "--order", "2", "--top-k", "8", "--write-topk",
                                    "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "suffix" and summary["corpus_tokens"] > summary["tokens"]  # prompts indexed too
    # a run killed after the model was saved resumes with the same summary: the chosen-beta table is kept (the
    # drill found it null after a resume)
    (out / "summary.json").unlink()
    res = CliRunner().invoke(main, ["estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir,
                                    "--kind", "suffix", "--order", "2", "--top-k", "8", "--write-topk",
                                    "--out", str(out)], catch_exceptions=False)
    again = json.loads((out / "summary.json").read_text())
    assert again["reused_model"] and summary["beta_table"] and again["beta_table"] == summary["beta_table"]
    prior = load_prior(out)
    assert isinstance(prior, SuffixPrior)
    tokenized = tokenize_records(load_teacher_records(str(data))[0], load_tokenizer(tiny_tokenizer_dir))
    want = prior.topk(tokenized.response_sequences(), 8, leave_one_out=True, contexts=tokenized.prompt_sequences())
    got = PriorTopK(prior, 8, True, tokenized, out / "topk")
    rows = got.rows(0, len(tokenized))
    assert got.how == "read" and torch.equal(rows.indices, want.indices) and torch.equal(rows.tail, want.tail)
    assert rows.num_rows == sum(d.num_rows for d, _ in ShardReader(out / "topk", k=8))
    assert (rows.extras["match_length"] > 2).float().mean() > 0.2  # prompts repeat: long matches exist
    # an n-gram prior never reads a suffix prior's rows as its own
    with pytest.raises(CacheMismatchError, match="suffix prior"):
        PriorTopK(prior.base, 8, True, tokenized, out / "topk")


def test_choose_beta_picks_the_best_leave_one_out_likelihood():
    rng = np.random.default_rng(9)
    print("seed", 9)
    V = 8
    responses = [rng.integers(0, V, 40) for _ in range(30)]  # pure noise: long contexts predict nothing
    prior = SuffixPrior(order=2, vocab_size=V).fit(responses)
    grid = (0.5, 1.0, 32.0)
    beta, table = prior.choose_beta(responses, grid=grid, k=V)
    assert prior.beta == beta
    single = table["single"]
    assert single["beta"] == min(single["profile"], key=lambda r: r["nll"])["beta"] == 32.0  # noise: trust least
    # the per-bucket weights are the coordinate minimum: no single bucket's other grid value does better
    for b in table["buckets"]:
        assert b["beta"] == beta[table["buckets"].index(b)]
        if b["levels"]:
            assert min(r["nll"] for r in b["profile"]) == pytest.approx(table["nll"], abs=1e-12)
    assert table["nll"] <= single["nll"]
    # ... and equal the likelihood the prior's own rows give (exact p(y): k = V)
    y = torch.from_numpy(np.concatenate(responses))
    rows = prior.topk(responses, V, leave_one_out=True)
    assert float(-rows.token_logprob(y).mean()) == pytest.approx(table["nll"], rel=1e-5)
    span = rng.integers(0, V, 30)  # now every record repeats one long span: trust them
    rep = [np.concatenate((rng.integers(0, V, 3), span)) for _ in range(30)]
    prior2 = SuffixPrior(order=2, vocab_size=V).fit(rep)
    prior2.choose_beta(rep, grid=grid, k=V)
    assert prior2.beta_for(20) < 32.0  # long contexts followed (the shortest, after a random start, smoothed)
