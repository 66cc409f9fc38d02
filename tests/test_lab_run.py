"""The main job (`bayeskd lab run`) at the micro preset, and `bayeskd evaluate`'s dataset-level scoring."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bayeskd.cli import main
from bayeskd.data import tokenize_records
from bayeskd.lab.build import LabError
from bayeskd.lab.run import RUN_CONFIGS, run_lab
from bayeskd.evaluation.evaluate import estimate_metrics, read_target_rows, response_logprobs
from bayeskd.core.sparse import ShardWriter, SparseDist
from bayeskd.distillation.trainer import whitebox_targets
from conftest import save_tiny_llama

RECORDS = [{"prompt": "Return the", "response": "absolute value of a number."},
           {"prompt": "The with statement", "response": "wraps a block with methods defined by a context manager."},
           {"prompt": "x", "response": "y z"}]


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("labrun")
    # as a user runs it (progress bars on: they go to the log file)
    res = CliRunner().invoke(main, ["lab", "run", "--preset", "micro", "--root", str(root)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return root, res.output


@pytest.mark.e2e  # the lab_run fixture runs a whole `bayeskd lab run --preset micro`
def test_lab_run_writes_every_table(lab_run):
    root, output = lab_run
    run = root / "micro" / "run"
    report = json.loads((run / "report.json").read_text())
    table = report["estimation"]["table"]
    text_only = "posterior, aligned proxy, calibrated, text only (shards)"
    conditioned = "posterior, aligned proxy, calibrated, conditioned on the top-20 (shards)"
    for name in ("smoothed one-hot (eps=0.1)", "n-gram prior (leave-one-out)",
                 "n-gram prior, in-sample (no leave-one-out: scored on its own counts)",
                 "proxy alone (before alignment)", "posterior log-linear, text only (shards)",
                 "posterior dirichlet (c=1), text only", "posterior mixture (w=0.5), text only",
                 "proxy after alignment", text_only, conditioned):
        m = table[name]
        assert math.isfinite(m["kl"]) and m["kl"] > -1e-6, (name, m)
        assert 0.0 <= m["top1"] <= 1.0 and 0.0 <= m["coverage@8"] <= 1.0 + 1e-9
    # the smoothed one-hot is far from a (nearly flat) micro teacher; any real estimate is closer
    assert table["proxy alone (before alignment)"]["kl"] < table["smoothed one-hot (eps=0.1)"]["kl"]
    # the pipeline's posterior targets beat it by a margin (README's target: <= 30% of its KL; runs seen: ~12%)
    one_hot = table["smoothed one-hot (eps=0.1)"]["kl"]
    assert table[conditioned]["kl"] < table[text_only]["kl"] < 0.3 * one_hot, table
    assert table["posterior log-linear, text only (shards)"]["kl"] < 0.5 * one_hot, table
    # every target says which posterior it measures (issue 27 item 4): text only and conditioned apart
    assert report["targets"]["posterior_text_only_kl_over_proxy"] == pytest.approx(
        table[text_only]["kl"] / table["proxy alone (before alignment)"]["kl"])
    assert "posterior_kl_over_proxy" not in report["targets"]
    # every stage left its output: teacher samples, prior (model and top-K shards), posterior shards, report
    for stage in ("teacher_train.jsonl", "teacher_heldout.jsonl", "prior/prior/config.json", "prior/topk/manifest.json",
                  "posterior/manifest.json", "posterior_calibrated/manifest.json", "proxy_targets/manifest.json",
                  "report.md"):
        assert (run / stage).exists() and (run / stage).stat().st_size > 0, stage
    assert [r["k"] for r in report["estimation"]["k_curve"]] == [4, 16]
    ev = report["estimation"]["evidence"]  # the teacher server revealed its top-20: conditioning is scored
    assert [r["k"] for r in ev["rows"]] == [1, 5, 20] and ev["report"]["rows_with_evidence"] > 0
    assert all(r["condition"] < r["text_only"] for r in ev["rows"])
    n = report["data"]["train_records"]  # the teacher's answers over HTTP (blank ones kept: they are samples too)
    assert 40 <= n <= 48 and [r["samples"] for r in report["corpus_curve"]][1:] == [n // 2, n]
    md = (run / "report.md").read_text()  # each student row says what it learned from
    assert "| posterior-kd | text + top-20 |" in md and "| posterior-kd-text | text only |" in md, md
    assert "| white-box | the teacher's logits |" in md
    d = report["data"]  # held-out prompts are disjoint from training ones by text (issue 27 item 10)
    assert d["prompts_shared"] == 0 and d["heldout_prompts_distinct"] > 0 and d["train_prompts_distinct"] > 0
    students = report["students"]["summary"]
    assert set(students) == {"student init", "sft", "prior-kd", "posterior-kd", "posterior-kd-k5", "posterior-kd-text",
                             "bucket-kd", "proxy-kd", "gad", "white-box"}
    for method in ("sft", "prior-kd", "posterior-kd", "posterior-kd-k5", "posterior-kd-text", "bucket-kd", "proxy-kd",
                   "white-box"):
        assert os.path.exists(run / "students" / f"{method}-s0" / "config.json")
    assert os.path.exists(run / "students" / "gad-s0" / "student" / "config.json")
    curve = report["students"]["gad_d_acc"]["0"]  # the discriminator's accuracy, step by step
    assert [h["stage"] for h in curve] == ["warmup"] * 2 + ["gad"] * 2
    assert all(0.0 <= h["d_acc"] <= 1.0 for h in curve)
    assert os.path.exists(run / "aligned_proxy" / "final" / "config.json")
    assert "top1_match_after" in report["alignment"]["alignment"]
    for method in ("sft", "prior-kd", "posterior-kd", "proxy-kd", "gad", "white-box"):
        # training on teacher text lowers the student's NLL of held-out teacher text
        assert students[method]["nll"]["mean"] < students["student init"]["nll"]["mean"], method
    assert "gap_closed_posterior_kd" in report["targets"]
    # the KD recipe is chosen on the validation half of the held-out prompts, the students scored on the other
    # (issue 27 item 9): the CE weight of the grid with the lowest validation KL, white-box at the whole vocabulary
    st = report["students"]
    held = [json.loads(line) for line in (run / "teacher_heldout.jsonl").read_text().splitlines()]
    assert st["validation_records"] + st["heldout_records"] == len(held) and st["validation_records"] > 0
    recipe = st["recipe"]
    assert {(g["method"], g["ce_weight"]) for g in recipe["grid"]} == {(m, w) for m in ("posterior-kd", "white-box")
                                                                      for w in (0.0, 1.0)}
    assert recipe["ce_weight"] == min((0.0, 1.0), key=lambda w: recipe["score"][str(w)])
    assert report["config"]["ce_weight"] == recipe["ce_weight"] and report["config"]["whitebox_top_k"] == 0
    wb = json.loads((run / "students" / "white-box-s0" / "summary.json").read_text())
    assert wb["ce_weight"] == recipe["ce_weight"] and wb["whitebox_top_k"] == report["cross_tokenizer"]["student_vocab"]
    sft = json.loads((run / "students" / "sft-s0" / "summary.json").read_text())
    assert sft["ce_weight"] == 1.0 and st["budget"]["steps"] == sft["steps"]
    curves = st["curves"]  # checkpoints of one run at half an epoch and at one epoch, scored on the test half
    assert [r["steps"] for r in curves["summary"] if r["method"] == "sft"] == [3, 6]
    assert {r["method"] for r in curves["summary"]} == {"sft", "posterior-kd", "posterior-kd-text", "white-box"}
    assert all(0 < r["kl_tf"]["mean"] < 5 and "kl_own" in r for r in curves["summary"])
    md = (run / "report.md").read_text()
    assert "## KD recipe (chosen on" in md and "## Learning curves" in md and "held-out test records" in md
    # teacher B (another tokenizer): its revealed log-probabilities reach the student's vocabulary at some positions
    # (lower bounds at the starts both tokenizers share), and every student is scored per byte of B's text
    cross = report["cross_tokenizer"]
    assert cross["teacher_vocab"] != cross["student_vocab"]
    for method in ("posterior-kd", "posterior-kd-k5"):
        ev = cross["evidence"][method]
        assert 0 < ev["share_with_evidence"] < 1 and ev["records_cross_tokenizer"] > 0
    assert set(cross["nll_per_byte"]) == {"student init", "sft", "posterior-kd-text", "posterior-kd-k5", "posterior-kd"}
    assert cross["nll_per_byte"]["sft"]["mean"] < cross["nll_per_byte"]["student init"]["mean"]
    assert "## Across tokenizers" in (run / "report.md").read_text()
    assert "## Student quality" in (run / "report.md").read_text()
    assert "Estimation quality" in output  # the tables are printed
    # ...with one line per stage; what the stages print (the Trainer's per-step logs, bars, warnings) goes to the
    # log file beside run/ (issue 28 item 7)
    log = (root / "micro" / "run.log").read_text()
    assert "train_runtime" in log and "it/s" in log and "train_runtime" not in output and "it/s" not in output
    assert "[lab] estimate-prior: " in output and "[lab] estimate-prior: " in log and len(output) < 30_000
    # the Bayesian part against its components: the aligned proxy never trained on what is scored or calibrated on
    b = report["bayes"]
    assert "held out 32" in b["proxy"] and b["calibration_records"] == 16
    for place in ("training positions", "held-out teacher text"):
        kl = b["where"][place]["kl"]
        assert all(math.isfinite(v) for v in kl.values()) and b["chosen"] in kl
        assert b["where"][place]["ratio"] == pytest.approx(kl[b["chosen"]] / min(
            kl["proxy"], kl["n-gram prior"], kl["suffix prior"]))
    assert b["budget"] == []  # micro samples each prompt once: no "more samples per prompt" row to compare
    assert "## Does the Bayesian part pay?" in (run / "report.md").read_text()


@pytest.mark.e2e
def test_lab_run_resumes_and_refuses_other_settings(lab_run):
    root, _ = lab_run
    run = root / "micro" / "run"
    student = run / "students" / "sft-s0" / "summary.json"
    before = os.stat(student).st_mtime_ns
    res = CliRunner().invoke(main, ["lab", "run", "--preset", "micro", "--root", str(root), "--quiet",
                                    "--methods", "sft"])
    assert res.exit_code == 0, res.output
    assert os.stat(student).st_mtime_ns == before  # the finished student was reused, not retrained
    assert set(json.loads((run / "report.json").read_text())["students"]["summary"]) == {"student init", "sft"}
    bad = CliRunner().invoke(main, ["lab", "run", "--preset", "micro", "--root", str(root), "--methods", "nope"])
    assert bad.exit_code != 0 and "nope" in (bad.output + str(bad.exception))
    # other teacher samples / targets settings: refused, and the finished run is left as it was
    other = dataclasses.replace(RUN_CONFIGS["micro"], top_k=8)
    with pytest.raises(LabError, match="other settings"):
        run_lab(str(root), "micro", config=other, progress=False, log=lambda _: None)
    assert os.stat(student).st_mtime_ns == before


def test_response_logprobs_rows_match_a_direct_forward(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    path = save_tiny_llama(tmp_path / "m", tiny_tokenizer, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = tokenize_records(RECORDS, tiny_tokenizer)
    lp, valid = response_logprobs(model, tok, [2, 0], batch_size=2)
    assert valid.all()
    row = 0
    for i in (2, 0):
        ids = torch.from_numpy(tok.input_ids[i].astype(np.int64))
        p = int(tok.prompt_lengths[i])
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
        for t in range(p, len(ids)):
            torch.testing.assert_close(lp[row], full[t - 1], atol=1e-5, rtol=1e-5)
            row += 1
    assert row == lp.shape[0]


def test_evaluate_scores_targets_and_students(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    teacher = save_tiny_llama(tmp_path / "teacher", tiny_tokenizer, seed=1)
    other = save_tiny_llama(tmp_path / "other", tiny_tokenizer, seed=2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    tok = tokenize_records(RECORDS, tiny_tokenizer)
    t_lp, _ = response_logprobs(AutoModelForCausalLM.from_pretrained(teacher), tok)
    # targets = the teacher's own top-64 (with its exact tail): a nearly perfect estimate
    exact = whitebox_targets(t_lp, 64)
    lengths = [len(tok.input_ids[i]) - int(tok.prompt_lengths[i]) for i in range(len(tok))]
    w = ShardWriter(tmp_path / "targets", exact.vocab_size, 64, tok.fingerprint, {})
    w.write("shard-00000", exact, extra={"record_index": torch.arange(len(tok)),
                                         "lengths": torch.tensor(lengths)})
    back = read_target_rows(tmp_path / "targets", tok, [1, 2])
    torch.testing.assert_close(back.logprobs, exact[lengths[0]:].logprobs)
    out = tmp_path / "report.json"
    res = CliRunner().invoke(main, ["evaluate", "--teacher", teacher, "--data", str(data), "--targets",
                                    f"exact={tmp_path / 'targets'}", "--student", f"other={other}",
                                    "--student", f"self={teacher}", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(out.read_text())
    est = rep["estimation"]
    assert est["exact"]["kl"] < 0.05 * est["one-hot (eps=0.1)"]["kl"]
    assert est["exact"]["top1"] == 1.0
    assert rep["students"]["self"]["kl_tf"] == pytest.approx(0.0, abs=1e-6)
    assert rep["students"]["other"]["kl_tf"] > 1e-3
    # the NLL is the mean -log p of the teacher tokens, checked by hand for the teacher itself
    tokens = torch.cat([torch.from_numpy(s.astype(np.int64)) for s in tok.response_sequences()])
    nll = float(-t_lp.gather(1, tokens[:, None]).double().mean())
    assert rep["students"]["self"]["nll"] == pytest.approx(nll, rel=1e-5)


def test_evaluate_rejects_bad_input(tmp_path, tiny_tokenizer):
    teacher = save_tiny_llama(tmp_path / "t", tiny_tokenizer, seed=1)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n")
    none = CliRunner().invoke(main, ["evaluate", "--teacher", teacher, "--data", str(data)])
    assert none.exit_code != 0 and "nothing to evaluate" in none.output
    missing = CliRunner().invoke(main, ["evaluate", "--teacher", teacher, "--data", str(data),
                                        "--targets", f"x={tmp_path / 'nope'}"])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    tok = tokenize_records(RECORDS, tiny_tokenizer)
    lp = torch.log_softmax(torch.randn(5, tok.vocab_size, generator=torch.Generator().manual_seed(0)), -1)
    with pytest.raises(ValueError, match="not the same positions"):
        estimate_metrics(lp, SparseDist(torch.zeros(4, 1, dtype=torch.int32), torch.zeros(4, 1), torch.zeros(4),
                                        tok.vocab_size))


@pytest.mark.e2e
def test_bayes_table_refuses_a_proxy_trained_on_the_scored_records(lab_run):
    from bayeskd.data import load_teacher_records
    from bayeskd.lab.bayes import _check_heldout
    from bayeskd.posterior.calibrate import expand_ranges, read_training_info

    root, _ = lab_run
    run = root / "micro" / "run"
    records, _ = load_teacher_records(str(run / "teacher_train.jsonl"))
    proxy = str(run / "aligned_proxy" / "final")
    held = expand_ranges(read_training_info(proxy)["heldout"])
    assert held == list(range(32)) and "held out" in _check_heldout(proxy, records, held)
    with pytest.raises(RuntimeError, match="trained on 1 of the records"):
        _check_heldout(proxy, records, held + [40])
