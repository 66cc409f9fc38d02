"""The lab's on-policy study (`bayeskd.lab.onpolicy`) and TRL's peer rows (`bayeskd.lab.trl_peers`)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import save_tiny_llama


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]
    return [{"prompt": f"Question {i}: " + " ".join(rng.choice(words, size=int(rng.integers(2, 6)))),
             "response": " ".join(rng.choice(words, size=int(rng.integers(3, 12))))} for i in range(n)]


def test_prompt_collator_left_pads_prompts_and_labels_responses():
    from bayeskd.lab.trl_peers import PromptCollator

    rng = np.random.default_rng(3)
    items = []
    for _ in range(5):
        p, r = int(rng.integers(1, 7)), int(rng.integers(1, 9))
        items.append({"input_ids": rng.integers(1, 50, size=p + r).tolist(), "prompt_length": p})
    b = PromptCollator(pad_token_id=0)(items)
    pw = max(it["prompt_length"] for it in items)
    for i, it in enumerate(items):
        ids, p = torch.tensor(it["input_ids"]), it["prompt_length"]
        assert torch.equal(b["prompts"][i, pw - p:], ids[:p]) and b["prompt_attention_mask"][i, :pw - p].sum() == 0
        assert b["prompt_attention_mask"][i].sum() == p
        assert torch.equal(b["input_ids"][i, :len(ids)], ids) and b["attention_mask"][i].sum() == len(ids)
        assert (b["labels"][i, :p] == -100).all() and torch.equal(b["labels"][i, p:len(ids)], ids[p:])
        assert (b["labels"][i, len(ids):] == -100).all()


def test_online_combination_is_the_best_fixed_one():
    from bayeskd.lab.onpolicy import online_combination

    table = [{"mode": "adaptive", "nll": 1.0, "theta": {}}, {"mode": "log_linear", "a": 0.5, "b": 0.7, "nll": 1.3},
             {"mode": "mixture", "w": 0.3, "nll": 1.2}, {"mode": "dirichlet", "c": 4.0, "nll": 1.25}]
    assert online_combination({"table": table}) == {"posterior_mode": "mixture", "posterior_w": 0.3}
    table[1]["nll"] = 1.1
    assert online_combination({"table": table}) == {"posterior_mode": "log_linear", "posterior_a": 0.5,
                                                    "posterior_b": 0.7}


def test_gains_against_the_warm_start_off_policy_and_white_box():
    from bayeskd.lab.onpolicy import _gains

    rng = np.random.default_rng(5)
    own = {m: rng.uniform(0.5, 1.0, size=3) for m in ("warm start", "offpolicy-more", "offpolicy-whitebox",
                                                       "onpolicy-k20", "trl-gkd-fkl")}
    per_seed = {m: [{"kl_own": float(v)} for v in own[m]] for m in own}
    off_t = rng.uniform(0.5, 1.0, size=3)
    equal_time = {m: [{"offpolicy_kl_own": float(v), "short": i == 1} for i, v in enumerate(off_t)]
                  for m in ("onpolicy-k20", "trl-gkd-fkl")}
    off_wb_t = rng.uniform(0.5, 1.0, size=3)
    g = _gains(per_seed, equal_time, {"trl-gkd-fkl": [{"offpolicy_kl_own": float(v)} for v in off_wb_t]})
    np.testing.assert_allclose(g["trl-gkd-fkl"]["vs_offpolicy_whitebox_equal_time"], off_wb_t - own["trl-gkd-fkl"])
    np.testing.assert_allclose(g["onpolicy-k20"]["vs_warm_start"], own["warm start"] - own["onpolicy-k20"])
    np.testing.assert_allclose(g["onpolicy-k20"]["vs_offpolicy_equal_steps"],
                               own["offpolicy-more"] - own["onpolicy-k20"])
    np.testing.assert_allclose(g["onpolicy-k20"]["vs_offpolicy_equal_time"], off_t - own["onpolicy-k20"])
    assert g["onpolicy-k20"]["vs_offpolicy_equal_time_short"] == [False, True, False]
    assert g["trl-gkd-fkl"]["vs_offpolicy_whitebox_equal_time_short"] == [False] * 3
    # the on-policy effect at matched targets: black-box against off-policy posterior-KD, white-box against
    # off-policy white-box KD
    mine, ref = own["offpolicy-more"] - own["onpolicy-k20"], own["offpolicy-whitebox"] - own["trl-gkd-fkl"]
    np.testing.assert_allclose(g["trl-gkd-fkl"]["vs_offpolicy_whitebox_equal_steps"], ref)
    np.testing.assert_allclose(g["onpolicy-k20"]["share_of_whitebox_gain"],
                               np.where(ref > 0, mine / np.where(ref > 0, ref, 1), np.nan))
    assert "vs_offpolicy_equal_steps" not in g["offpolicy-more"]
    assert "vs_offpolicy_whitebox_equal_steps" not in g["onpolicy-k20"]
    # the report's on-policy headline: each on-policy row's mean gain, and whether every seed gained
    from bayeskd.lab.report import check_targets

    t = check_targets({"students": {"onpolicy": {"gains": g}}})
    mean = float(np.mean(own["offpolicy-more"] - own["onpolicy-k20"]))
    assert t["onpolicy-k20_kl_own_gain_vs_offpolicy_equal_steps"] == pytest.approx(mean)
    assert t["onpolicy-k20_lowers_kl_own_vs_offpolicy_equal_time_every_seed"] == bool(
        (off_t - own["onpolicy-k20"]).min() > 0)
    # the white-box rows against off-policy white-box KD only
    assert t["trl-gkd-fkl_lowers_kl_own_vs_offpolicy_whitebox_equal_time_every_seed"] == bool(
        (off_wb_t - own["trl-gkd-fkl"]).min() > 0)
    assert "trl-gkd-fkl_kl_own_gain_vs_offpolicy_equal_steps" not in t


def test_trl_sft_on_bayeskd_tokens_is_bayeskd_sft(tmp_path, tiny_tokenizer):
    """The sanity row: TRL's SFTTrainer on bayeskd's tokens (completion-only loss) trains the same weights as
    bayeskd's SFT; TRL's own text path trains on other tokens (it re-tokenizes prompt + completion)."""
    from bayeskd.distillation.trainer import distill
    from bayeskd.lab.trl_peers import trl_sft

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(24, seed=1)))
    student = save_tiny_llama(tmp_path / "student", tiny_tokenizer, seed=4)
    kw = dict(num_train_epochs=1.0, per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="cosine",
              warmup_steps=1, seed=0, data_seed=0, logging_steps=1, disable_tqdm=True)
    ours = distill(str(data), student, str(tmp_path / "ours"), ce_weight=1.0, save_strategy="no", **kw)
    trl_sft(str(data), student, tmp_path / "trl", kw)
    trl = json.loads((tmp_path / "trl" / "summary.json").read_text())
    assert trl["steps"] == ours["steps"] == 3
    assert trl["train_response_tokens"] == ours["train_response_tokens"]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "ours" / "model.safetensors")), load_file(str(tmp_path / "trl" /
                                                                                  "model.safetensors"))
    moved = max(float((a[k] - load_file(str(tmp_path / "student" / "model.safetensors"))[k]).abs().max()) for k in a)
    assert moved > 1e-3  # both trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


@pytest.mark.e2e
def test_lab_onpolicy_study_on_micro(tmp_path):
    from bayeskd.cli import main

    methods = ("sft,trl-sft,offpolicy-more,offpolicy-whitebox,onpolicy-posterior,onpolicy-k20,onpolicy-k0,"
               "onpolicy-whitebox,trl-gkd-fkl,trl-gkd-rkl")
    args = ["lab", "run", "--preset", "micro", "--root", str(tmp_path), "--methods", methods, "--no-cross-tokenizer"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((tmp_path / "micro" / "run" / "report.json").read_text())
    study = report["students"]["onpolicy"]
    s = study["summary"]
    assert set(s) == {"warm start", *methods.split(",")[2:]}
    warm = study["warm_start"]["0"]
    assert warm["best"]["kl_tf_valid"] == min(r["kl_tf_valid"] for r in warm["curve"])
    for m in ("onpolicy-k20", "onpolicy-k0"):  # scored over HTTP: requests paid per trained token
        assert s[m]["requests_per_token"]["mean"] > 0 and s[m]["scored_tokens_per_token"]["mean"] > 0
    for m in ("onpolicy-posterior", "onpolicy-whitebox", "trl-gkd-fkl", "offpolicy-more"):
        assert s[m]["requests_per_token"]["mean"] == 0
    for m, row in s.items():
        if m != "warm start":
            assert row["seconds_per_1k_tokens"]["mean"] > 0 and np.isfinite(row["kl_own"]["mean"])
    # bayeskd's white-box on-policy and TRL's GKD at the same loss (forward KL, λ = 1, own-token mean) agree
    assert abs(s["onpolicy-whitebox"]["kl_own"]["mean"] - s["trl-gkd-fkl"]["kl_own"]["mean"]) < 0.02
    assert "vs_offpolicy_equal_time" in study["gains"]["onpolicy-k20"]
    assert "vs_offpolicy_whitebox_equal_time" in study["gains"]["trl-gkd-fkl"]
    # equal seconds: an off-policy run with fewer seconds than an on-policy row went on past its equal-steps length,
    # and a match is flagged short exactly when even the longest run had fewer seconds (whether one is short, or
    # the run needed lengthening at all, depends on the machine's load: seconds are measured)
    steps_per_epoch = warm["curve"][0]["steps"]  # (the warm start is checkpointed every epoch)
    for table, curve in (("equal_time", "offpolicy_curve"), ("equal_time_whitebox", "offpolicy_whitebox_curve")):
        run = study["warm_start"]["0"][curve]
        slowest = max(e[0]["seconds"] for e in study[table].values())
        assert run[-1]["seconds"] >= 0.95 * slowest or run[-1]["steps"] > 2 * steps_per_epoch, (run[-1], slowest)
        for e in study[table].values():
            assert e[0]["short"] == (run[-1]["seconds"] < 0.9 * e[0]["seconds"]), (run[-1], e)
    text = (tmp_path / "micro" / "run" / "report.md").read_text()
    assert "## On-policy distillation" in text and "| trl-gkd-rkl |" in text
    sft = report["students"]["summary"]
    assert abs(sft["trl-sft"]["kl_tf"]["mean"] - sft["sft"]["kl_tf"]["mean"]) < 1e-3
    # a rerun reuses every row (nothing retrained) and changing a study setting redoes the study only
    before = (tmp_path / "micro" / "run" / "onpolicy" / "onpolicy-k0-s0" / "summary.json").stat().st_mtime_ns
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (tmp_path / "micro" / "run" / "onpolicy" / "onpolicy-k0-s0" / "summary.json").stat().st_mtime_ns == before
    sft_before = (tmp_path / "micro" / "run" / "students" / "sft-s0" / "summary.json").stat().st_mtime_ns
    res = CliRunner().invoke(main, ["lab", "run", "--preset", "micro", "--root", str(tmp_path), "--methods",
                                    "sft,offpolicy-more", "--no-cross-tokenizer", "--onpolicy-lr", "0.002"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "micro" / "run" / "onpolicy" / "onpolicy-k0-s0").exists()
    assert (tmp_path / "micro" / "run" / "students" / "sft-s0" / "summary.json").stat().st_mtime_ns == sft_before
    # a posterior-KD learning curve of the warm start's epochs and checkpoints is its run: trained once
    res = CliRunner().invoke(main, ["lab", "run", "--preset", "micro", "--root", str(tmp_path), "--methods",
                                    "posterior-kd,offpolicy-more", "--no-cross-tokenizer", "--curve-epochs", "1",
                                    "--onpolicy-warm-epochs", "1"])
    assert res.exit_code == 0, res.output
    warm = json.loads((tmp_path / "micro" / "run" / "report.json").read_text())["students"]["onpolicy"]["warm_start"]
    assert Path(warm["0"]["best"]["dir"]).is_relative_to(tmp_path / "micro" / "run" / "curves" / "posterior-kd-s0")
    assert not (tmp_path / "micro" / "run" / "onpolicy" / "warm-s0").exists()
