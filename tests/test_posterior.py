"""ProxyPosterior / estimate_posterior / `bayeskd estimate-posterior` on a tiny Llama proxy saved and loaded back
through from_pretrained (no network)."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bayeskd.cli import main
from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
from bayeskd.core.combine import combine
from bayeskd.priors.estimate import estimate_prior
from bayeskd.posterior.estimate import estimate_posterior
from bayeskd.posterior.proxy import ProxyPosterior
from bayeskd.priors.ngram import NGramPrior
from bayeskd.core.sparse import ShardReader

N_RECORDS = 20


def _write_jsonl(path, n=N_RECORDS, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]
    with open(path, "w") as f:
        for i in range(n):
            resp = " ".join(rng.choice(words, size=rng.integers(3, 15)))
            prompt = "Q" if i % 5 == 0 else f"Question {i}: what does it do?"  # varied prompt lengths
            f.write(json.dumps({"prompt": prompt, "response": resp}) + "\n")
    return str(path)


def _save_llama(path, vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("posterior")
    data = _write_jsonl(d / "teacher.jsonl")
    tok = load_tokenizer(tiny_tokenizer_dir)
    estimate_prior(data, tiny_tokenizer_dir, out=str(d / "prior_out"), order=3, top_k=16)
    proxy_dir = str(d / "proxy")
    _save_llama(proxy_dir, len(tok))
    records, _ = load_teacher_records(data)
    tokenized = tokenize_records(records, tok)
    prior = NGramPrior.load(d / "prior_out" / "prior")
    return {"dir": d, "data": data, "tok": tok, "tokdir": tiny_tokenizer_dir, "proxy": proxy_dir,
            "tokenized": tokenized, "prior": prior, "prior_dir": str(d / "prior_out")}


def _read_all(out):
    reader = ShardReader(out)
    return [(name, *reader.read(name)) for name in reader.shard_names]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("mode,evidence", [("log_linear", 0.0), ("dirichlet", 1.0), ("mixture", 0.0)])
def test_shards_equal_in_memory_computation(setup, tmp_path, mode, evidence):
    tokenized, prior = setup["tokenized"], setup["prior"]
    post = ProxyPosterior(setup["proxy"], batch_size=3, mode=mode, evidence=evidence, top_k=16, proxy_top_k=24)
    out = tmp_path / "post"
    summary = post.estimate(tokenized, prior, out, shard_records=6, progress=False)
    assert summary["complete"] and summary["shards"] == 4
    assert summary["rows"] == sum(len(s) for s in tokenized.response_sequences())
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]
    shards = _read_all(out)
    assert [n for n, *_ in shards] == [f"shard-{i:05d}.safetensors" for i in range(4)]
    seqs = tokenized.response_sequences()
    model = post.model
    V = prior.vocab_size
    for name, dist, extra in shards:
        dist.validate(name)
        recs = extra["record_index"].tolist()
        assert extra["lengths"].tolist() == [len(seqs[r]) for r in recs]
        assert dist.num_rows == sum(len(seqs[r]) for r in recs)
        # in-memory reference: each record alone through the model, full log_softmax rows
        proxy_rows = []
        for r in recs:
            ids = torch.from_numpy(tokenized.input_ids[r].astype(np.int64))[None]
            with torch.no_grad():
                lg = model(input_ids=ids).logits[0].float()
            p = int(tokenized.prompt_lengths[r])
            proxy_rows.append(torch.log_softmax(lg[p - 1:len(ids[0]) - 1, :V], dim=-1))
        proxy_lp = torch.cat(proxy_rows)
        top = torch.topk(proxy_lp, 24, dim=-1)
        from bayeskd.core.sparse import SparseDist
        proxy_sd = SparseDist(top.indices.to(torch.int32), top.values,
                              (1 - top.values.double().exp().sum(-1)).clamp(min=0).float(), V)
        prior_rows = prior.topk([seqs[r] for r in recs], 16, leave_one_out=True)
        teacher = torch.from_numpy(np.concatenate([seqs[r] for r in recs]).astype(np.int64)) if evidence else None
        ref = combine(prior_rows, proxy_sd, mode, teacher_tokens=teacher, evidence=evidence, top_k=16)
        torch.testing.assert_close(dist.to_dense(torch.float64), ref.to_dense(torch.float64), atol=2e-5, rtol=1e-4)
        # and the top entries agree where probabilities are clearly separated
        assert (dist.indices[:, 0] == ref.indices[:, 0]).float().mean() > 0.95


def test_resume_after_partial_run(setup, tmp_path):
    tokenized, prior = setup["tokenized"], setup["prior"]
    post = ProxyPosterior(setup["proxy"], batch_size=4, top_k=16)
    full = tmp_path / "full"
    s_full = post.estimate(tokenized, prior, full, shard_records=5, progress=False)
    part = tmp_path / "part"
    s1 = post.estimate(tokenized, prior, part, shard_records=5, max_shards=2, progress=False)
    assert s1["shards_done"] == 2 and not s1["complete"]
    assert sorted(json.loads((part / "manifest.json").read_text())["shards"]) == \
        ["shard-00000.safetensors", "shard-00001.safetensors"]
    mtimes = {f: os.stat(part / f).st_mtime_ns for f in ("shard-00000.safetensors", "shard-00001.safetensors")}
    (part / ".bayeskd.lock").write_text('{"pid": 123456789}')  # a job's lock, present while it writes
    s2 = post.estimate(tokenized, prior, part, shard_records=5, progress=False)
    assert s2["complete"] and s2["shards_skipped"] == 2 and s2["shards_written"] == 2
    # the drill found the size counting the lock and the first run's summary.json: it is the shards' and manifest's
    assert s2["bytes"] == s_full["bytes"]
    for f, m in mtimes.items():
        assert os.stat(part / f).st_mtime_ns == m
    for i in range(4):
        f = f"shard-{i:05d}.safetensors"
        assert _sha(part / f) == _sha(full / f)
    # another config in the same directory is refused
    from bayeskd.core.sparse import CacheMismatchError
    with pytest.raises(CacheMismatchError):
        ProxyPosterior(setup["proxy"], top_k=16, mode="mixture").estimate(tokenized, prior, part, shard_records=5,
                                                                         progress=False)



def test_compact_and_sampled_targets_resume_to_the_same_shards(setup, tmp_path):
    """--codec compact and --samples: the rows decode to the raw posterior (within the codec's bound), sampled rows
    keep the head exactly and draw the same after a resume (seeded per shard)."""
    tokenized, prior = setup["tokenized"], setup["prior"]
    post = ProxyPosterior(setup["proxy"], batch_size=4, top_k=16)
    post.estimate(tokenized, prior, tmp_path / "raw", shard_records=5, progress=False)
    post.estimate(tokenized, prior, tmp_path / "compact", shard_records=5, progress=False, codec="compact")
    for (_, a, _), (_, b, _) in zip(_read_all(tmp_path / "raw"), _read_all(tmp_path / "compact")):
        da, db = a.to_dense(torch.float64), b.to_dense(torch.float64)
        assert (da * (da.clamp(min=1e-300).log() - db.clamp(min=1e-300).log())).sum(1).max() <= 1e-3
    kw = dict(shard_records=5, progress=False, samples=6, keep_top=2, sample_seed=3, codec="compact")
    full = post.estimate(tokenized, prior, tmp_path / "sampled", **kw)
    assert full["complete"]
    post.estimate(tokenized, prior, tmp_path / "part", max_shards=1, **kw)
    post.estimate(tokenized, prior, tmp_path / "part", **kw)
    for (name, a, _), (_, b, _) in zip(_read_all(tmp_path / "sampled"), _read_all(tmp_path / "part")):
        assert _sha(tmp_path / "sampled" / name) == _sha(tmp_path / "part" / name)
    raw_rows = [d for _, d, _ in _read_all(tmp_path / "raw")]
    for (_, s, _), r in zip(_read_all(tmp_path / "sampled"), raw_rows):
        assert s.k == 8 and torch.equal(s.tail, torch.zeros(s.num_rows))
        kept = (s.indices[:, :, None] == r.indices[:, None, :2]).any(1)  # the two largest entries are kept
        assert kept[r.indices[:, :2] >= 0].all()


def test_proxy_vocab_smaller_than_tokenizer_is_refused(setup, tmp_path):
    small = str(tmp_path / "small")
    _save_llama(small, len(setup["tok"]) - 10)
    post = ProxyPosterior(small, top_k=16)
    with pytest.raises(ValueError, match=rf"{len(setup['tok']) - 10}.*{len(setup['tok'])}"):
        post.estimate(setup["tokenized"], setup["prior"], tmp_path / "out", progress=False)


def test_prior_vocab_differs_from_tokenizer(setup, tmp_path):
    seqs = setup["tokenized"].response_sequences()
    other = NGramPrior(order=2, vocab_size=len(setup["tok"]) + 3).fit(seqs)
    with pytest.raises(ValueError, match=rf"{len(setup['tok']) + 3}.*{len(setup['tok'])}"):
        ProxyPosterior(setup["proxy"], top_k=16).estimate(setup["tokenized"], other, tmp_path / "o", progress=False)


def test_padded_proxy_vocab_equals_unpadded(setup, tmp_path):
    V = len(setup["tok"])
    base = _save_llama(str(tmp_path / "base"), V, seed=3)
    padded_dir = str(tmp_path / "padded")
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{**base.config.to_dict(), "vocab_size": V + 7})
    padded = LlamaForCausalLM(cfg)
    sd = base.state_dict()
    with torch.no_grad():
        for k, v in padded.state_dict().items():
            if v.shape == sd[k].shape:
                v.copy_(sd[k])
            else:  # embedding / lm_head rows: the real ones copied, the padding rows large (must be ignored)
                v[:V].copy_(sd[k])
                v[V:].fill_(0.5)
    padded.save_pretrained(padded_dir)
    tokenized, prior = setup["tokenized"], setup["prior"]
    a = ProxyPosterior(str(tmp_path / "base"), top_k=16).estimate(tokenized, prior, tmp_path / "a",
                                                                   shard_records=10, progress=False)
    b = ProxyPosterior(padded_dir, top_k=16).estimate(tokenized, prior, tmp_path / "b", shard_records=10,
                                                       progress=False)
    assert a["rows"] == b["rows"]
    for (_, da, _), (_, db, _) in zip(_read_all(tmp_path / "a"), _read_all(tmp_path / "b")):
        assert da.vocab_size == db.vocab_size == V
        torch.testing.assert_close(da.to_dense(torch.float64), db.to_dense(torch.float64), atol=1e-5, rtol=1e-4)


def test_estimate_posterior_reads_tokenizer_from_prior_dir(setup, tmp_path):
    s = estimate_posterior(setup["data"], setup["prior_dir"], setup["proxy"], str(tmp_path / "o"), top_k=8,
                           shard_records=7)
    assert s["tokenizer"] == str(setup["tokdir"]) and s["complete"] and s["shards"] == 3


def test_cli_end_to_end(setup, tmp_path):
    out = tmp_path / "cli_out"
    args = ["estimate-posterior", "--data", setup["data"], "--prior", setup["prior_dir"], "--proxy", setup["proxy"],
            "--top-k", "8", "--mode", "dirichlet", "--c", "2.0", "--evidence", "0.5", "--batch-size", "4",
            "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["mode"] == "dirichlet" and summary["c"] == 2.0 and summary["complete"]
    dists = _read_all(out)
    assert sum(d.num_rows for _, d, _ in dists) == summary["rows"]
    for name, d, _ in dists:
        d.validate(name)
    # rerun resumes (everything skipped) and gives the same result
    res2 = CliRunner().invoke(main, args)
    assert res2.exit_code == 0, res2.output
    assert json.loads(res2.output[res2.output.index("{"):])["shards_skipped"] == summary["shards"]
    # errors are usage errors, not tracebacks
    bad = CliRunner().invoke(main, ["estimate-posterior", "--prior", str(tmp_path / "nope"), "--proxy",
                                    setup["proxy"], "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "nope" in bad.output and "Traceback" not in bad.output


def test_record_without_prompt_gets_uniform_proxy_row(setup):
    from dataclasses import replace

    tk = setup["tokenized"]
    ids = [tk.input_ids[1][int(tk.prompt_lengths[1]):], tk.input_ids[2]]  # record 0 has no prompt at all
    t2 = replace(tk, input_ids=ids, response_mask=[np.ones(len(ids[0]), bool), tk.response_mask[2]],
                 prompt_lengths=np.array([0, tk.prompt_lengths[2]], dtype=np.int32))
    post = ProxyPosterior(setup["proxy"], top_k=16, batch_size=2)
    rows = post.proxy_topk(t2, [0, 1])
    assert rows.num_rows == len(ids[0]) + len(ids[1]) - int(tk.prompt_lengths[2])
    assert (rows.indices[0] == -1).all() and rows.tail[0] == 1.0
    rows.validate("proxy rows")
    post.posterior_rows(t2, [0, 1], setup["prior"]).validate("posterior rows")


def test_bfloat16_proxy_and_small_proxy_top_k(setup, tmp_path):
    post = ProxyPosterior(setup["proxy"], dtype="bfloat16", top_k=16, proxy_top_k=4, evidence=1.0)
    s = post.estimate(setup["tokenized"], setup["prior"], tmp_path / "o", shard_records=10, progress=False)
    assert s["complete"] and s["dtype"] == "bfloat16"
    for name, d, _ in _read_all(tmp_path / "o"):
        d.validate(name)
        assert d.k == 16


# ---------------------------------------------------------------------- fast top-K, overlap, prior top-K reuse
@pytest.mark.parametrize("width,k", [(512, 16), (515, 7), (4096, 64), (100, 30)])
def test_fast_topk_equals_torch_topk(width, k):
    from bayeskd.posterior.proxy import fast_topk

    g = torch.Generator().manual_seed(width + k)
    x = torch.randn(50, width, generator=g)
    x[0, :] = 0.0  # all tied
    x[1, :width // 8 * 8].view(8, -1)[0] += 100  # the whole top-k in one group (columns 0 .. width/8 - 1)
    x[2] = torch.randint(0, 4, (width,), generator=g).float()  # many ties at the boundary
    values, idx = fast_topk(x, k)
    ref = torch.topk(x, k, dim=-1)
    assert torch.equal(values, ref.values)
    assert torch.equal(x.gather(1, idx), values)
    assert (idx.sort(1).values[:, 1:] != idx.sort(1).values[:, :-1]).all()  # no index twice
    untied = (ref.values[:, :-1] != ref.values[:, 1:]).all(1) & (ref.values[:, -1] > x.sort(1).values[:, -k - 1])
    assert untied[3:].all() and torch.equal(idx[untied], ref.indices[untied])


def test_overlap_and_prior_topk_reuse_give_identical_shards(setup, tmp_path):
    tokenized, prior = setup["tokenized"], setup["prior"]
    post = ProxyPosterior(setup["proxy"], batch_size=3, top_k=16, mode="dirichlet", evidence=0.5)
    a = post.estimate(tokenized, prior, tmp_path / "a", shard_records=6, progress=False, overlap=False)
    b = post.estimate(tokenized, prior, tmp_path / "b", shard_records=6, progress=False)
    assert a["prior_rows"] == b["prior_rows"] == "computed" and b["overlap"]
    # prior top-K rows written by estimate-prior --write-topk (one shard for all records) are read back
    pdir = tmp_path / "prior_topk"
    estimate_prior(setup["data"], setup["tokdir"], out=str(pdir), order=3, top_k=16, write_topk=True,
                   codec="raw")  # exact rows: read back, they give the same bytes
    c = post.estimate(tokenized, prior, tmp_path / "c", shard_records=6, progress=False, prior_topk=pdir / "topk")
    assert c["prior_rows"] == "read"
    for i in range(a["shards"]):
        f = f"shard-{i:05d}.safetensors"
        assert _sha(tmp_path / "a" / f) == _sha(tmp_path / "b" / f) == _sha(tmp_path / "c" / f)
    # estimate_posterior finds them in the prior dir when K and leave-one-out match, else computes
    s16 = estimate_posterior(setup["data"], str(pdir), setup["proxy"], str(tmp_path / "d"), top_k=16)
    s8 = estimate_posterior(setup["data"], str(pdir), setup["proxy"], str(tmp_path / "e"), top_k=8)
    assert (s16["prior_rows"], s8["prior_rows"]) == ("read", "computed")
    # rows made with another leave-one-out setting are refused, not silently used
    from bayeskd.core.sparse import CacheMismatchError
    with pytest.raises(CacheMismatchError, match="leave_one_out"):
        post.estimate(tokenized, prior, tmp_path / "f", leave_one_out=False, progress=False,
                      prior_topk=pdir / "topk")


# ---------------------------------------------------------------------- proxy-only targets, teacher log-prob
def _teacher_forced(model, tokenized, r, V):
    """(log_softmax rows [n, V] predicting response tokens 1.., log q(teacher token)) for record r, alone."""
    ids = torch.from_numpy(tokenized.input_ids[r].astype(np.int64))
    p = int(tokenized.prompt_lengths[r])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :, :V].float(), dim=-1)
    rows = lp[max(p, 1) - 1:len(ids) - 1]
    return rows, rows.gather(1, ids[max(p, 1):, None])[:, 0]


def test_proxy_only_targets_and_teacher_logprob(setup, tmp_path):
    tokenized = setup["tokenized"]
    V = tokenized.vocab_size
    post = ProxyPosterior(setup["proxy"], batch_size=4, top_k=16)
    s = post.estimate(tokenized, None, tmp_path / "p", shard_records=7, progress=False)
    assert s["complete"] and s["mode"] == "proxy" and s["prior"] is None and s["teacher_logprob"]
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["config"]["mode"] == "proxy" and manifest["vocab_size"] == V and manifest["k"] == 16
    for name, dist, extra in _read_all(tmp_path / "p"):
        dist.validate(name)
        tlp = dist.extras["proxy_teacher_logprob"]
        assert tlp.dtype == torch.float32 and tlp.shape == (dist.num_rows,)
        rows, want = zip(*[_teacher_forced(post.model, tokenized, r, V) for r in extra["record_index"].tolist()])
        torch.testing.assert_close(tlp, torch.cat(want), atol=1e-5, rtol=0)
        top = torch.topk(torch.cat(rows), 16, dim=-1)
        torch.testing.assert_close(dist.logprobs, top.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(dist.tail, 1 - top.values.double().exp().sum(-1).float(), atol=1e-5, rtol=0)
        assert (dist.indices == top.indices).float().mean() > 0.99  # (ties may order differently)
    # resume: a partial run finished later writes the same bytes
    post.estimate(tokenized, None, tmp_path / "q", shard_records=7, max_shards=1, progress=False)
    s2 = post.estimate(tokenized, None, tmp_path / "q", shard_records=7, progress=False)
    assert s2["shards_skipped"] == 1 and s2["complete"]
    for i in range(s["shards"]):
        assert _sha(tmp_path / "p" / f"shard-{i:05d}.safetensors") == _sha(tmp_path / "q" / f"shard-{i:05d}.safetensors")
    # a proxy-only directory is not a prior-based cache, and the other way round
    from bayeskd.core.sparse import CacheMismatchError
    with pytest.raises(CacheMismatchError):
        post.estimate(tokenized, setup["prior"], tmp_path / "p", shard_records=7, teacher_logprob=True,
                      progress=False)
    post.estimate(tokenized, setup["prior"], tmp_path / "r", shard_records=7, progress=False)
    with pytest.raises(CacheMismatchError):
        post.estimate(tokenized, None, tmp_path / "r", shard_records=7, teacher_logprob=False, progress=False)
    with pytest.raises(ValueError, match="proxy_top_k"):
        ProxyPosterior(setup["proxy"], top_k=16, proxy_top_k=8).estimate(tokenized, None, tmp_path / "s")


def test_teacher_logprob_with_a_prior_and_without_context(setup, tmp_path):
    from dataclasses import replace

    tokenized, prior = setup["tokenized"], setup["prior"]
    post = ProxyPosterior(setup["proxy"], batch_size=5, top_k=16)
    s = post.estimate(tokenized, prior, tmp_path / "o", shard_records=10, teacher_logprob=True, progress=False)
    assert s["teacher_logprob"] and s["mode"] == "log_linear"
    for name, dist, extra in _read_all(tmp_path / "o"):
        want = torch.cat([_teacher_forced(post.model, tokenized, r, prior.vocab_size)[1]
                          for r in extra["record_index"].tolist()])
        torch.testing.assert_close(dist.extras["proxy_teacher_logprob"], want, atol=1e-5, rtol=0)
    # off by default with a prior
    post.estimate(tokenized, prior, tmp_path / "n", shard_records=10, progress=False)
    assert all("proxy_teacher_logprob" not in d.extras for _, d, _ in _read_all(tmp_path / "n"))
    # a response token at position 0 (no prompt) has no context: log-prob 0.0, the rest teacher-forced
    ids = [tokenized.input_ids[1][int(tokenized.prompt_lengths[1]):], tokenized.input_ids[2]]
    t2 = replace(tokenized, input_ids=ids, response_mask=[np.ones(len(ids[0]), bool), tokenized.response_mask[2]],
                 prompt_lengths=np.array([0, tokenized.prompt_lengths[2]], dtype=np.int32))
    rows = post.proxy_topk(t2, [0, 1], teacher_logprob=True)
    tlp = rows.extras["proxy_teacher_logprob"]
    assert tlp[0] == 0.0
    want = torch.cat([_teacher_forced(post.model, t2, r, prior.vocab_size)[1] for r in (0, 1)])
    torch.testing.assert_close(tlp[1:], want, atol=1e-5, rtol=0)


def test_cli_proxy_only(setup, tmp_path):
    out = tmp_path / "cli_proxy"
    res = CliRunner().invoke(main, ["estimate-posterior", "--data", setup["data"], "--prior", "none", "--proxy",
                                    setup["proxy"], "--tokenizer", setup["tokdir"], "--top-k", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["mode"] == "proxy" and summary["teacher_logprob"] and summary["prior_dir"] is None
    assert all("proxy_teacher_logprob" in d.extras for _, d, _ in _read_all(out))
    res = CliRunner().invoke(main, ["estimate-posterior", "--data", setup["data"], "--proxy", setup["proxy"],
                                    "--tokenizer", setup["tokdir"], "--top-k", "8", "--no-teacher-logprob",
                                    "--out", str(tmp_path / "cli_proxy2")])
    assert res.exit_code == 0, res.output
    assert all("proxy_teacher_logprob" not in d.extras for _, d, _ in _read_all(tmp_path / "cli_proxy2"))
    bad = CliRunner().invoke(main, ["estimate-posterior", "--proxy", setup["proxy"], "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--data" in bad.output and "Traceback" not in bad.output


def test_error_on_the_background_worker_is_raised(setup, tmp_path, monkeypatch):
    import bayeskd.posterior.proxy as posterior

    def boom(*args, **kwargs):
        raise RuntimeError("top-K failed")

    monkeypatch.setattr(posterior, "_fill_proxy_rows", boom)
    with pytest.raises(RuntimeError, match="top-K failed"):
        ProxyPosterior(setup["proxy"], top_k=16).estimate(setup["tokenized"], setup["prior"], tmp_path / "o",
                                                          progress=False)
    assert not list((tmp_path / "o").glob("*.safetensors"))  # nothing half-made was written


def test_cli_calibrate_picks_the_best_scoring_combination(setup, tmp_path):
    from bayeskd.posterior.calibrate import calibrate_combination
    from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
    from bayeskd.priors.ngram import NGramPrior

    out = tmp_path / "calibrated"
    res = CliRunner().invoke(main, ["estimate-posterior", "--data", setup["data"], "--prior", setup["prior_dir"],
                                    "--proxy", setup["proxy"], "--top-k", "8", "--calibrate",
                                    "--calibration-records", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    cal = summary["calibration"]
    assert cal["records"] == 6 and cal["table"][0]["nll"] == min(r["nll"] for r in cal["table"])
    assert summary["mode"] == cal["best"]["mode"]  # the shards were made with the chosen combination
    # the same choice, recomputed independently
    tok = tokenize_records(load_teacher_records(setup["data"])[0][:6], load_tokenizer(setup["tokdir"]))
    prior = NGramPrior.load(os.path.join(setup["prior_dir"], "prior"))
    seqs = tok.response_sequences()
    post = ProxyPosterior(setup["proxy"], top_k=8)
    best, _ = calibrate_combination(prior.topk(seqs, 8, leave_one_out=True),
                                    post.proxy_topk(tok, range(6), prior.vocab_size),
                                    torch.from_numpy(np.concatenate(seqs).astype(np.int64)), top_k=8)
    assert best == cal["best"]
    bad = CliRunner().invoke(main, ["estimate-posterior", "--data", setup["data"], "--prior", "none", "--proxy",
                                    setup["proxy"], "--tokenizer", setup["tokdir"], "--calibrate",
                                    "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "needs a prior" in bad.output
