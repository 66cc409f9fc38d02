"""The observed tokens are the teacher's own samples (issue 14, item 0): sampled through `generate` (HF backend, as
over an API), loaded and tokenized as every stage does, the teacher's mean −log p(y) − H(p) is 0 within its
standard error at the first response token and elsewhere, and EOS is as frequent as the teacher makes it. With the
text re-tokenized instead (what the pipeline did before), the same check fails: the test can tell.

Seeds are fixed (model seed `SEED`, generate's seed); they are printed so a failure can be replayed.
"""
import json

import pytest
import torch
from conftest import save_tiny_llama

from bayeskd.data import load_teacher_records, tokenize_records
from bayeskd.evaluation.metrics import observed_token_check
from bayeskd.teacher_forcing import target_logprobs

SEED = 5


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_tokenizer):
    """A peaked tiny teacher (its lm_head scaled up: a random one is nearly uniform, where any token looks like a
    sample) that ends often (EOS raised), sampled 8 prompts x 96."""
    from transformers import AutoModelForCausalLM

    from bayeskd.teachers.generate import generate

    print(f"teacher model seed {SEED}")
    d = tmp_path_factory.mktemp("observed")
    path = save_tiny_llama(d / "teacher", tiny_tokenizer, seed=SEED)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight *= 6.0
        model.model.embed_tokens.weight[:, 0] = 3.0
        model.lm_head.weight[tiny_tokenizer.eos_token_id, 0] = 0.6
    model.save_pretrained(path)
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ("The os module", "import sys", "def f(x):", "Hello", "A list is", "class Path",
                                "# comment", "x = 1")))
    out = d / "teacher.jsonl"
    s = generate(str(prompts), str(out), model=path, backend="hf", endpoint="completions", n=96, max_tokens=6,
                 top_logprobs=1, seed=11, keep_empty=True, progress=False)
    assert s["complete"] and s["empty"] == 0  # every sample kept, blank answers included
    records, _ = load_teacher_records(str(out))
    return model, records


def _check(model, tokenized):
    lp, _ = target_logprobs(model, tokenized)
    out = observed_token_check(lp, tokenized.response_sequences(), tokenized.eos_token_id)
    print(json.dumps(out))
    return out


def _ok(group):
    return abs(group["gap"]) <= 3 * group["stderr"] + 0.01


def test_observed_tokens_are_the_teachers_samples(sampled, tiny_tokenizer):
    model, records = sampled
    finish = [r["finish_reason"] for r in records]
    assert 0.2 < finish.count("stop") / len(finish) < 0.9  # both ends occur
    tokenized = tokenize_records(records, tiny_tokenizer)
    special = sum(any(not t["bytes"] for t in r["logprobs"]) for r in records)  # a special token: re-tokenized
    assert tokenized.report.teacher_tokens == len(records) - special and tokenized.report.noncanonical > 0
    assert tokenized.report.no_eos == finish.count("length")
    out = _check(model, tokenized)
    assert _ok(out["first"]) and _ok(out["rest"]), out
    eos = out["eos"]
    assert abs(eos["expected"] - eos["observed"]) <= 3 * eos["stderr"] + 1, eos


def test_retokenized_text_is_not(sampled, tiny_tokenizer):
    """The old way (the text re-tokenized; here also EOS on every response) fails the same check."""
    model, records = sampled
    out = _check(model, tokenize_records(records, tiny_tokenizer, teacher_tokens=False))
    assert not _ok(out["rest"]), out
    cut = [dict(r, finish_reason="stop") for r in records]  # as if every response had ended itself
    eos = _check(model, tokenize_records(cut, tiny_tokenizer))["eos"]
    assert eos["observed"] - eos["expected"] > 3 * eos["stderr"] + 1, eos


def test_check_in_row_chunks_matches_the_whole_matrix(monkeypatch):
    """The check runs in row chunks (its float64 copies of [N, V] were ~20 GB at V = 50 k): chunked, with masked
    rows and a tail chunk, it gives what the formula gives on the whole matrix at once."""
    import math

    from bayeskd.evaluation import metrics

    g = torch.Generator().manual_seed(3)
    V, lens = 37, [5, 1, 9, 4, 7]
    lp = torch.log_softmax(3 * torch.randn(sum(lens), V, generator=g), -1)
    lp[2, 5] = -math.inf  # a token the teacher never gives
    seqs = [torch.randint(0, V, (n,), generator=g).numpy() for n in lens]
    valid = torch.rand(sum(lens), generator=g) > 0.3
    valid[[0, 5, 6, 15]] = True  # first rows: at least two valid (a standard error)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 4 * V)  # 4 rows a chunk, the last one short
    got = observed_token_check(lp, seqs, eos_token_id=6, valid=valid)
    tokens = torch.from_numpy(__import__("numpy").concatenate(seqs)).long()
    first = torch.zeros(len(tokens), dtype=torch.bool)
    first[torch.tensor([0, 5, 6, 15, 19])] = True
    x, t, f = lp[valid].double(), tokens[valid], first[valid]
    gap = -x.gather(1, t[:, None])[:, 0] + (x.exp() * torch.nan_to_num(x, neginf=0.0)).sum(-1)
    for name, m in (("first", f), ("rest", ~f)):
        assert got[name]["rows"] == int(m.sum())
        assert got[name]["gap"] == pytest.approx(float(gap[m].mean()), rel=1e-12)
        assert got[name]["stderr"] == pytest.approx(float(gap[m].std() / math.sqrt(int(m.sum()))),
                                                      rel=1e-12, nan_ok=True)
    p = x[:, 6].exp()
    assert got["eos"] == pytest.approx({"rows": int(valid.sum()), "expected": float(p.sum()),
                                        "stderr": float((p * (1 - p)).sum().sqrt()), "observed": int((t == 6).sum())})
