"""estimate-posterior conditioned on the teacher's revealed log-probabilities, end to end: records from
`generate` (local backend, top-5), the prior, a proxy; the teacher's true distributions score the result."""
import json

import numpy as np
import pytest
import torch

from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
from bayeskd.evaluation.metrics import kl_teacher_to_estimate
from bayeskd.core.sparse import ShardReader
from bayeskd.teacher_forcing import target_logprobs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_llama

    from bayeskd.priors.estimate import estimate_prior
    from bayeskd.teachers.generate import generate

    d = tmp_path_factory.mktemp("post_ev")
    teacher = save_tiny_llama(d / "teacher", tiny_tokenizer, seed=21, layers=2)
    proxy = save_tiny_llama(d / "proxy", tiny_tokenizer, seed=22)
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The {w} module"}) + "\n"
                               for w in ("os", "sys", "json", "re", "math", "time", "io", "csv")))
    data = d / "teacher.jsonl"
    s = generate(str(prompts), str(data), model=teacher, backend="hf", endpoint="completions", n=2, max_tokens=10,
                 top_logprobs=5, seed=3, progress=False)
    assert s["complete"]
    estimate_prior(str(data), teacher, out=str(d / "prior"), order=2, top_k=16, write_topk=True, codec="raw")
    return {"d": d, "data": data, "teacher": teacher, "proxy": proxy}


def _rows(out):
    return torch.cat([d.logprobs for d, _ in ShardReader(out)]), ShardReader(out)


def _estimate(setup, name, **kw):
    from bayeskd.posterior.estimate import estimate_posterior

    out = setup["d"] / name
    summary = estimate_posterior(str(setup["data"]), str(setup["d"] / "prior"), setup["proxy"], str(out), top_k=16,
                                 mode="mixture", w=0.3, codec="raw", **kw)  # exact rows: compared to 1e-5
    from bayeskd.core.sparse import SparseDist

    dist = SparseDist.cat([d for d, _ in ShardReader(out)])
    return summary, dist


def test_conditioning_keeps_the_revealed_entries_and_gets_closer_to_the_teacher(setup):
    from transformers import AutoModelForCausalLM

    from bayeskd.posterior.evidence import evidence_rows

    cond_sum, cond = _estimate(setup, "cond")
    _, text = _estimate(setup, "text", no_evidence=True)
    _, only = _estimate(setup, "only", evidence_mode="evidence_only")
    ev_report = cond_sum["evidence"]
    assert ev_report is not None and 0.3 < ev_report["share_with_evidence"] <= 1.0
    records, _ = load_teacher_records(setup["data"])
    tok = load_tokenizer(setup["teacher"])
    tokenized = tokenize_records(records, tok)
    ev, _ = evidence_rows(records, tokenized, tok)
    exact = ev.has & ~ev.lower.any(axis=1)
    assert exact.sum() > 10
    # the revealed entries keep their probabilities exactly where they are exact (those above the cap, at least:
    # the K = 16 kept entries may leave out a sampled token below the top list, or a tie at the cap)
    checked = 0
    for row in np.nonzero(exact)[0][:50]:
        got = dict(zip(cond.indices[row].tolist(), cond.logprobs[row].exp().tolist()))
        for i, p in zip(ev.indices[row], ev.probs[row]):
            if i >= 0 and p > ev.cap[row] * (1 + 1e-5):
                assert got[int(i)] == pytest.approx(float(p), rel=1e-5, abs=1e-7)
                checked += 1
    assert checked > 20
    # rows without evidence are the text-only posterior's, bit for bit
    none = torch.from_numpy(~ev.has)
    assert torch.equal(cond.indices[none], text.indices[none]) and torch.equal(cond.tail[none], text.tail[none])
    # the teacher's truth: conditioning lowers KL at the revealed positions (this random teacher is nearly flat, so
    # the baselines' uniform tail is about as good here; the lab compares them on a trained teacher)
    t_lp, valid = target_logprobs(AutoModelForCausalLM.from_pretrained(setup["teacher"]), tokenized)
    at = valid & torch.from_numpy(ev.has)
    kl = {name: float(kl_teacher_to_estimate(t_lp, est)[at].mean())
          for name, est in (("cond", cond), ("text", text), ("only", only))}
    print(kl)
    assert kl["cond"] < 0.7 * kl["text"] and kl["only"] < 0.7 * kl["text"]


def test_no_evidence_gives_the_text_only_shards(setup, tmp_path):
    """--no-evidence on records with logprobs writes exactly what the same records without them give."""
    import hashlib

    from bayeskd.posterior.estimate import estimate_posterior

    from bayeskd.data import load_tokenizer, tokenize_records

    # Records the tokenizer splits as the teacher did (elsewhere the text alone gives other tokens than the
    # teacher's own, which records with logprobs keep): with and without their logprobs.
    tok = load_tokenizer(setup["teacher"])
    recs = [json.loads(x) for x in setup["data"].read_text().splitlines()]
    plain_recs = [{k: v for k, v in r.items() if k != "logprobs"} for r in recs]
    canonical = [i for i in range(len(recs)) if np.array_equal(tokenize_records([recs[i]], tok).input_ids[0],
                                                               tokenize_records([plain_recs[i]], tok).input_ids[0])]
    assert 0 < len(canonical) < len(recs), len(canonical)  # (the others are tested in test_evidence.py)
    full, plain = tmp_path / "full.jsonl", tmp_path / "plain.jsonl"
    for path, rs in ((full, recs), (plain, plain_recs)):
        path.write_text("".join(json.dumps(rs[i]) + "\n" for i in canonical))
    kw = dict(top_k=16, mode="mixture", w=0.3, reuse_prior_topk=False)
    a = estimate_posterior(str(full), str(setup["d"] / "prior"), setup["proxy"], str(tmp_path / "a"),
                           no_evidence=True, **kw)
    b = estimate_posterior(str(plain), str(setup["d"] / "prior"), setup["proxy"], str(tmp_path / "b"), **kw)
    assert a["evidence"] is None and b["evidence"] is None

    def sums(d):
        return [hashlib.sha256((d / n).read_bytes()).hexdigest() for n in ShardReader(d).shard_names]

    assert sums(tmp_path / "a") == sums(tmp_path / "b")
