"""On-policy distillation in BayesKDTrainer (`onpolicy_fraction`): the student's own samples mixed into the batch,
their targets from a white-box teacher or from the posterior (the prior at the student's contexts x the proxy
online), each checked against a reference computed here with torch."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import save_tiny_llama

WORDS = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object",
         "file", "path", "value", "error", "is", "raised", "if", "not", "found", "."]


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        start = int(rng.integers(0, len(WORDS)))
        resp = [WORDS[(start + j) % len(WORDS)] if rng.random() < 0.7 else str(rng.choice(WORDS))
                for j in range(int(rng.integers(4, 14)))]
        recs.append({"prompt": prompt, "response": " ".join(resp)})
    return recs


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_tokenizer):
    from bayeskd.priors.estimate import estimate_prior

    d = tmp_path_factory.mktemp("onpolicy")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(24, seed=0)))
    student = save_tiny_llama(d / "student", tiny_tokenizer, seed=1)
    teacher = save_tiny_llama(d / "teacher", tiny_tokenizer, seed=2, layers=2)
    sharp = _load(teacher)  # a random init is near uniform (KL ~0.01 between two): a sharp teacher to learn from
    with torch.no_grad():
        sharp.lm_head.weight.mul_(30.0)
    sharp.save_pretrained(teacher)
    proxy = save_tiny_llama(d / "proxy", tiny_tokenizer, seed=3)
    estimate_prior(str(data), student, out=str(d / "prior"), order=2, top_k=8, write_topk=True)
    return SimpleNamespace(dir=d, data=str(data), student=student, teacher=teacher, proxy=proxy,
                           prior=str(d / "prior"), topk=str(d / "prior" / "topk"))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _trainer(lab, tok, tmp_path, *, targets=None, teacher=False, proxy=False, prior=False, scorer=None, **cfg):
    from bayeskd.data import load_teacher_records, tokenize_records
    from bayeskd.distillation.targets import BayesKDCollator, TeacherTargetsDataset
    from bayeskd.distillation.trainer import BayesKDConfig, BayesKDTrainer
    from bayeskd.priors.base import load_prior

    records, _ = load_teacher_records(lab.data)
    ds = TeacherTargetsDataset(tokenize_records(records, tok), targets)
    args = BayesKDConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, save_steps=0,
                         learning_rate=1e-2, seed=0, use_cpu=True, disable_tqdm=True, **cfg)
    tr = BayesKDTrainer(model=_load(lab.student), args=args, data_collator=BayesKDCollator(tok.pad_token_id),
                        train_dataset=ds, processing_class=tok, teacher_model=_load(lab.teacher) if teacher else None,
                        proxy_model=_load(lab.proxy) if proxy else None,
                        prior=load_prior(lab.prior) if prior else None, scorer=scorer)
    batch = BayesKDCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    return tr, batch


def _rows(logits, rmask):
    return logits[:, :-1][rmask[:, 1:]].float()


def _divergence(t_lp: torch.Tensor, s_lp: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-row divergence of dense log-probabilities [M, V] (target t, student s)."""
    if divergence == "forward_kl":
        return (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    return (s_lp.exp() * (s_lp - t_lp)).sum(-1)  # reverse_kl


def test_zero_fraction_is_todays_trainer(lab, tiny_tokenizer, tmp_path):
    """λ = 0: no sampling hook runs and the loss is today's; a batch mixed with no sample changes nothing."""
    plain, batch = _trainer(lab, tiny_tokenizer, tmp_path, teacher=True, ce_weight=0.5)
    zero, _ = _trainer(lab, tiny_tokenizer, tmp_path, teacher=True, ce_weight=0.5, onpolicy_fraction=0.0)
    assert zero.onpolicy is None
    torch.manual_seed(0)
    a = plain.compute_loss(plain.model, batch)
    b = zero.compute_loss(zero.model, batch)
    assert torch.equal(a, b)
    # trained a few steps: the same weights, bit for bit
    for tr in (plain, zero):
        tr.args.max_steps = 2
        tr.train()
    for (n, p), (_, q) in zip(plain.model.named_parameters(), zero.model.named_parameters()):
        assert torch.equal(p, q), n
    # an on-policy trainer whose draw replaces no row hands the batch on untouched
    tiny, _ = _trainer(lab, tiny_tokenizer, tmp_path, teacher=True, onpolicy_fraction=1e-9)
    assert tiny.mix_onpolicy(batch, step=0) is batch


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_whitebox_onpolicy_loss_is_kd_at_the_students_samples(lab, tiny_tokenizer, tmp_path, divergence):
    """λ = 1, white-box: every sequence is the student's sample for the same prompt, and the loss is the KD
    against the teacher's logits at the sampled tokens only (ce_weight 1: no CE on the samples)."""
    from bayeskd.distillation.onpolicy import prompt_lengths

    tr, batch = _trainer(lab, tiny_tokenizer, tmp_path, teacher=True, onpolicy_fraction=1.0, ce_weight=1.0,
                         divergence=divergence, onpolicy_max_new_tokens=12)
    mixed = tr.mix_onpolicy(batch, step=0)
    assert mixed["onpolicy_mask"].all()
    plen, new_plen = prompt_lengths(batch), prompt_lengths(mixed)
    assert torch.equal(plen, new_plen)
    for j in range(4):  # the prompt kept, a response of the student's own
        p = int(plen[j])
        assert torch.equal(mixed["input_ids"][j, :p], batch["input_ids"][j, :p])
        n = int(mixed["attention_mask"][j].sum())
        assert 1 <= n - p <= 12 and bool(mixed["response_mask"][j, p:n].all())
    assert not torch.equal(mixed["input_ids"], batch["input_ids"])
    # the same step samples the same, the Trainer's RNG untouched; the next step samples otherwise
    rng = torch.get_rng_state()
    again = tr.mix_onpolicy(batch, step=0)
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.equal(again["input_ids"], mixed["input_ids"])
    assert not torch.equal(tr.mix_onpolicy(batch, step=1)["input_ids"], mixed["input_ids"])

    loss = tr.compute_loss(tr.model, mixed)
    with torch.no_grad():
        s = _rows(tr.model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"]).logits,
                  mixed["response_mask"])
        t = _rows(tr.teacher_model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"]).logits,
                  mixed["response_mask"])
    ref = _divergence(torch.log_softmax(t, -1), torch.log_softmax(s, -1), divergence).mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("fused_linear", [False, True])
def test_half_onpolicy_mixes_and_keeps_ce_on_teacher_rows(lab, tiny_tokenizer, tmp_path, fused_linear):
    """λ = 0.5: half the sequences sampled; CE over the teacher's rows only, counted over all rows (also from the
    hidden states, fused_linear); the step's token count is the mixed batches'."""
    tr, batch = _trainer(lab, tiny_tokenizer, tmp_path, teacher=True, onpolicy_fraction=0.5, ce_weight=1.0,
                         kd_weight=0.0, onpolicy_max_new_tokens=8, fused_linear=fused_linear)
    tr.state.global_step = 3
    (mixed,), n_items = tr.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert int(n_items) == int(mixed["response_mask"][:, 1:].sum())
    assert torch.equal(mixed["input_ids"], tr.mix_onpolicy(batch, step=3)["input_ids"])
    on = mixed["onpolicy_mask"]
    assert int(on.sum()) == 2
    for j in torch.nonzero(~on).flatten().tolist():  # the teacher's sequences untouched
        n = int(batch["attention_mask"][j].sum())
        assert torch.equal(mixed["input_ids"][j, :n], batch["input_ids"][j, :n])
        assert torch.equal(mixed["response_mask"][j, :n], batch["response_mask"][j, :n])
    loss = tr.compute_loss(tr.model, mixed)
    with torch.no_grad():
        s = _rows(tr.model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"]).logits,
                  mixed["response_mask"])
    tokens = mixed["input_ids"][:, 1:][mixed["response_mask"][:, 1:]]
    teacher_row = (~on)[:, None].expand(-1, mixed["input_ids"].shape[1] - 1)[mixed["response_mask"][:, 1:]]
    ce = torch.nn.functional.cross_entropy(s, tokens, reduction="none")
    assert float(loss.detach()) == pytest.approx(float(ce[teacher_row].sum() / len(ce)), rel=1e-5)


def test_posterior_targets_at_the_students_samples(lab, tiny_tokenizer, tmp_path):
    """onpolicy_targets='posterior': the student's rows get the prior's top-K at their contexts, and the loss is
    the KD against prior x proxy (`bayeskd.core.combine.combine`, online: the proxy's dense logits)."""
    from bayeskd.core.combine import combine
    from bayeskd.core.sparse import SparseDist
    from bayeskd.distillation.onpolicy import prompt_lengths
    from bayeskd.priors.base import load_prior

    tr, batch = _trainer(lab, tiny_tokenizer, tmp_path, targets=lab.topk, proxy=True, prior=True,
                         onpolicy_fraction=0.5, onpolicy_max_new_tokens=10, posterior_a=0.7)
    assert tr.onpolicy == "posterior"
    mixed = tr.mix_onpolicy(batch, step=0)
    on = mixed["onpolicy_mask"]
    assert 0 < int(on.sum()) < 4
    prior = load_prior(lab.prior)
    # expected target rows, sequence by sequence: the student's from the prior, the teacher's as they were
    old_n = batch["response_mask"][:, 1:].sum(1).tolist()
    old_at = np.concatenate([[0], np.cumsum(old_n)])
    plen = prompt_lengths(mixed)
    want_idx, want_lp, want_tail = [], [], []
    for j in range(4):
        if on[j]:
            p, n = int(plen[j]), int(mixed["attention_mask"][j].sum())
            rows = prior.topk([mixed["input_ids"][j, p:n].numpy()], 8,
                              contexts=[mixed["input_ids"][j, :p].numpy()])
            want_idx.append(rows.indices), want_lp.append(rows.logprobs), want_tail.append(rows.tail)
        else:
            sl = slice(int(old_at[j]), int(old_at[j + 1]))
            want_idx.append(batch["target_indices"][sl]), want_lp.append(batch["target_logprobs"][sl])
            want_tail.append(batch["target_tail"][sl])
    assert torch.equal(mixed["target_indices"].long(), torch.cat(want_idx).long())
    assert torch.allclose(mixed["target_logprobs"].float(), torch.cat(want_lp).float())
    assert torch.allclose(mixed["target_tail"].float(), torch.cat(want_tail).float())

    loss = tr.compute_loss(tr.model, mixed)
    ids, att, rm = mixed["input_ids"], mixed["attention_mask"], mixed["response_mask"]
    with torch.no_grad():
        s_lp = torch.log_softmax(_rows(tr.model(input_ids=ids, attention_mask=att).logits, rm), -1)
        q = _rows(tr.proxy_model(input_ids=ids, attention_mask=att).logits, rm)
    V = s_lp.shape[-1]
    prior_rows = SparseDist(mixed["target_indices"], mixed["target_logprobs"].float(), mixed["target_tail"].float(),
                            V)
    post = combine(prior_rows, q[:, :V], mode="log_linear", a=0.7, b=1.0)
    valid = post.indices >= 0
    p_lp = post.logprobs.masked_fill(~valid, 0.0)
    s_at = s_lp.gather(1, post.indices.long().clamp(min=0))
    kl = torch.where(valid, p_lp.exp() * (p_lp - s_at), torch.zeros_like(p_lp)).sum(1)
    s_tail = (1 - torch.where(valid, s_at.exp(), torch.zeros_like(s_at)).sum(1)).clamp(min=1e-30)
    t = post.tail.float()
    kl = kl + torch.where(t > 0, t * (t.clamp(min=1e-30).log() - s_tail.log()), torch.zeros_like(t))
    assert float(loss.detach()) == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-5)


def test_posterior_onpolicy_through_the_cli(lab, tmp_path):
    """`distill --targets PRIOR/topk --proxy P --prior PRIOR --onpolicy-fraction 0.5`: trains, says so."""
    from bayeskd.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["distill", "--data", lab.data, "--student", lab.student, "--targets", lab.topk,
                                  "--proxy", lab.proxy, "--prior", lab.prior, "--out", str(out),
                                  "--onpolicy-fraction", "0.5", "--onpolicy-max-new-tokens", "6", "--max-steps", "2",
                                  "--per-device-train-batch-size", "4", "--save-steps", "0", "--use-cpu"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "online-posterior" and s["steps"] == 2
    assert s["onpolicy"]["targets"] == "posterior" and s["onpolicy"]["sequences"] > 0
    assert s["onpolicy"]["sampled_tokens"] > 0 and np.isfinite(s["train_loss"])


def _own_kl(student, teacher, prompts, seed: int, tok) -> float:
    """Mean per-token KL(teacher || student) on the student's own samples (fixed seed)."""
    from bayeskd.distillation.onpolicy import sample_responses
    from bayeskd.teacher_forcing import pad_prompt_response

    resp = sample_responses(student, prompts, temperature=1.0, max_new_tokens=[12] * len(prompts),
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=seed)
    b = pad_prompt_response([p.tolist() for p in prompts], [r.tolist() for r in resp], tok.pad_token_id)
    with torch.no_grad():
        s = torch.log_softmax(_rows(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                    b["response_mask"]), -1)
        t = torch.log_softmax(_rows(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                    b["response_mask"]), -1)
    return float(_divergence(t, s, "forward_kl").mean())


def test_training_half_onpolicy_lowers_kl_on_own_samples(lab, tiny_tokenizer, tmp_path):
    from bayeskd.distillation.onpolicy import prompt_lengths
    from bayeskd.distillation.trainer import distill

    out = tmp_path / "run"
    s = distill(lab.data, lab.student, str(out), teacher=lab.teacher, onpolicy_fraction=0.5,
                onpolicy_max_new_tokens=12, max_steps=30, per_device_train_batch_size=4, learning_rate=3e-2,
                save_steps=0, seed=0, use_cpu=True, disable_tqdm=True)
    assert s["onpolicy"]["targets"] == "teacher" and s["onpolicy"]["sequences"] > 0
    _, batch = _trainer(lab, tiny_tokenizer, tmp_path)
    plen = prompt_lengths(batch)
    prompts = [batch["input_ids"][j, :int(plen[j])] for j in range(4)]
    teacher = _load(lab.teacher).eval()
    before = np.mean([_own_kl(_load(lab.student).eval(), teacher, prompts, k, tiny_tokenizer) for k in range(4)])
    after = np.mean([_own_kl(_load(str(out)).eval(), teacher, prompts, k, tiny_tokenizer) for k in range(4)])
    print(f"KL on own samples: {before:.4f} -> {after:.4f}")
    assert after < before - 0.5


def test_resume_samples_the_same_next_step(lab, tiny_tokenizer, tmp_path, monkeypatch):
    """A run resumed from checkpoint-2 samples step 3 exactly as the uninterrupted run did, and ends with its
    weights."""
    from bayeskd.distillation.trainer import BayesKDTrainer, distill

    seen: dict[str, dict[int, torch.Tensor]] = {"a": {}, "b": {}}
    run = {"name": "a"}
    start = BayesKDTrainer._start_mix  # (each micro-batch's sampling; the teacher's scores come after)

    def record(self, inputs, step, micro=0):
        out, pending = start(self, inputs, step, micro)
        seen[run["name"]][step] = out["input_ids"].clone()
        return out, pending

    monkeypatch.setattr(BayesKDTrainer, "_start_mix", record)
    out = tmp_path / "run"
    kw = dict(teacher=lab.teacher, onpolicy_fraction=0.5, onpolicy_max_new_tokens=8, max_steps=3,
              per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2, seed=0, use_cpu=True,
              disable_tqdm=True)
    distill(lab.data, lab.student, str(out), **kw)
    weights = (out / "model.safetensors").read_bytes()
    run["name"] = "b"
    distill(lab.data, lab.student, str(out), resume_from_checkpoint=str(out / "checkpoint-2"), **kw)
    assert sorted(seen["a"]) == [0, 1, 2] and sorted(seen["b"]) == [2]
    assert torch.equal(seen["a"][2], seen["b"][2])
    assert (out / "model.safetensors").read_bytes() == weights


def test_bad_onpolicy_input(lab, tiny_tokenizer, tmp_path):
    from bayeskd.cli import main
    from bayeskd.distillation.trainer import BayesKDConfig, distill

    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="onpolicy_fraction must be in"):
            BayesKDConfig(output_dir=str(tmp_path), onpolicy_fraction=bad)
    common = dict(onpolicy_fraction=0.5, max_steps=1, save_steps=0, use_cpu=True)
    with pytest.raises(ValueError, match="needs the proxy .* and the prior itself"):  # posterior without a prior
        distill(lab.data, lab.student, str(tmp_path / "a"), targets=lab.topk, proxy=lab.proxy, **common)
    with pytest.raises(ValueError, match="needs the proxy"):  # posterior without a proxy
        distill(lab.data, lab.student, str(tmp_path / "b"), targets=lab.topk, onpolicy_targets="posterior",
                **common)
    with pytest.raises(ValueError, match="needs targets at the student's samples"):  # SFT has none there
        distill(lab.data, lab.student, str(tmp_path / "c"), **common)
    with pytest.raises(ValueError, match="needs a white-box teacher"):
        distill(lab.data, lab.student, str(tmp_path / "d"), targets=lab.topk, proxy=lab.proxy, prior=lab.prior,
                onpolicy_targets="teacher", **{k: v for k, v in common.items()})
    with pytest.raises(ValueError, match="prior is read by on-policy posterior targets only"):
        distill(lab.data, lab.student, str(tmp_path / "e"), targets=lab.topk, proxy=lab.proxy, prior=lab.prior,
                max_steps=1, save_steps=0, use_cpu=True)
    # the options come from the config: offered by --help, bounded on the command line
    r = CliRunner().invoke(main, ["distill", "--help"])
    assert r.exit_code == 0 and "--onpolicy-fraction" in r.output and "--prior" in r.output
    assert "--onpolicy-targets" in r.output and "--onpolicy-max-new-tokens" in r.output
    r = CliRunner().invoke(main, ["distill", "--data", lab.data, "--student", lab.student, "--out",
                                  str(tmp_path / "f"), "--onpolicy-fraction", "2"])
    assert r.exit_code == 2 and "onpolicy-fraction" in r.output


# ---------------------------------------------------------------------------------------------------- scored targets

@pytest.fixture(scope="module")
def served(lab, tiny_tokenizer):
    """serve-teacher (loopback, a free port, stopped at the end) of a moderately sharp teacher, with the texts
    asked at /v1/completions (the probe's included: `_scoring` leaves it out)."""
    from bayeskd.teachers.hf import HFTeacher
    from bayeskd.teachers.server import create_app, running_app

    path = save_tiny_llama(lab.dir / "scoring-teacher", tiny_tokenizer, seed=5, layers=2)
    model = _load(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    model.save_pretrained(path)
    app = create_app(HFTeacher(path, device="cpu"), "teacher")
    asked: list[str] = []

    @app.middleware("http")
    async def count(request, call_next):
        if request.url.path == "/v1/completions":
            asked.append(json.loads(await request.body())["prompt"])
        return await call_next(request)

    with running_app(app) as url:
        yield SimpleNamespace(url=f"{url}/v1", asked=asked, path=path, model=_load(path).eval())


def _scoring(asked) -> int:
    from bayeskd.teachers.score import PROBE_TEXT

    return sum(t != PROBE_TEXT for t in asked)


def _scored_trainer(lab, tok, tmp_path, served, top_k: int, **cfg):
    from bayeskd.distillation.onpolicy_scores import SampleScorer

    scorer = SampleScorer(served.url, "teacher", tok, tmp_path / "scores.jsonl", top_k=top_k)
    return _trainer(lab, tok, tmp_path, targets=lab.topk, proxy=True, prior=True, scorer=scorer, **cfg)


def _student_targets(tr, mixed):
    """The conditioned targets of the student's rows (as compute_loss forms them), the teacher's log-softmax at
    those rows, and which rows hold exact evidence."""
    from bayeskd.core.sparse import SparseDist
    from bayeskd.distillation.onpolicy import SCORED_KEYS, scored_targets

    ids, att, rm = mixed["input_ids"], mixed["attention_mask"], mixed["response_mask"]
    grid = mixed["onpolicy_mask"][:, None].expand(-1, ids.shape[1] - 1)
    s_rows = grid[rm[:, 1:]]
    with torch.no_grad():
        q = _rows(tr.proxy_model(input_ids=ids, attention_mask=att).logits, rm)
    V = q.shape[-1]
    prior = SparseDist(mixed["target_indices"], mixed["target_logprobs"].float(), mixed["target_tail"].float(), V)
    ev = {k: mixed[k] for k in SCORED_KEYS}
    cond = scored_targets(prior[s_rows], q[s_rows], ev, mode="log_linear", a=1.0, b=1.0)
    exact = (ev["onpolicy_ev_indices"] >= 0).any(1) & ~ev["onpolicy_ev_lower"].any(1)
    return cond, ev, exact, s_rows


def _teacher_lp(served, mixed, s_rows):
    with torch.no_grad():
        t = _rows(served.model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"]).logits,
                  mixed["response_mask"])
    return torch.log_softmax(t, -1)[s_rows]


def test_scored_targets_hold_the_teachers_top20(lab, tiny_tokenizer, tmp_path, served):
    """λ = 1, k = 20: the student's rows are the posterior conditioned on the teacher's revealed top-20, which the
    target holds exactly (the teacher's log-softmax, 1e-5) where the student's tokens are the teacher's; the loss is
    the KD against those targets."""
    tr, batch = _scored_trainer(lab, tiny_tokenizer, tmp_path, served, 20, onpolicy_fraction=1.0,
                                onpolicy_max_new_tokens=10)
    assert tr.onpolicy == "scored"
    before = _scoring(served.asked)
    mixed = tr.mix_onpolicy(batch, step=0)
    assert mixed["onpolicy_mask"].all() and _scoring(served.asked) - before == 4
    st = tr.scorer.stats
    assert st["requests"] == 4 and st["scored_tokens"] > 0 and st["failed"] == 0
    cond, ev, exact, s_rows = _student_targets(tr, mixed)
    t_lp = _teacher_lp(served, mixed, s_rows)
    assert int(exact.sum()) >= 4, exact
    checked = 0
    for r in torch.nonzero(exact).flatten().tolist():
        top_v, top_i = t_lp[r].topk(20)
        got = dict(zip(cond.indices[r].tolist(), cond.logprobs[r].tolist()))
        assert set(top_i.tolist()) <= set(got)
        assert [got[i] for i in top_i.tolist()] == pytest.approx(top_v.tolist(), abs=1e-5)
        rest = [v for i, v in got.items() if i >= 0 and i not in set(top_i.tolist())]
        assert all(v <= float(top_v[-1]) + 1e-5 for v in rest)  # nothing unrevealed above the list
        checked += 1
    assert checked == int(exact.sum())
    # rows without evidence (the EOS, past a non-canonical token) have the posterior's entries only
    loss = tr.compute_loss(tr.model, mixed)
    with torch.no_grad():
        s_lp = torch.log_softmax(_rows(tr.model(input_ids=mixed["input_ids"],
                                                attention_mask=mixed["attention_mask"]).logits,
                                       mixed["response_mask"]), -1)
    valid = cond.indices >= 0
    p_lp = cond.logprobs.float().masked_fill(~valid, 0.0)
    s_at = s_lp.gather(1, cond.indices.long().clamp(min=0))
    kl = torch.where(valid, p_lp.exp() * (p_lp - s_at), torch.zeros_like(p_lp)).sum(1)
    s_tail = (1 - torch.where(valid, s_at.exp(), torch.zeros_like(s_at)).sum(1)).clamp(min=1e-30)
    t = cond.tail.float()
    kl = kl + torch.where(t > 0, t * (t.clamp(min=1e-30).log() - s_tail.log()), torch.zeros_like(t))
    assert float(loss.detach()) == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-5)
    # the same samples again: answered by the cache, nothing asked
    again = tr.mix_onpolicy(batch, step=0)
    assert _scoring(served.asked) - before == 4 and tr.scorer.stats["cached"] == 4
    assert torch.equal(again["onpolicy_ev_indices"], mixed["onpolicy_ev_indices"])


@pytest.mark.parametrize("fused_linear", [False, True])
def test_scored_k0_gives_the_sampled_tokens_logprob(lab, tiny_tokenizer, tmp_path, served, fused_linear):
    """k = 0 (the per-token reverse-KL recipe's evidence): the sampled token's target log-probability is the
    teacher's; at λ = 0.5 the teacher's rows keep the fused online posterior (loss finite, from the hidden states
    too)."""
    tr, batch = _scored_trainer(lab, tiny_tokenizer, tmp_path, served, 0, onpolicy_fraction=0.5,
                                onpolicy_max_new_tokens=10, fused_linear=fused_linear, ce_weight=0.5)
    mixed = tr.mix_onpolicy(batch, step=0)
    assert 0 < int(mixed["onpolicy_mask"].sum()) < 4
    cond, ev, exact, s_rows = _student_targets(tr, mixed)
    assert ev["onpolicy_ev_indices"].shape[1] == 1 and int(exact.sum()) >= 2
    t_lp = _teacher_lp(served, mixed, s_rows)
    sampled = mixed["input_ids"][:, 1:][mixed["response_mask"][:, 1:]][s_rows]
    same = 0
    for r in torch.nonzero(exact).flatten().tolist():
        # the teacher's token there: the sampled one, or (at the first token the teacher splits otherwise, where the
        # contexts are still one sequence) the teacher's own longer or shorter token
        y = int(ev["onpolicy_ev_indices"][r, 0])
        same += y == int(sampled[r])
        at = cond.indices[r].tolist().index(y)
        assert float(cond.logprobs[r, at]) == pytest.approx(float(t_lp[r, y]), abs=1e-5)
    assert same >= 2
    loss = tr.compute_loss(tr.model, mixed)
    assert torch.isfinite(loss) and loss.requires_grad


def test_scored_run_resumes_without_asking_again(lab, tiny_tokenizer, tmp_path, served):
    """distill with --teacher-url: requests and scored tokens in the summary, the cache in the output directory; a
    run resumed from checkpoint-2 asks no sample twice (zero scoring requests) and ends with the same weights."""
    from bayeskd.distillation.trainer import distill

    out = tmp_path / "run"
    kw = dict(targets=lab.topk, proxy=lab.proxy, prior=lab.prior, teacher_url=served.url, teacher_model="teacher",
              onpolicy_fraction=0.5, onpolicy_score_top_k=5, onpolicy_max_new_tokens=8, max_steps=3,
              per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2, seed=0, use_cpu=True,
              disable_tqdm=True)
    before = _scoring(served.asked)
    s = distill(lab.data, lab.student, str(out), **kw)
    sc = s["onpolicy"]["scoring"]
    assert s["onpolicy"]["targets"] == "scored" and sc["requests"] == s["onpolicy"]["sequences"] == 6
    assert _scoring(served.asked) - before == 6 and sc["scored_tokens"] > 0 and sc["top_k"] == 5
    assert len((out / "onpolicy_scores.jsonl").read_text().splitlines()) == 6
    weights = (out / "model.safetensors").read_bytes()
    before = _scoring(served.asked)
    again = distill(lab.data, lab.student, str(out), resume_from_checkpoint=str(out / "checkpoint-2"), **kw)
    assert _scoring(served.asked) == before  # the probe only
    assert again["onpolicy"]["scoring"]["requests"] == 0 and again["onpolicy"]["scoring"]["cached"] == 2
    assert (out / "model.safetensors").read_bytes() == weights


def test_scoring_overlaps_the_steps_sampling(lab, tmp_path, served, monkeypatch):
    """With 2 micro-batches a step, both are sampled and sent before the first one's scores are collected (the
    server answers while the trainer samples), and the run ends with the weights of a run that waits for every
    answer at once."""
    from bayeskd.distillation.onpolicy_scores import PendingEvidence, SampleScorer
    from bayeskd.distillation.trainer import distill

    events: list[str] = []
    submit, result = SampleScorer.submit, PendingEvidence.result
    monkeypatch.setattr(SampleScorer, "submit", lambda self, p, r: events.append("submit") or submit(self, p, r))
    monkeypatch.setattr(PendingEvidence, "result", lambda self: events.append("result") or result(self))
    kw = dict(targets=lab.topk, proxy=lab.proxy, prior=lab.prior, teacher_url=served.url, teacher_model="teacher",
              onpolicy_fraction=0.5, onpolicy_score_top_k=5, onpolicy_max_new_tokens=8, max_steps=2,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, save_steps=0,
              seed=0, use_cpu=True, disable_tqdm=True)
    overlapped = distill(lab.data, lab.student, str(tmp_path / "overlap"), **kw)
    assert events == ["submit", "submit", "result", "result"] * 2
    assert overlapped["onpolicy"]["scoring"]["requests"] > 0

    def waiting(self, p, r):  # every answer in before the trainer goes on
        pending = submit(self, p, r)
        if pending.future is not None:
            pending.future.result()
        return pending

    monkeypatch.setattr(SampleScorer, "submit", waiting)
    distill(lab.data, lab.student, str(tmp_path / "waiting"), **kw)
    assert ((tmp_path / "overlap" / "model.safetensors").read_bytes()
            == (tmp_path / "waiting" / "model.safetensors").read_bytes())


def test_scored_training_through_server_faults_is_the_fault_free_run(lab, tmp_path):
    """serve-teacher --fail-rate 0.3 --drop-rate 0.1: every sample scored once (retried through the faults), the
    score cache holds the same entries and the student the same weights as a fault-free run."""
    from bayeskd.distillation.trainer import distill
    from bayeskd.teachers.server import running_server

    kw = dict(targets=lab.topk, proxy=lab.proxy, prior=lab.prior, teacher_model="teacher", onpolicy_fraction=1.0,
              onpolicy_score_top_k=3, onpolicy_max_new_tokens=6, max_steps=3, per_device_train_batch_size=4,
              learning_rate=1e-2, save_steps=0, seed=0, use_cpu=True, disable_tqdm=True)
    runs = {}
    # (fault seed 8: its first requests are refused and dropped, so a run this short meets both)
    for name, faults in (("clean", {}), ("faulty", dict(fail_rate=0.3, drop_rate=0.1, fault_seed=8))):
        with running_server(lab.teacher, name="teacher", **faults) as url:
            runs[name] = distill(lab.data, lab.student, str(tmp_path / name), teacher_url=url, **kw)
    clean, faulty = (runs[n]["onpolicy"]["scoring"] for n in ("clean", "faulty"))
    assert clean["retries"] == 0 and faulty["retries"] > 0 and faulty["failed"] == clean["failed"] == 0
    assert faulty["requests"] == clean["requests"] == 12 and faulty["scored_tokens"] == clean["scored_tokens"]

    def cache(name):  # appended in completion order: compared by key
        lines = (tmp_path / name / "onpolicy_scores.jsonl").read_text().splitlines()
        return {json.loads(x)["key"]: x for x in lines}

    assert cache("faulty") == cache("clean") and len(cache("clean")) == 12
    assert ((tmp_path / "faulty" / "model.safetensors").read_bytes()
            == (tmp_path / "clean" / "model.safetensors").read_bytes())


def test_scoring_budget_falls_back_to_posterior_targets(lab, tiny_tokenizer, tmp_path, served):
    """onpolicy_score_budget: once spent, samples not yet scored get the plain posterior (no evidence rows),
    counted; the run goes on."""
    from bayeskd.distillation.onpolicy_scores import SampleScorer
    from bayeskd.distillation.trainer import distill

    out = tmp_path / "run"
    before = _scoring(served.asked)
    s = distill(lab.data, lab.student, str(out), targets=lab.topk, proxy=lab.proxy, prior=lab.prior,
                teacher_url=served.url, teacher_model="teacher", onpolicy_fraction=0.5, onpolicy_score_budget=3,
                onpolicy_max_new_tokens=6, max_steps=3, per_device_train_batch_size=4, save_steps=0, seed=0,
                use_cpu=True, disable_tqdm=True)
    sc = s["onpolicy"]["scoring"]
    assert sc["requests"] == 3 and sc["over_budget"] == 3 and sc["budget"] == 3 and np.isfinite(s["train_loss"])
    assert _scoring(served.asked) - before == 3
    # over budget: no evidence at the samples' rows, so their targets are the posterior's
    tr, batch = _scored_trainer(lab, tiny_tokenizer, tmp_path, served, 20, onpolicy_fraction=1.0,
                                onpolicy_max_new_tokens=6)
    tr.scorer = SampleScorer(served.url, "teacher", tiny_tokenizer, tmp_path / "none.jsonl", budget=0)
    mixed = tr.mix_onpolicy(batch, step=0)
    assert not (mixed["onpolicy_ev_indices"] >= 0).any() and tr.scorer.stats["over_budget"] == 4
    assert _scoring(served.asked) - before == 3


def test_a_server_that_cannot_score_is_refused_at_start(lab, tmp_path):
    from test_score import _stub_app

    from bayeskd.cli import main
    from bayeskd.distillation.trainer import distill
    from bayeskd.teachers.score import ScoreError
    from bayeskd.teachers.server import running_app

    app, asked = _stub_app("no-logprobs")
    with running_app(app) as url:
        with pytest.raises(ScoreError, match="cannot score the student's samples .*no logprobs") as e:
            distill(lab.data, lab.student, str(tmp_path / "a"), targets=lab.topk, proxy=lab.proxy, prior=lab.prior,
                    teacher_url=f"{url}/v1", teacher_model="stub", onpolicy_fraction=0.5, max_steps=1,
                    save_steps=0, use_cpu=True)
        assert "\n" not in str(e.value) and len(asked) == 1
        assert not (tmp_path / "a" / "model.safetensors").exists()
        r = CliRunner().invoke(main, ["distill", "--data", lab.data, "--student", lab.student, "--targets", lab.topk,
                                      "--proxy", lab.proxy, "--prior", lab.prior, "--teacher-url", f"{url}/v1",
                                      "--teacher-model", "stub", "--out", str(tmp_path / "b"),
                                      "--onpolicy-fraction", "0.5", "--max-steps", "1", "--use-cpu"])
        assert r.exit_code == 1 and "Error: the server at" in r.output and "Traceback" not in r.output
        assert [x for x in r.output.splitlines() if "Error" in x or "error" in x] == [r.output.strip()]
    with pytest.raises(ValueError, match="needs the teacher server"):
        distill(lab.data, lab.student, str(tmp_path / "c"), targets=lab.topk, proxy=lab.proxy, prior=lab.prior,
                onpolicy_targets="scored", onpolicy_fraction=0.5, max_steps=1, save_steps=0, use_cpu=True)
    with pytest.raises(ValueError, match="both teacher_url and teacher_model"):
        distill(lab.data, lab.student, str(tmp_path / "d"), targets=lab.topk, proxy=lab.proxy, prior=lab.prior,
                teacher_url="http://127.0.0.1:9/v1", onpolicy_fraction=0.5, max_steps=1, use_cpu=True)
    r = CliRunner().invoke(main, ["distill", "--help"])
    assert "--teacher-url" in r.output and "--onpolicy-score-top-k" in r.output
    assert "--onpolicy-score-budget" in r.output
