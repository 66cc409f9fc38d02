"""Distillation trainer: dataset/targets mapping, collator alignment, the loss, and `distill` end to end."""
import json
import math

import numpy as np
import pytest
import torch

from bayeskd.data import load_teacher_records, tokenize_records
from bayeskd.losses import sparse_kd_loss
from bayeskd.priors.ngram import NGramPrior
from bayeskd.core.sparse import CacheMismatchError, ShardWriter, SparseDist
from bayeskd.distillation.targets import BayesKDCollator, TeacherTargetsDataset
from bayeskd.distillation.trainer import BayesKDConfig, BayesKDTrainer, distill, whitebox_targets
from bayeskd.teacher_forcing import model_logits, select_rows

WORDS = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]


def _records(n=24, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 5))))
        start = int(rng.integers(0, 4))  # a cyclic, easy-to-learn response
        response = " ".join(WORDS[(start + j) % len(WORDS)] for j in range(int(rng.integers(3, 9))))
        recs.append({"prompt": prompt, "response": response})
    return recs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("train")
    data = d / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    records, _ = load_teacher_records(data)
    tokenized = tokenize_records(records, tok)

    def model_dir(name, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
        path = d / name
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        return str(path)

    return {"dir": d, "data": str(data), "tok": tok, "tok_dir": tiny_tokenizer_dir, "tokenized": tokenized,
            "student": model_dir("student", 0), "teacher": model_dir("teacher", 1)}


def _write_targets(out, tokenized, dists: list[SparseDist], fingerprint=None, shards=2, drop_last_row=False):
    """Shards holding whole records (extras record_index / lengths), like `bayeskd prior` writes them."""
    n = len(dists)
    writer = ShardWriter(out, dists[0].vocab_size, dists[0].k, fingerprint or tokenized.fingerprint, {})
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = [dists[i] for i in range(lo, hi)]
        lengths = [p.num_rows for p in part]
        cat = SparseDist.cat(part)
        if drop_last_row and s == shards - 1:
            cat = cat[:-1]
            lengths[-1] -= 1
        writer.write(f"shard-{s:05d}", cat, extra={"record_index": torch.arange(lo, hi, dtype=torch.int64),
                                                   "lengths": torch.tensor(lengths, dtype=torch.int64)})
    return str(out)


def _teacher_token_dists(tokenized, k=4):
    """Row t lists the actual response token first (p=0.7), then k-1 other tokens; tail 0.1."""
    V = tokenized.vocab_size
    out = []
    for seq in tokenized.response_sequences():
        seq = torch.as_tensor(seq, dtype=torch.int64)
        idx = torch.stack([(seq + j) % V for j in range(k)], 1).to(torch.int32)
        p = torch.tensor([0.7] + [0.2 / (k - 1)] * (k - 1))
        lp = p.log().expand(len(seq), k).clone()
        out.append(SparseDist(idx, lp, torch.full((len(seq),), 0.1), V))
    return out


def _prior_dists(tokenized, k=8):
    prior = NGramPrior(order=2, vocab_size=tokenized.vocab_size).fit(tokenized.response_sequences())
    return [prior.topk(s, k) for s in tokenized.response_sequences()]


# ---------------------------------------------------------------------------------------------------- data

@pytest.mark.parametrize("max_length", [None, 9])
def test_collator_aligns_targets_with_response_positions(setup, tmp_path, max_length):
    tokenized = setup["tokenized"]
    targets = _write_targets(tmp_path / "t", tokenized, _teacher_token_dists(tokenized))
    ds = TeacherTargetsDataset(tokenized, targets, max_length=max_length)
    assert len(ds) == len(tokenized)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert it["target_indices"].shape[0] == int(it["response_mask"][1:].sum())
        if max_length is not None:
            assert len(it["input_ids"]) <= max_length
    batch = BayesKDCollator(setup["tok"].pad_token_id)(items[:7])
    sel = batch["response_mask"][:, 1:]
    teacher_tokens = batch["input_ids"][:, 1:][sel]
    # the listed-first entry of every target row is the token at that position: same order, same count
    assert torch.equal(batch["target_indices"][:, 0].long(), teacher_tokens)
    assert torch.equal(batch["labels"][:, 1:][sel], teacher_tokens)
    assert (batch["labels"][~batch["response_mask"]] == -100).all()
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(it["input_ids"]) for it in items[:7]]))


def test_hand_case_order():
    """Two items, one needing padding: rows are concatenated item by item, left to right."""
    items = [
        {"input_ids": torch.tensor([5, 6, 7, 8]), "response_mask": torch.tensor([False, False, True, True]),
         "target_indices": torch.tensor([[70], [80]], dtype=torch.int32),
         "target_logprobs": torch.zeros(2, 1), "target_tail": torch.zeros(2)},
        {"input_ids": torch.tensor([9, 10, 11]), "response_mask": torch.tensor([False, True, True]),
         "target_indices": torch.tensor([[100], [110]], dtype=torch.int32),
         "target_logprobs": torch.zeros(2, 1), "target_tail": torch.zeros(2)},
    ]
    b = BayesKDCollator(pad_token_id=0)(items)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, 11, -100]]
    assert b["target_indices"][:, 0].tolist() == [70, 80, 100, 110]
    assert (b["input_ids"][:, 1:][b["response_mask"][:, 1:]] * 10).tolist() == [70, 80, 100, 110]


def test_mismatched_targets_are_refused(setup, tmp_path):
    tokenized = setup["tokenized"]
    dists = _teacher_token_dists(tokenized)
    bad_rows = _write_targets(tmp_path / "rows", tokenized, dists, drop_last_row=True)
    with pytest.raises(ValueError, match=r"target rows but \d+ response tokens"):
        TeacherTargetsDataset(tokenized, bad_rows)
    other_tok = _write_targets(tmp_path / "tok", tokenized, dists, fingerprint="0" * 64)
    with pytest.raises(CacheMismatchError, match="another tokenizer"):
        TeacherTargetsDataset(tokenized, other_tok)
    too_few = _write_targets(tmp_path / "few", tokenized, dists[:-2], shards=1)
    with pytest.raises(ValueError, match="no target rows for 2 of"):
        TeacherTargetsDataset(tokenized, too_few)


# ---------------------------------------------------------------------------------------------------- loss

def test_compute_loss_matches_hand_computation(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenized = setup["tokenized"]
    targets = _write_targets(tmp_path / "t", tokenized, _prior_dists(tokenized))
    ds = TeacherTargetsDataset(tokenized, targets)
    batch = BayesKDCollator(setup["tok"].pad_token_id)([ds[i] for i in range(5)])
    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    cfg = BayesKDConfig(output_dir=str(tmp_path / "o"), ce_weight=0.3, kd_weight=2.0, kd_temperature=1.5,
                        divergence="jsd", beta=0.3, fused_backend="torch")
    trainer = BayesKDTrainer(model=model, args=cfg, data_collator=BayesKDCollator(0), train_dataset=ds)
    model.eval()
    loss = trainer.compute_loss(model, batch)

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sel = batch["response_mask"][:, 1:]
    rows = logits[:, :-1][sel]
    ce = torch.nn.functional.cross_entropy(rows, batch["input_ids"][:, 1:][sel])
    target = SparseDist(batch["target_indices"], batch["target_logprobs"], batch["target_tail"], rows.shape[-1])
    kd = sparse_kd_loss(rows, target, divergence="jsd", beta=0.3, temperature=1.5).mean()
    torch.testing.assert_close(loss.detach(), 0.3 * ce + 2.0 * kd, rtol=1e-5, atol=1e-5)
    # the labels the collator builds agree with the rows selected for the loss
    assert torch.equal(batch["labels"][:, 1:][batch["labels"][:, 1:] != -100], batch["input_ids"][:, 1:][sel])


def test_default_ce_weight_is_one_for_sft_and_the_measured_one_beside_kd(setup, tmp_path):
    """ce_weight unset: SFT's loss is CE (its only term); beside KD it is KD_CE_WEIGHT (the lab's choice)."""
    from transformers import AutoModelForCausalLM

    from bayeskd.distillation.trainer import KD_CE_WEIGHT, resolve_ce_weight

    assert resolve_ce_weight(None, False) == 1.0 and resolve_ce_weight(None, True) == KD_CE_WEIGHT
    assert resolve_ce_weight(0.25, False) == 0.25 == resolve_ce_weight(0.25, True)
    tokenized = setup["tokenized"]
    ds = TeacherTargetsDataset(tokenized, _write_targets(tmp_path / "t", tokenized, _prior_dists(tokenized)))
    batch = BayesKDCollator(setup["tok"].pad_token_id)([ds[i] for i in range(5)])
    model = AutoModelForCausalLM.from_pretrained(setup["student"]).eval()

    def loss(batch, **cfg):
        args = BayesKDConfig(output_dir=str(tmp_path / "o"), fused_backend="torch", **cfg)
        return BayesKDTrainer(model=model, args=args, data_collator=BayesKDCollator(0)).compute_loss(model, batch)

    with torch.no_grad():
        torch.testing.assert_close(loss(batch), loss(batch, ce_weight=KD_CE_WEIGHT))
        assert not torch.allclose(loss(batch), loss(batch, ce_weight=KD_CE_WEIGHT + 1.0))
        sft = {k: v for k, v in batch.items() if not k.startswith("target_")}
        torch.testing.assert_close(loss(sft), loss(sft, ce_weight=1.0))
        assert float(loss(sft)) > 0


def test_whitebox_top_k_zero_is_the_whole_vocabulary(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    ds = TeacherTargetsDataset(setup["tokenized"], None)
    batch = BayesKDCollator(setup["tok"].pad_token_id)([ds[i] for i in range(4)])
    model = AutoModelForCausalLM.from_pretrained(setup["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"])
    V = model.get_output_embeddings().weight.shape[0]

    def loss(k):
        args = BayesKDConfig(output_dir=str(tmp_path / "o"), fused_backend="torch", ce_weight=0.0, whitebox_top_k=k)
        trainer = BayesKDTrainer(model=model, args=args, data_collator=BayesKDCollator(0), teacher_model=teacher)
        with torch.no_grad():
            return trainer.compute_loss(model, batch)

    with torch.no_grad():  # the dense KL(teacher ‖ student) over every vocabulary entry
        t = model_logits(teacher, batch["input_ids"], batch["attention_mask"])
        s = model_logits(model, batch["input_ids"], batch["attention_mask"])
        sel = batch["response_mask"]
        t_lp = torch.log_softmax(select_rows(t, sel).float(), -1)
        s_lp = torch.log_softmax(select_rows(s, sel).float(), -1)
        dense = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
    torch.testing.assert_close(loss(0), dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss(V), dense, rtol=1e-5, atol=1e-6)
    assert abs(float(loss(4)) - float(dense)) > 1e-4  # a top-4 bucket is another loss
    with pytest.raises(ValueError, match="whitebox_top_k"):
        BayesKDConfig(output_dir=str(tmp_path / "o"), whitebox_top_k=-1)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_whitebox_dense_path_is_the_sparse_one(setup, tmp_path, divergence):
    """The whole-vocabulary white-box loss runs dense; its value and gradient are the sparse path's (the teacher's
    top-V as a SparseDist through the fused loss), at a temperature too."""
    from transformers import AutoModelForCausalLM

    from bayeskd.distillation.trainer import whitebox_targets
    from bayeskd.losses.fused import fused_posterior_kd

    ds = TeacherTargetsDataset(setup["tokenized"], None)
    batch = BayesKDCollator(setup["tok"].pad_token_id)([ds[i] for i in range(4)])
    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"])
    grads = []
    for dense in (True, False):
        model = AutoModelForCausalLM.from_pretrained(setup["student"])
        args = BayesKDConfig(output_dir=str(tmp_path / "o"), fused_backend="torch", ce_weight=0.0, whitebox_top_k=0,
                             divergence=divergence, beta=0.3, kd_temperature=1.7)
        if dense:
            trainer = BayesKDTrainer(model=model, args=args, data_collator=BayesKDCollator(0), teacher_model=teacher)
            loss = trainer.compute_loss(model, batch)
        else:
            sel = batch["response_mask"]
            with torch.no_grad():
                t = select_rows(model_logits(teacher, batch["input_ids"], batch["attention_mask"]), sel)
            rows = select_rows(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               sel)
            loss = fused_posterior_kd(rows, whitebox_targets(t, t.shape[-1]), None, divergence=divergence, beta=0.3,
                                      temperature=1.7, backend="torch").mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_whitebox_targets_tail_is_exact():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    t = whitebox_targets(logits, 5)
    t.validate()
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(t.to_dense().sum(1), torch.ones(6))
    torch.testing.assert_close(t.tail, 1 - p.topk(5, -1).values.sum(-1))


# ---------------------------------------------------------------------------------------------------- distill

def test_distill_sparse_targets_lowers_kd_and_saves(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenized = setup["tokenized"]
    targets = _write_targets(tmp_path / "t", tokenized, _prior_dists(tokenized))
    out = tmp_path / "student_out"
    s = distill(setup["data"], setup["student"], str(out), targets=targets, max_steps=30, learning_rate=5e-3,
                per_device_train_batch_size=8, logging_steps=5, fused_backend="torch", seed=0,
                warmup_steps=0, lr_scheduler_type="constant")
    assert s["mode"] == "sparse-targets" and s["steps"] == 30
    assert s["final_kd_loss"] < 0.7 * s["first_kd_loss"], s
    assert s["final_ce_loss"] < s["first_ce_loss"]
    assert s["train_tokens_per_second"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_kd_loss"] == s["final_kd_loss"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size
    ids = torch.from_numpy(tokenized.input_ids[0].astype(np.int64))[None]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_distill_sft_mode(setup, tmp_path):
    s = distill(setup["data"], setup["student"], str(tmp_path / "o"), max_steps=4, logging_steps=2,
                per_device_train_batch_size=4)
    assert s["mode"] == "sft" and s["steps"] == 4
    assert s["final_kd_loss"] is None and math.isfinite(s["final_ce_loss"])
    assert (tmp_path / "o" / "summary.json").exists() and s["ce_weight"] == 1.0
    with pytest.raises(ValueError, match="no loss to train on"):  # CE is SFT's only term
        distill(setup["data"], setup["student"], str(tmp_path / "o0"), max_steps=1, ce_weight=0.0)


def test_distill_whitebox_mode(setup, tmp_path):
    s = distill(setup["data"], setup["student"], str(tmp_path / "o"), teacher=setup["teacher"], max_steps=4,
                logging_steps=2, per_device_train_batch_size=4, whitebox_top_k=16, kd_tail="bucket",
                gradient_accumulation_steps=2)
    assert s["mode"] == "white-box" and s["steps"] == 4
    assert math.isfinite(s["final_kd_loss"]) and s["final_kd_loss"] > 0


def test_distill_refuses_targets_and_teacher(setup, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        distill(setup["data"], setup["student"], str(tmp_path / "o"), targets="x", teacher="y")


def test_targets_from_the_prior_pipeline(setup, tmp_path):
    """The shards `bayeskd prior --write-topk` writes are read as they are."""
    from bayeskd.priors.estimate import estimate_prior

    estimate_prior(setup["data"], setup["tok_dir"], out=str(tmp_path / "prior"), order=2, top_k=8, write_topk=True)
    ds = TeacherTargetsDataset(setup["tokenized"], str(tmp_path / "prior" / "topk"))
    batch = BayesKDCollator(setup["tok"].pad_token_id)([ds[i] for i in range(len(ds))])
    assert batch["target_indices"].shape == (int(batch["response_mask"][:, 1:].sum()), 8)
    s = distill(setup["data"], setup["student"], str(tmp_path / "o"), targets=str(tmp_path / "prior" / "topk"),
                max_steps=2, per_device_train_batch_size=4, logging_steps=1, fused_backend="torch")
    assert s["mode"] == "sparse-targets" and math.isfinite(s["final_kd_loss"])


def test_empty_prompt_drops_the_context_free_row(setup):
    """A response starting at position 0 has no context: its first target row is dropped, the rest align."""
    tok = setup["tok"]
    tokenized = tokenize_records([{"prompt": "", "response": "the module returns"},
                                  {"prompt": "a list", "response": "of strings"}], tok)
    p0 = int(tokenized.prompt_lengths[0])  # drop a BOS the tokenizer may add: the response starts at 0
    tokenized.input_ids[0] = tokenized.input_ids[0][p0:]
    tokenized.response_mask[0] = tokenized.response_mask[0][p0:]
    tokenized.prompt_lengths[0] = 0
    ds = TeacherTargetsDataset(tokenized)
    ds._where, ds._dists = np.array([[0, 0], [0, len(tokenized.response_sequences()[0])]]), \
        [SparseDist.cat(_teacher_token_dists(tokenized))]
    items = [ds[0], ds[1]]
    assert items[0]["target_indices"].shape[0] == len(tokenized.input_ids[0]) - 1
    b = BayesKDCollator(tok.pad_token_id)(items)
    sel = b["response_mask"][:, 1:]
    assert torch.equal(b["target_indices"][:, 0].long(), b["input_ids"][:, 1:][sel])


# ---------------------------------------------------------------------------------------------------- online posterior

def _prior_shards(setup, tmp_path):
    """The prior's top-K rows as `bayeskd estimate-prior --write-topk` writes them (context counts included)."""
    from bayeskd.priors.estimate import estimate_prior

    estimate_prior(setup["data"], setup["tok_dir"], out=str(tmp_path / "prior"), order=2, top_k=8, write_topk=True)
    return str(tmp_path / "prior" / "topk")


@pytest.mark.parametrize("mode,extra", [("log_linear", dict(posterior_a=0.7, posterior_b=1.3)),
                                        ("mixture", dict(posterior_w=0.3)),
                                        ("dirichlet", dict(posterior_c=2.0)),
                                        ("log_linear", dict(posterior_evidence=0.5))])
def test_online_posterior_loss_matches_hand_computation(setup, tmp_path, mode, extra):
    from transformers import AutoModelForCausalLM

    from bayeskd.core.combine import combine

    targets = _prior_shards(setup, tmp_path)
    ds = TeacherTargetsDataset(setup["tokenized"], targets)
    batch = BayesKDCollator(setup["tok"].pad_token_id)([ds[i] for i in range(6)])
    assert "target_context_count" in batch  # the prior's counts travel with the rows (Dirichlet needs them)
    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    proxy = AutoModelForCausalLM.from_pretrained(setup["teacher"])
    cfg = BayesKDConfig(output_dir=str(tmp_path / "o"), ce_weight=0.5, kd_weight=2.0, fused_backend="torch",
                        posterior_mode=mode, **extra)
    trainer = BayesKDTrainer(model=model, args=cfg, data_collator=BayesKDCollator(0), train_dataset=ds,
                             proxy_model=proxy)
    model.eval()
    loss = trainer.compute_loss(model, batch)
    assert not proxy.training and not any(p.requires_grad for p in proxy.parameters())

    sel = batch["response_mask"][:, 1:]
    with torch.no_grad():
        rows = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][sel]
        q = proxy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][sel]
    tokens = batch["input_ids"][:, 1:][sel]
    prior = SparseDist(batch["target_indices"], batch["target_logprobs"], batch["target_tail"], rows.shape[-1],
                       extras={"context_count": batch["target_context_count"]})
    ev = extra.get("posterior_evidence", 0.0)
    post = combine(prior, q, mode, a=extra.get("posterior_a", 1.0), b=extra.get("posterior_b", 1.0),
                   c=extra.get("posterior_c", 1.0), w=extra.get("posterior_w", 0.5),
                   teacher_tokens=tokens if ev else None, evidence=ev)
    kd = sparse_kd_loss(rows, post).mean()
    ce = torch.nn.functional.cross_entropy(rows, tokens)
    torch.testing.assert_close(loss.detach(), 0.5 * ce + 2.0 * kd, rtol=1e-5, atol=1e-5)
    # the proxy matters: the prior alone gives another loss
    kd_prior = sparse_kd_loss(rows, combine(prior)).mean()
    assert not torch.allclose(kd, kd_prior)


def test_online_posterior_proxy_wider_vocab_is_sliced(setup, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = setup["tok"]
    targets = _prior_shards(setup, tmp_path)
    ds = TeacherTargetsDataset(setup["tokenized"], targets)
    batch = BayesKDCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    torch.manual_seed(3)
    proxy = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    cfg = BayesKDConfig(output_dir=str(tmp_path / "o"), fused_backend="torch")
    trainer = BayesKDTrainer(model=model, args=cfg, train_dataset=ds, proxy_model=proxy)
    rows = trainer._proxy_rows(batch["input_ids"], batch["attention_mask"], batch["response_mask"], len(tok))
    assert rows.shape == (batch["target_tail"].shape[0], len(tok))
    assert torch.isfinite(trainer.compute_loss(model, batch))


def test_distill_online_posterior_runs(setup, tmp_path):
    targets = _prior_shards(setup, tmp_path)
    s = distill(setup["data"], setup["student"], str(tmp_path / "o"), targets=targets, proxy=setup["teacher"],
                max_steps=4, per_device_train_batch_size=4, logging_steps=1, fused_backend="torch",
                posterior_mode="dirichlet", posterior_c=4.0)
    assert s["mode"] == "online-posterior" and s["steps"] == 4 and s["posterior_mode"] == "dirichlet"
    assert s["proxy"] == setup["teacher"]
    assert all(math.isfinite(h["kd_loss"]) for h in s["log_history"] if "kd_loss" in h)


def test_online_posterior_refusals(setup, tmp_path):
    with pytest.raises(ValueError, match="needs targets"):
        distill(setup["data"], setup["student"], str(tmp_path / "o"), proxy=setup["teacher"])
    with pytest.raises(ValueError, match="posterior_mode"):
        BayesKDConfig(output_dir=str(tmp_path / "o"), posterior_mode="product")
    with pytest.raises(ValueError, match="posterior_w"):
        BayesKDConfig(output_dir=str(tmp_path / "o"), posterior_w=1.5)


@pytest.mark.parametrize("mode", ["targets", "online-dirichlet", "white-box"])
def test_fused_linear_trains_the_same_weights(setup, tmp_path, mode):
    """fused_linear=True (hidden states + lm_head to the loss, no [N, V] student logits) trains the same student
    as the plain path, up to float summation order."""
    from safetensors.torch import load_file

    kw = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3, fused_backend="torch", seed=7,
              logging_steps=1, divergence="jsd", kd_temperature=1.5)
    if mode == "targets":
        kw["targets"] = _prior_shards(setup, tmp_path)
    elif mode == "online-dirichlet":
        kw.update(targets=_prior_shards(setup, tmp_path), proxy=setup["teacher"], posterior_mode="dirichlet",
                  posterior_c=4.0)
    else:
        kw["teacher"] = setup["teacher"]
    plain = distill(setup["data"], setup["student"], str(tmp_path / "plain"), **kw)
    fused = distill(setup["data"], setup["student"], str(tmp_path / "fused"), fused_linear=True, **kw)
    assert fused["steps"] == plain["steps"] == 3
    for a, b in (("first_ce_loss", "first_ce_loss"), ("first_kd_loss", "first_kd_loss")):
        assert fused[a] == pytest.approx(plain[b], rel=1e-5)
    wp, wf = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", "fused"))
    w0 = load_file(setup["student"] + "/model.safetensors")
    assert wp.keys() == wf.keys()
    moved = max(float((wp[k] - w0[k]).abs().max()) for k in wp)
    assert moved > 1e-3  # training changed the weights, so equality below means something
    # Adam divides by sqrt(v): an entry whose gradient is ~0 can move by up to lr from a summation-order
    # difference alone, so the tolerance is 1e-4 (the weights moved by up to 3 x lr = 1.5e-2)
    for k in wp:
        torch.testing.assert_close(wf[k], wp[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("mode", ["targets", "online-dirichlet"])
def test_cut_logits_trains_the_same_weights(setup, tmp_path, monkeypatch, mode):
    """cut_logits=True (the cut-logits Triton kernel, run by the interpreter here) trains the same student as the
    plain path (logits + the PyTorch fused loss), up to float summation order."""
    from safetensors.torch import load_file

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before the kernel module is imported (lazily, by the loss)
    # CE and KD in one pass of the kernel (fused_linear_kd_and_ce): at temperature 1 one softmax, at 1.5 two
    # plain SGD: a weight's difference is then lr x its gradient's difference. Under Adam an entry whose gradient
    # is ~0 moves by up to lr from summation order alone (1/sqrt(v)), which made the comparison depend on the CPU
    kw = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=0.5, optim="sgd", seed=7, logging_steps=1,
              divergence="forward_kl", kd_temperature=1.0 if mode == "targets" else 1.5,
              targets=_prior_shards(setup, tmp_path))
    if mode == "online-dirichlet":
        kw.update(proxy=setup["teacher"], posterior_mode="dirichlet", posterior_c=4.0)
    plain = distill(setup["data"], setup["student"], str(tmp_path / "plain"), fused_backend="torch", **kw)
    cut = distill(setup["data"], setup["student"], str(tmp_path / "cut"), fused_backend="triton", cut_logits=True,
                  **kw)
    assert cut["steps"] == plain["steps"] == 2
    assert (cut["lm_head_loss"], plain["lm_head_loss"]) == ("cut", "logits")
    for key in ("first_ce_loss", "first_kd_loss"):
        assert cut[key] == pytest.approx(plain[key], rel=1e-5)
    wp, wc = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", "cut"))
    w0 = load_file(setup["student"] + "/model.safetensors")
    moved = max(float((wp[k] - w0[k]).abs().max()) for k in wp)
    diff = max(float((wc[k] - wp[k]).abs().max()) for k in wp)
    print(f"{mode}: weights moved up to {moved:.3g}, cut and plain differ by up to {diff:.3g}")
    assert moved > 1e-2  # training moved the weights, so equality below means something
    for k in wp:
        torch.testing.assert_close(wc[k], wp[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("path", ["fused_linear", "cut_logits"])
def test_lm_head_paths_under_bf16_autocast(setup, tmp_path, monkeypatch, path):
    """bf16 mixed precision (fp32 lm_head, bf16 matmuls) through the hidden-states paths: they used to fail there
    (fused_linear) or refuse the mixed dtypes (cut); now they train and start from the plain path's losses."""
    from safetensors.torch import load_file

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kw = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3, seed=7, logging_steps=1, bf16=True,
              targets=_prior_shards(setup, tmp_path),  # no GPU: BayesKDConfig sets use_cpu for bf16 itself
              ce_weight=1.0)  # both terms through the lm_head path (beside KD the default CE weight is 0)
    opts = dict(fused_linear=True, fused_backend="torch") if path == "fused_linear" else dict(cut_logits=True,
                                                                                              fused_backend="triton")
    plain = distill(setup["data"], setup["student"], str(tmp_path / "plain"), fused_backend="torch", **kw)
    other = distill(setup["data"], setup["student"], str(tmp_path / path), **opts, **kw)
    assert other["steps"] == plain["steps"] == 2
    assert other["lm_head_loss"] == ("chunked" if path == "fused_linear" else "cut")
    for key in ("first_ce_loss", "first_kd_loss"):
        assert other[key] == pytest.approx(plain[key], rel=1e-4)
    wp, wo = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", path))
    w0 = load_file(setup["student"] + "/model.safetensors")
    for k in wp:  # bf16 roundings differ between the paths: Adam moves a few near-zero-gradient entries by up to
        # lr per step either way, so: almost every entry equal within 2e-3, against a movement of up to 1e-2
        assert float((wp[k] - w0[k]).abs().max()) > 2e-3 or k.endswith("norm.weight"), k
        assert float(((wo[k] - wp[k]).abs() > 2e-3).float().mean()) < 0.01, k
