"""Cross-fitted calibration: align-proxy holds records out of every stage and says so beside the proxy;
estimate-posterior calibrates (by default) only on records the proxy was not trained on."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import bayeskd.distillation.trainer as trainer_module
import bayeskd.posterior.estimate as estimate_module
from bayeskd.cli import main
from bayeskd.data import load_teacher_records, tokenize_records
from bayeskd.distillation.align_proxy import TRAIN_RECORDS, align_proxy, holdout_indices
from bayeskd.records import records_fingerprint
from bayeskd.posterior.calibrate import TRAINING_INFO, expand_ranges, index_ranges
from bayeskd.posterior.estimate import estimate_posterior
from bayeskd.priors.estimate import estimate_prior
from conftest import save_tiny_llama

N, HOLDOUT = 20, 5
WORDS = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]
ALIGN = dict(max_new_tokens=4, batch_size=8, learning_rate=5e-3, sft_learning_rate=5e-3, logging_steps=1,
             diagnostic_records=4, device="cpu", training_args={"disable_tqdm": True})


def _records(n=N, seed=0):
    rng = np.random.default_rng(seed)  # every record distinct (its index is in the prompt)
    return [{"prompt": f"task {i}: " + " ".join(rng.choice(WORDS, size=2)),
             "response": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))} for i in range(n)]


def _content(rec):
    return rec["prompt"], rec["response"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("crossfit")
    data = d / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    estimate_prior(str(data), tiny_tokenizer_dir, out=str(d / "prior"), order=3, top_k=8)
    base = save_tiny_llama(d / "proxy", tiny_tokenizer, seed=0)
    sft_calls = []

    def spy(data_path, *args, **kwargs):  # what the SFT trainer was given
        sft_calls.append((data_path, load_teacher_records(data_path)[0]))
        return real(data_path, *args, **kwargs)

    real = trainer_module.distill
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "distill", spy)
        held = align_proxy(str(data), base, str(d / "held"), sft_epochs=1, rounds=1, holdout_records=HOLDOUT, **ALIGN)
        full = align_proxy(str(data), base, str(d / "full"), sft_epochs=1, rounds=0, holdout_records=0, **ALIGN)
    return {"d": d, "data": str(data), "prior": str(d / "prior"), "base": base, "held": held, "full": full,
            "sft_calls": sft_calls, "tok": tiny_tokenizer}


def test_ranges_and_fingerprint():
    assert index_ranges([5, 0, 2, 1, 2]) == [[0, 3], [5, 6]] and expand_ranges([[0, 3], [5, 6]]) == [0, 1, 2, 5]
    recs = _records()
    assert records_fingerprint(recs) == records_fingerprint([dict(r, key="k", logprobs=[]) for r in recs])
    assert records_fingerprint(recs) != records_fingerprint(recs[::-1])
    assert records_fingerprint(recs) != records_fingerprint([dict(recs[0], response="x"), *recs[1:]])
    assert holdout_indices(N, HOLDOUT, 3) == holdout_indices(N, HOLDOUT, 3) != list(range(N - HOLDOUT, N))
    with pytest.raises(ValueError, match="at least one record"):
        holdout_indices(N, N, 0)


def test_heldout_records_are_not_trained_on(lab):
    s, records = lab["held"], _records()
    info = s["training"]
    heldout, trained = expand_ranges(info["heldout"]), expand_ranges(info["trained_on"])
    assert len(heldout) == s["holdout_records"] == HOLDOUT and sorted(heldout + trained) == list(range(N))
    assert info["records"] == N and info["records_fingerprint"] == records_fingerprint(records)
    assert info["data"] == lab["data"]
    # beside every model a later job may be given, the same info
    for stage in ("sft", "round_1", "final"):
        assert json.loads((lab["d"] / "held" / stage / TRAINING_INFO).read_text()) == info
    # what the SFT trainer got: exactly the training records
    sft_path, sft_records = lab["sft_calls"][0]
    assert sft_path == str(lab["d"] / "held" / TRAIN_RECORDS)
    assert [_content(r) for r in sft_records] == [_content(records[i]) for i in trained]
    # what the preference round trained on: the training records' tokens, in order, none held out
    tokenized = tokenize_records(records, lab["tok"])
    pairs = [json.loads(line) for line in open(lab["d"] / "held" / "round_1" / "pairs.jsonl")]
    seqs = [p["prompt_ids"] + p["chosen_ids"] for p in pairs]
    assert seqs == [tokenized.input_ids[i].tolist() for i in trained]
    assert not {tuple(tokenized.input_ids[i].tolist()) for i in heldout} & {tuple(x) for x in seqs}
    # no holdout: trained on everything, and the full data went to SFT as before
    full = lab["full"]["training"]
    assert full["heldout"] == [] and full["trained_on"] == [[0, N]] and lab["sft_calls"][1] == (lab["data"], records)


def _spy_calibration(monkeypatch):
    seen = []
    real = estimate_module.calibrate_on_records

    def spy(prior, proxy, tokenized, indices, *args, **kwargs):
        seen.append(list(indices))
        return real(prior, proxy, tokenized, indices, *args, **kwargs)

    monkeypatch.setattr(estimate_module, "calibrate_on_records", spy)
    return seen


def test_calibration_scores_exactly_the_heldout_records(lab, tmp_path, monkeypatch):
    seen = _spy_calibration(monkeypatch)
    heldout = expand_ranges(lab["held"]["training"]["heldout"])
    s = estimate_posterior(lab["data"], lab["prior"], lab["held"]["final"], str(tmp_path / "a"), top_k=8)
    cal = s["calibration"]
    assert seen == [heldout] and cal["calibrated"] and cal["rule"] == "heldout" and cal["records"] == HOLDOUT
    assert expand_ranges(cal["scored"]) == heldout and s["mode"] == cal["best"]["mode"]
    # at most calibration_records of them
    s = estimate_posterior(lab["data"], lab["prior"], lab["held"]["final"], str(tmp_path / "b"), top_k=8,
                           calibration_records=2)
    assert seen[-1] == heldout[:2] and s["calibration"]["records"] == 2
    # a base model carries no training info: the first records, as before
    s = estimate_posterior(lab["data"], lab["prior"], lab["base"], str(tmp_path / "c"), top_k=8,
                           calibration_records=6)
    assert seen[-1] == list(range(6)) and s["calibration"]["rule"] == "no_training_info"


def test_proxy_trained_on_all_records_is_refused_unless_forced(lab, tmp_path, monkeypatch):
    seen = _spy_calibration(monkeypatch)
    with pytest.raises(ValueError, match=f"trained on all {N} records") as e:
        estimate_posterior(lab["data"], lab["prior"], lab["full"]["final"], str(tmp_path / "a"), top_k=8)
    assert "\n" not in str(e.value) and "--no-calibrate" in str(e.value) and "--holdout-records" in str(e.value)
    assert not (tmp_path / "a").exists()
    s = estimate_posterior(lab["data"], lab["prior"], lab["full"]["final"], str(tmp_path / "b"), top_k=8,
                           calibration_records=4, calibrate_on_training_records=True)
    cal = s["calibration"]
    assert seen == [[0, 1, 2, 3]] and cal["rule"] == "forced" and cal["calibrate_on_training_records"]
    # other data than the proxy was aligned on (here: a part of it): the overlap is unknown, refused too
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps(r) + "\n" for r in _records()[:12]))
    with pytest.raises(ValueError, match="trained on other records"):
        estimate_posterior(str(part), lab["prior"], lab["held"]["final"], str(tmp_path / "c"), top_k=8)
    # --max-records keeps the fingerprint of the whole data: the held-out records below the cut are scored
    heldout = expand_ranges(lab["held"]["training"]["heldout"])
    cut = heldout[1] + 1
    s = estimate_posterior(lab["data"], lab["prior"], lab["held"]["final"], str(tmp_path / "d"), top_k=8,
                           max_records=cut)
    assert seen[-1] == heldout[:2] and s["calibration"]["rule"] == "heldout"
    # through the CLI: a one-line error, and the flag forces it
    args = ["estimate-posterior", "--data", lab["data"], "--prior", lab["prior"], "--proxy", lab["full"]["final"],
            "--top-k", "8"]
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "e")])
    assert res.exit_code != 0 and "trained on all" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, args + ["--calibrate-on-training-records", "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["calibration"]["rule"] == "forced"


def test_given_combination_is_kept(lab, tmp_path, monkeypatch):
    seen = _spy_calibration(monkeypatch)
    base = ["estimate-posterior", "--data", lab["data"], "--prior", lab["prior"], "--proxy", lab["full"]["final"],
            "--top-k", "8"]
    res = CliRunner().invoke(main, base + ["--no-calibrate", "--mode", "mixture", "--w", "0.3",
                                           "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (s["mode"], s["w"]) == ("mixture", 0.3) and s["calibration"] == {"calibrated": False,
                                                                             "reason": "calibrate off"}
    # given settings without --no-calibrate are used too (no refusal for the proxy trained on everything)
    s = estimate_posterior(lab["data"], lab["prior"], lab["full"]["final"], str(tmp_path / "b"), top_k=8,
                           mode="dirichlet", c=2.0)
    assert (s["mode"], s["c"]) == ("dirichlet", 2.0) and s["calibration"]["reason"] == "the combination was given"
    # --no-calibrate alone: the defaults, log-linear a = b = 1
    s = estimate_posterior(lab["data"], lab["prior"], lab["full"]["final"], str(tmp_path / "c"), top_k=8,
                           calibrate=False)
    assert (s["mode"], s["a"], s["b"]) == ("log_linear", 1.0, 1.0)
    assert seen == []
    # asking for both is contradictory: refused
    res = CliRunner().invoke(main, base + ["--calibrate", "--mode", "mixture", "--out", str(tmp_path / "d")])
    assert res.exit_code != 0 and "--no-calibrate" in res.output and "--mode" in res.output


def test_explicit_holdout_indices(lab, tmp_path):
    s = align_proxy(lab["data"], lab["base"], str(tmp_path / "ex"), sft_epochs=1, rounds=0,
                    holdout_records=[4, 0, 1, 2], **ALIGN)
    assert s["training"]["heldout"] == [[0, 3], [4, 5]] and s["holdout_records"] == 4
    with pytest.raises(ValueError, match="indices must lie"):
        align_proxy(lab["data"], lab["base"], str(tmp_path / "bad"), sft_epochs=1, rounds=0,
                    holdout_records=[N + 3], **ALIGN)
