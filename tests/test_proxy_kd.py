"""Proxy-KD: the preference loss, proxy alignment (one round, resume), the weights and weighted distillation."""
import json
import math
import os

import numpy as np
import pytest
import torch

from bayeskd.data import load_teacher_records, tokenize_records
from bayeskd.losses import sparse_kd_loss
from bayeskd.distillation.align_proxy import (align_proxy, alignment_diagnostics, pretokenized_dpo_trainer_class,
                                             proxy_preference_loss, sequence_logprobs, top1_match_ratio,
                                             topk_mass_share)
from bayeskd.distillation.targets import BayesKDCollator, TeacherTargetsDataset, proxy_kd_weights
from bayeskd.distillation.trainer import BayesKDConfig, BayesKDTrainer, distill
from bayeskd.core.names import TEACHER_LOGPROB
from bayeskd.core.sparse import CacheMismatchError, ShardWriter, SparseDist
from conftest import save_tiny_llama

WORDS = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]


def _records(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))),
             "response": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(int(rng.integers(2, 6))))}
            for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("proxy_kd")
    data = d / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    tokenized = tokenize_records(load_teacher_records(data)[0], tiny_tokenizer)
    return {"dir": d, "data": str(data), "tok": tiny_tokenizer, "tokenized": tokenized,
            "proxy": save_tiny_llama(d / "proxy", tiny_tokenizer, seed=0),
            "student": save_tiny_llama(d / "student", tiny_tokenizer, seed=1)}


# ---------------------------------------------------------------------------------------------------- pure functions

def test_preference_loss_hand_case():
    pc, pr = torch.tensor([-2.0, -3.0]), torch.tensor([-4.0, -1.0])
    rc, rr = torch.tensor([-2.5, -3.0]), torch.tensor([-3.5, -2.0])
    # margins: (0.5) - (-0.5) = 1 and (0) - (1) = -1; with beta 0.5: -log σ(0.5), -log σ(-0.5)
    pref = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2
    loss = proxy_preference_loss(pc, pr, rc, rr, beta=0.5, nll_weight=0.7)
    assert loss.item() == pytest.approx(pref + 0.7 * 2.5, abs=1e-6)  # NLL: -mean(-2, -3)
    per_token = proxy_preference_loss(pc, pr, rc, rr, beta=0.5, nll_weight=0.7, chosen_tokens=torch.tensor([4, 6]))
    assert per_token.item() == pytest.approx(pref + 0.7 * 5 / 10, abs=1e-6)
    # the gradient raises the chosen response and lowers the rejected one
    pc.requires_grad_(True), pr.requires_grad_(True)
    proxy_preference_loss(pc, pr, rc, rr, beta=0.5).backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    with pytest.raises(ValueError, match="beta"):
        proxy_preference_loss(pc, pr, rc, rr, beta=0.0)


def test_trl_loss_agrees_with_preference_loss(setup, tmp_path):
    """TRL's DPOTrainer (loss_type sigmoid + sft) computes proxy_preference_loss with the per-token NLL."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    tok = setup["tok"]
    policy = AutoModelForCausalLM.from_pretrained(setup["proxy"])
    ref = AutoModelForCausalLM.from_pretrained(setup["student"])  # another model, so the log-ratios are not 0
    prompts = [[1, 40, 41], [1, 50], [1, 60, 61, 62]]
    chosen = [[70, 71, 2], [72, 2], [73, 74, 75, 2]]
    rejected = [[80, 2], [81, 82, 83], [84, 2]]
    ds = Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": chosen, "rejected_ids": rejected})
    args = DPOConfig(output_dir=str(tmp_path / "o"), beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.6],
                     max_length=None, bf16=False, activation_checkpointing=False, report_to=[], use_cpu=True)
    trainer = pretokenized_dpo_trainer_class()(model=policy, ref_model=ref, args=args, train_dataset=ds,
                                               processing_class=tok)
    batch = trainer.data_collator([ds[i] for i in range(3)])
    policy.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, batch)
    pad = tok.pad_token_id
    lp = {name: sequence_logprobs(m, prompts, resp, pad_token_id=pad)
          for name, m, resp in [("pc", policy, chosen), ("pr", policy, rejected), ("rc", ref, chosen),
                                ("rr", ref, rejected)]}
    ours = proxy_preference_loss(lp["pc"], lp["pr"], lp["rc"], lp["rr"], beta=0.3, nll_weight=0.6,
                                 chosen_tokens=torch.tensor([len(c) for c in chosen]))
    assert trl_loss.item() == pytest.approx(ours.item(), rel=1e-4)


def test_weights_in_unit_interval_and_monotone(rng):
    s = rng.normal(-30, 10, size=50)
    n = rng.integers(1, 40, size=50)
    for norm, key in (("sequence", s), ("token", s / n)):
        w = proxy_kd_weights(s, n, norm)
        assert ((w > 0) & (w < 1)).all()
        order = np.argsort(key)
        assert (np.diff(w[order]) >= 0).all()  # monotone in the proxy's (normalised) likelihood
        assert np.mean(w) == pytest.approx(0.5, abs=0.1)
    # hand case: s = -1, -2, -3 -> mean -2, std sqrt(2/3); z = ±sqrt(3/2), 0
    z = math.sqrt(1.5)
    np.testing.assert_allclose(proxy_kd_weights([-1.0, -2.0, -3.0], [1, 1, 1]),
                               [1 / (1 + math.exp(-z)), 0.5, 1 / (1 + math.exp(z))], rtol=1e-12)
    # per token: s/n = -1, -1, -1 -> all equal -> 0.5
    np.testing.assert_allclose(proxy_kd_weights([-2.0, -4.0, -6.0], [2, 4, 6], "token"), [0.5] * 3)
    with pytest.raises(ValueError, match="normalization"):
        proxy_kd_weights(s, n, "batch")
    with pytest.raises(ValueError, match="non-finite"):
        proxy_kd_weights([0.0, float("nan")], [1, 1])
    with pytest.raises(ValueError, match="n_tokens must be > 0"):
        proxy_kd_weights([0.0, -1.0], [1, 0], "token")


def test_diagnostics_hand_case():
    p = torch.tensor([[0.96, 0.02, 0.01, 0.01],   # top-1 mass 0.96 > 0.95
                      [0.5, 0.46, 0.03, 0.01],    # needs top-2 (0.96)
                      [0.4, 0.3, 0.2, 0.1]])      # needs top-4 (1.0 > 0.95; top-3 is 0.9)
    lp = p.log()
    assert top1_match_ratio(lp, torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
    assert topk_mass_share(lp, ks=[1, 2, 3, 4]) == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])
    with pytest.raises(ValueError, match="ks must lie"):
        topk_mass_share(lp, ks=[5])


# ---------------------------------------------------------------------------------------------------- alignment

def _pairs_margin(model_dir, pairs_path, pad):
    from transformers import AutoModelForCausalLM

    pairs = [json.loads(line) for line in open(pairs_path)]
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    p = [x["prompt_ids"] for x in pairs]
    return float((sequence_logprobs(m, p, [x["chosen_ids"] for x in pairs], pad_token_id=pad)
                  - sequence_logprobs(m, p, [x["rejected_ids"] for x in pairs], pad_token_id=pad)).mean())


ALIGN = dict(beta=0.5, max_new_tokens=8, learning_rate=5e-3, sft_learning_rate=5e-3, dpo_epochs=2, batch_size=4,
             logging_steps=1, diagnostic_records=8, device="cpu")


def test_one_round_raises_teacher_likelihood_relative_to_own_samples(setup, tmp_path):
    out = tmp_path / "align"
    s = align_proxy(setup["data"], setup["proxy"], str(out), sft_epochs=0, rounds=1, **ALIGN)
    (r,) = s["stages"]
    assert r["stage"] == "round_1" and r["pairs"] == 8 and r["steps"] == 4
    # measured independently on the pairs the round trained on: initial proxy vs the aligned one
    pad = setup["tok"].pad_token_id
    before = _pairs_margin(setup["proxy"], out / "round_1" / "pairs.jsonl", pad)
    after = _pairs_margin(out / "final", out / "round_1" / "pairs.jsonl", pad)
    assert r["before"]["margin"] == pytest.approx(before, abs=1e-3)
    assert after > before + 1.0, (before, after)
    assert r["after"]["chosen_logprob"] > r["before"]["chosen_logprob"]
    # the rejected responses are the proxy's own samples: at most max_new_tokens, ended by EOS when it stopped
    pairs = [json.loads(line) for line in open(out / "round_1" / "pairs.jsonl")]
    assert all(1 <= len(p["rejected_ids"]) <= 8 for p in pairs)
    assert pairs[0]["chosen_ids"] == setup["tokenized"].response_sequences()[0].tolist()
    # diagnostics before/after, the teacher's tokens better predicted after alignment
    b, a = s["diagnostics_before"], s["diagnostics_after"]
    assert len(b["topk_mass_share"]) == 64 and b["positions"] == a["positions"] > 0
    assert a["teacher_token_logprob"] > b["teacher_token_logprob"]
    assert a["top1_match"] >= b["top1_match"]
    assert json.loads((out / "summary.json").read_text())["final"] == str(out / "final")


def test_align_resumes_and_refuses_other_settings(setup, tmp_path):
    out = tmp_path / "align"
    s1 = align_proxy(setup["data"], setup["proxy"], str(out), sft_epochs=1, rounds=1, **ALIGN)
    assert [st["stage"] for st in s1["stages"]] == ["sft", "round_1"]
    weights = out / "round_1" / "model.safetensors"
    stamp = (os.stat(weights).st_ino, os.stat(weights).st_mtime_ns, os.stat(out / "sft" / "summary.json").st_mtime_ns)
    (out / ".round_2.tmp").mkdir()  # an interrupted round 2 left behind
    (out / ".round_2.tmp" / "model.safetensors").write_bytes(b"partial")

    s2 = align_proxy(setup["data"], setup["proxy"], str(out), sft_epochs=1, rounds=2, **ALIGN)
    assert [st["stage"] for st in s2["stages"]] == ["sft", "round_1", "round_2"]
    assert (os.stat(weights).st_ino, os.stat(weights).st_mtime_ns,
            os.stat(out / "sft" / "summary.json").st_mtime_ns) == stamp  # sft and round 1 reused, not redone
    assert s2["stages"][2]["policy"] == str(out / "round_1")  # round 2 starts from (and is referenced on) round 1
    assert json.loads((out / "final" / "source.json").read_text()) == {"stage": "round_2"}
    assert not (out / ".round_2.tmp").exists()
    assert s2["diagnostics_before"] == s1["diagnostics_before"]

    with pytest.raises(CacheMismatchError, match="beta"):
        align_proxy(setup["data"], setup["proxy"], str(out), sft_epochs=1, rounds=2, **{**ALIGN, "beta": 0.2})


# ---------------------------------------------------------------------------------------------------- weighted KD

def _proxy_targets(out, tokenized, k=4, seed=0, with_logprob=True):
    """Per record: k entries per row (the teacher token first), plus the per-row extras the proxy pass writes."""
    g = torch.Generator().manual_seed(seed)
    writer = ShardWriter(out, tokenized.vocab_size, k, tokenized.fingerprint, {})
    seqs = tokenized.response_sequences()
    for s, (lo, hi) in enumerate([(0, len(seqs) // 2), (len(seqs) // 2, len(seqs))]):
        parts = []
        for seq in seqs[lo:hi]:
            t = torch.as_tensor(seq, dtype=torch.int64)
            idx = torch.stack([(t + j) % tokenized.vocab_size for j in range(k)], 1).to(torch.int32)
            p = torch.softmax(torch.randn(len(t), k + 1, generator=g), -1)  # the last column is the tail
            extras = {TEACHER_LOGPROB: p[:, 0].log()} if with_logprob else {}
            parts.append(SparseDist(idx, p[:, :k].log(), p[:, k], tokenized.vocab_size, extras=extras))
        writer.write(f"shard-{s:05d}", SparseDist.cat(parts),
                     extra={"record_index": torch.arange(lo, hi, dtype=torch.int64),
                            "lengths": torch.tensor([p.num_rows for p in parts], dtype=torch.int64)})
    return str(out)


def test_dataset_weights_and_weighted_loss(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenized = setup["tokenized"]
    targets = _proxy_targets(tmp_path / "t", tokenized)
    ds = TeacherTargetsDataset(tokenized, targets, weight_normalization="token")
    # s per record = the sum of its rows' proxy log-probabilities (the teacher token is the first entry)
    items = [ds[i] for i in range(len(ds))]
    np.testing.assert_allclose(ds.proxy_seq_logprob, [float(it["target_logprobs"][:, 0].double().sum())
                                                      for it in items], rtol=1e-6)
    np.testing.assert_array_equal(ds.proxy_n_tokens, [len(r) for r in tokenized.response_sequences()])
    np.testing.assert_allclose(ds.proxy_kd_weights, proxy_kd_weights(ds.proxy_seq_logprob, ds.proxy_n_tokens, "token"))
    batch = BayesKDCollator(setup["tok"].pad_token_id)(items[:5])
    rows_per_item = [it["target_tail"].shape[0] for it in items[:5]]
    expect = torch.repeat_interleave(torch.tensor(ds.proxy_kd_weights[:5], dtype=torch.float32),
                                     torch.tensor(rows_per_item))
    torch.testing.assert_close(batch["target_weight"], expect)

    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    cfg = BayesKDConfig(output_dir=str(tmp_path / "o"), ce_weight=0.5, method="proxy-kd", proxy_kd_alpha=3.0,
                        fused_backend="torch")
    trainer = BayesKDTrainer(model=model, args=cfg, train_dataset=ds)
    model.eval()
    loss = trainer.compute_loss(model, batch)
    sel = batch["response_mask"][:, 1:]
    with torch.no_grad():
        rows = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][sel]
    target = SparseDist(batch["target_indices"], batch["target_logprobs"], batch["target_tail"], rows.shape[-1])
    kd_rows = sparse_kd_loss(rows, target)
    ce = torch.nn.functional.cross_entropy(rows, batch["input_ids"][:, 1:][sel])
    torch.testing.assert_close(loss.detach(), 0.5 * ce + 3.0 * (expect * kd_rows).mean(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loss.detach(), 0.5 * ce + 3.0 * kd_rows.mean())  # the weights matter


def test_distill_proxy_kd(setup, tmp_path):
    tokenized = setup["tokenized"]
    targets = _proxy_targets(tmp_path / "t", tokenized)
    s = distill(setup["data"], setup["student"], str(tmp_path / "o"), targets=targets, method="proxy-kd",
                proxy_kd_alpha=2.0, proxy_kd_normalization="sequence", max_steps=3, per_device_train_batch_size=4,
                logging_steps=1, fused_backend="torch")
    assert s["method"] == "proxy-kd" and s["steps"] == 3 and math.isfinite(s["final_kd_loss"])
    assert 0 < s["proxy_kd_weights"]["min"] < s["proxy_kd_weights"]["max"] < 1

    plain = _proxy_targets(tmp_path / "plain", tokenized, with_logprob=False)
    with pytest.raises(ValueError, match=TEACHER_LOGPROB):
        distill(setup["data"], setup["student"], str(tmp_path / "o2"), targets=plain, method="proxy-kd")
    with pytest.raises(ValueError, match="needs targets"):
        distill(setup["data"], setup["student"], str(tmp_path / "o3"), method="proxy-kd")
    with pytest.raises(ValueError, match="proxy_kd_alpha"):
        BayesKDConfig(output_dir=str(tmp_path / "o4"), method="proxy-kd", kd_weight=2.0)
    with pytest.raises(ValueError, match="method"):
        BayesKDConfig(output_dir=str(tmp_path / "o4"), method="gkd")


def test_alignment_diagnostics_on_a_model(setup):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(setup["proxy"])
    d = alignment_diagnostics(m, setup["tokenized"], ks=[1, 8, 512], batch_size=3, pad_token_id=0)
    tokenized = setup["tokenized"]
    assert d["positions"] == sum(len(r) for r in tokenized.response_sequences())
    assert d["topk_mass_share"][-1] == 1.0  # all of V holds all the mass
    assert 0 <= d["topk_mass_share"][0] <= d["topk_mass_share"][1] <= 1
    assert d["teacher_token_logprob"] < 0 and 0 <= d["top1_match"] <= 1


# ---------------------------------------------------------------------------------------------------- CLI

def test_cli_align_proxy_and_distill_proxy_kd(setup, tmp_path):
    from click.testing import CliRunner

    from bayeskd.cli import main

    out = tmp_path / "align"
    res = CliRunner().invoke(main, ["align-proxy", "--data", setup["data"], "--proxy", setup["proxy"], "--out",
                                    str(out), "--sft-epochs", "0", "--rounds", "1", "--max-new-tokens", "4",
                                    "--batch-size", "8", "--diagnostic-records", "4"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert '"top1_match_after"' in res.output and '"stages"' not in res.output  # the compact summary is printed
    assert json.loads((out / "summary.json").read_text())["final"] == str(out / "final")
    assert (out / "final" / "config.json").exists() and (out / "final" / "tokenizer.json").exists()
    res = CliRunner().invoke(main, ["align-proxy", "--data", setup["data"], "--proxy", setup["proxy"], "--out",
                                    str(out), "--sft-epochs", "0", "--rounds", "1", "--max-new-tokens", "5"])
    assert res.exit_code != 0 and "max_new_tokens" in res.output  # a clear refusal, no traceback

    targets = _proxy_targets(tmp_path / "t", setup["tokenized"])
    res = CliRunner().invoke(main, ["distill", "--data", setup["data"], "--student", setup["student"], "--targets",
                                    targets, "--out", str(tmp_path / "s"), "--method", "proxy-kd",
                                    "--weight-normalization", "token", "--proxy-kd-alpha", "0.5", "--max-steps", "1",
                                    "--per-device-train-batch-size", "4"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["method"] == "proxy-kd" and s["proxy_kd_normalization"] == "token" and s["proxy_kd_alpha"] == 0.5


def test_proxy_only_posterior_targets_feed_proxy_kd(setup, tmp_path):
    """The real contract: `estimate_posterior` without a prior writes the proxy's top-K with the per-row
    `proxy_teacher_logprob`; its per-record sums are the proxy's log p(y_T|x) measured directly."""
    from transformers import AutoModelForCausalLM

    from bayeskd.posterior.estimate import estimate_posterior

    out = tmp_path / "proxy_targets"
    estimate_posterior(setup["data"], None, setup["proxy"], str(out), tokenizer=setup["proxy"], top_k=8,
                       shard_records=3, device="cpu")
    tokenized = setup["tokenized"]
    ds = TeacherTargetsDataset(tokenized, str(out), weight_normalization="sequence")
    prompts = [ids[:int(p)].tolist() for ids, p in zip(tokenized.input_ids, tokenized.prompt_lengths)]
    direct = sequence_logprobs(AutoModelForCausalLM.from_pretrained(setup["proxy"]), prompts,
                               [r.tolist() for r in tokenized.response_sequences()], pad_token_id=0)
    np.testing.assert_allclose(ds.proxy_seq_logprob, direct.numpy(), rtol=1e-4)
    s = distill(setup["data"], setup["student"], str(tmp_path / "s"), targets=str(out), method="proxy-kd",
                max_steps=1, per_device_train_batch_size=4, fused_backend="torch")
    assert s["method"] == "proxy-kd" and math.isfinite(s["final_loss"] or s["train_loss"])
