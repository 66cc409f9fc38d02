"""GAD: the losses against hand-computed cases, the discriminator's scoring and persistence, one step end to end,
D learning a separable toy case, the warm-up -> adversarial resume path, and the CLI."""
import json
import math
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bayeskd.distillation.gad import GADConfig, gad
from bayeskd.distillation.gad_parts import (Discriminator, bradley_terry_loss, discriminator_accuracy,
                                            group_advantages, grpo_loss)
from conftest import save_tiny_llama

WORDS = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]
TINY = dict(group_size=4, batch_prompts=2, max_new_tokens=6, max_prompt_tokens=16, learning_rate=1e-3,
            d_lr=1e-3, seed=0, save_every=1)


def _write_data(path, n=6, response=None, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            r = response or " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
            f.write(json.dumps({"prompt": f"Question {i}: what does it return?", "response": r}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("gad")
    return {"dir": d, "student": save_tiny_llama(d / "student", tiny_tokenizer, seed=0),
            "data": _write_data(d / "teacher.jsonl")}


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------- losses

def test_bradley_terry_loss_and_accuracy_hand_case():
    t = torch.tensor([1.0, 0.0], requires_grad=True)
    s = torch.tensor([[0.0, 1.0], [0.0, -2.0]], requires_grad=True)
    loss = bradley_terry_loss(t, s)
    # differences t - s: [[1, 0], [0, 2]]; -log sigma(d) = log(1 + e^-d); mean over the 2 x 2 pairs
    want = (math.log1p(math.exp(-1)) + 2 * math.log(2) + math.log1p(math.exp(-2))) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # d/dt_0 = -[(1 - sigma(1)) + (1 - sigma(0))] / 4; d/ds_00 = (1 - sigma(1)) / 4
    assert t.grad[0].item() == pytest.approx(-((1 - _sigmoid(1)) + 0.5) / 4, rel=1e-6)
    assert s.grad[0, 0].item() == pytest.approx((1 - _sigmoid(1)) / 4, rel=1e-6)
    assert discriminator_accuracy(t, s) == 0.5  # strict: the tie (0 vs 0) and (0 vs 1) do not count
    with pytest.raises(ValueError, match=r"\[P, n\]"):
        bradley_terry_loss(t, s[:1])


def test_group_advantages_hand_case():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 4.0, 8.0]])
    a = group_advantages(r, eps=0.5)
    # group 0: mean 2, unbiased std 1 -> (r - 2) / 1.5; equal rewards -> 0; group 2: mean 4, std 4 -> (r-4)/4.5
    want = torch.tensor([[-1 / 1.5, 0.0, 1 / 1.5], [0.0, 0.0, 0.0], [-4 / 4.5, 0.0, 4 / 4.5]])
    torch.testing.assert_close(a, want)
    with pytest.raises(ValueError, match="n >= 2"):
        group_advantages(torch.ones(3, 1))


def test_group_advantages_without_std_and_with_teacher_baseline_hand_case():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 8.0]])
    # Dr. GRPO: only the group mean is subtracted
    torch.testing.assert_close(group_advantages(r, scale=False), torch.tensor([[-1.0, 0.0, 1.0], [-4.0, 0.0, 4.0]]))
    # baseline D(teacher) = 3 and 2: r - b, divided by the group's std (1 and 4) + eps
    t = torch.tensor([3.0, 2.0])
    want = torch.tensor([[-2 / 1.5, -1 / 1.5, 0.0], [-2 / 4.5, 2 / 4.5, 6 / 4.5]])
    torch.testing.assert_close(group_advantages(r, eps=0.5, baseline=t), want)
    torch.testing.assert_close(group_advantages(r, baseline=t, scale=False), torch.tensor([[-2.0, -1, 0], [-2, 2, 6]]))
    with pytest.raises(ValueError, match=r"baseline \[P\]"):
        group_advantages(r, baseline=torch.zeros(3))


def test_sft_term_in_the_grpo_step_is_the_teacher_cross_entropy(setup):
    """With zero advantages and no KL the GRPO step's only gradient is sft_coef x the teacher responses' token-mean
    cross-entropy: the same update as a plain SFT step, and its logged value is the cross-entropy by hand."""
    from transformers import AutoModelForCausalLM

    from bayeskd.distillation.gad import _update_generator_grpo, _update_generator_sft

    prompts, teacher = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]]
    samples = [[20, 21], [22], [23, 24, 25], [26]]  # 2 per prompt
    cfg = GADConfig(group_size=2, sft_coef=1.0, kl_coef=0.0, learning_rate=1e-3)
    models = [AutoModelForCausalLM.from_pretrained(setup["student"]).eval() for _ in range(3)]
    with torch.no_grad():  # the cross-entropy by hand: one prompt + response at a time, no padding
        nll = 0.0
        for p, r in zip(prompts, teacher):
            logits = models[2](torch.tensor([p + r])).logits[0].log_softmax(-1)
            nll -= sum(float(logits[len(p) - 1 + j, tok]) for j, tok in enumerate(r))
        want = nll / sum(map(len, teacher))
    opts = [torch.optim.AdamW(m.parameters(), lr=cfg.learning_rate) for m in models[:2]]
    pad = 0
    st = _update_generator_grpo(models[0], None, opts[0], prompts, samples, torch.zeros(2, 2), cfg, pad, "cpu",
                                teacher)
    sft = _update_generator_sft(models[1], opts[1], prompts, teacher, cfg, pad, "cpu")
    assert st["sft_loss"] == pytest.approx(want, rel=1e-5) and sft["sft_loss"] == pytest.approx(want, rel=1e-5)
    a, b = dict(models[0].named_parameters()), dict(models[1].named_parameters())
    assert all(torch.allclose(a[k], b[k], atol=1e-7, rtol=0) for k in a)
    assert any(not torch.equal(a[k], p) for k, p in models[2].named_parameters())  # the step did move the model
    half = GADConfig(group_size=2, sft_coef=0.5, kl_coef=0.0)
    none = GADConfig(group_size=2, kl_coef=0.0, sft_coef=0.0)
    m = AutoModelForCausalLM.from_pretrained(setup["student"]).eval()
    grads = []
    for c in (half, none):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: read the gradient, keep the weights
        _update_generator_grpo(m, None, opt, prompts, samples, torch.zeros(2, 2), c, pad, "cpu", teacher)
        grads.append(torch.cat([q.grad.flatten() for q in m.parameters() if q.grad is not None] or [torch.zeros(1)]))
    assert grads[0].abs().max() > 0 and grads[1].abs().max() == 0  # the term is the only gradient, and it is scaled


def test_grpo_loss_clip_hand_case():
    # four one-token sequences, old log-prob 0: ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1
    lp = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]])).requires_grad_(True)
    old = torch.zeros(4, 1)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = grpo_loss(lp, old, adv, torch.ones(4, 1, dtype=torch.bool), clip=0.2)
    # per sequence -min(rho A, clip(rho) A): -1.2 (clipped), -0.5, +0.8 (clipped), +1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4, rel=1e-6)
    assert stats["clip_frac"] == 0.5
    loss.backward()
    # clipped terms are constant: zero gradient; otherwise d(-rho A)/d lp = -rho A, over 4 sequences
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0], [-0.5 / 4], [0.0], [1.5 / 4]]))


def test_grpo_loss_kl_and_mask_hand_case():
    # one sequence of 3 tokens, the last masked; ratio 1 everywhere, advantage 2
    lp = torch.zeros(1, 3, requires_grad=True)
    ref = torch.tensor([[math.log(2.0), 0.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = grpo_loss(lp, lp.detach(), torch.tensor([2.0]), mask, ref_logprobs=ref, kl_coef=0.1)
    k3 = 2.0 - math.log(2.0) - 1.0  # exp(d) - d - 1 at d = log 2; 0 at d = 0; the masked token is ignored
    assert stats["kl"] == pytest.approx(k3 / 2, rel=1e-6)
    assert loss.item() == pytest.approx(-2.0 + 0.1 * k3 / 2, rel=1e-6)
    loss.backward()
    # d/dlp of -rho A = -2 per token; of k3 = 1 - exp(d): 1 - 2 = -1 at token 0; /2 tokens
    torch.testing.assert_close(lp.grad, torch.tensor([[(-2.0 - 0.1) / 2, -2.0 / 2, 0.0]]))


def test_checkpoint_older_than_a_setting_resumes_with_its_default(tmp_path):
    from bayeskd.distillation.gad import ADDED_LATER, STATE_VERSION, _check_resume

    want = {**GADConfig().settings(), **ADDED_LATER}  # what such a checkpoint ran with
    old = {k: v for k, v in want.items() if k not in ADDED_LATER}  # saved before these settings existed
    _check_resume(tmp_path, {"version": STATE_VERSION, "config": old}, want)
    lr = {**{k: v for k, v in old.items() if k != "learning_rate"}, "lr": old["learning_rate"]}  # the old name
    _check_resume(tmp_path, {"version": STATE_VERSION, "config": lr}, want)
    with pytest.raises(ValueError, match="sft_coef: 0.0 there, 1.0 now"):  # today's default is not what it ran
        _check_resume(tmp_path, {"version": STATE_VERSION, "config": old}, {**want, "sft_coef": 1.0})


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="group_size"):
        GADConfig(group_size=1)
    with pytest.raises(ValueError, match="warmup_d_only_steps"):
        GADConfig(warmup_steps=1, warmup_d_only_steps=2)
    with pytest.raises(ValueError, match="clip"):
        GADConfig(clip=1.5)
    with pytest.raises(ValueError, match="baseline"):
        GADConfig(baseline="median")
    with pytest.raises(ValueError, match="sft_coef"):
        GADConfig(sft_coef=-1)


# ---------------------------------------------------------------------------------------------------- discriminator

def test_discriminator_scores_last_attended_token_and_round_trips(setup, tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    D = Discriminator.from_pretrained(setup["student"]).eval()
    seq = torch.tensor([[5, 6, 7, 8]])
    alone = D(seq, torch.ones_like(seq))
    # right padding (with any id in the padded slots, even a real token) and left padding give the same score
    right = torch.tensor([[5, 6, 7, 8, 9, 9], [5, 6, 7, 8, 3, 4]])
    right_mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2)
    left = torch.tensor([[tiny_tokenizer.pad_token_id, 5, 6, 7, 8]])
    torch.testing.assert_close(D(right, right_mask), alone.expand(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(D(left, torch.tensor([[0, 1, 1, 1, 1]])), alone, atol=1e-5, rtol=0)
    assert not torch.allclose(D(seq[:, :3], torch.ones(1, 3, dtype=torch.long)), alone)  # the last token matters

    D.save_pretrained(tmp_path / "d")
    again = Discriminator.from_pretrained(tmp_path / "d").eval()
    assert torch.equal(again(seq, torch.ones_like(seq)), alone)


# ---------------------------------------------------------------------------------------------------- gad

def test_one_gad_step_changes_student_and_discriminator(setup, tmp_path):
    out = tmp_path / "run"
    summary = gad(setup["data"], setup["student"], str(out), steps=1, progress=False, **TINY)
    assert summary["steps_done"] == 1 and summary["warmup_steps_done"] == 0
    rec = summary["final"]
    for key in ("d_loss", "d_acc", "reward_mean", "teacher_score", "g_loss", "kl_ref", "clip_frac"):
        assert math.isfinite(rec[key]), key
    assert 0.0 <= rec["d_acc"] <= 1.0 and rec["kl_ref"] == 0.0  # the reference is the starting student
    assert rec["d_loss"] > 0 and rec["sample_tokens"] >= 1

    before = load_file(setup["student"] + "/model.safetensors")
    after = _weights(out / "student")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not change"
    d_after = _weights(out / "discriminator")
    changed = [k for k in d_after if not torch.equal(d_after[k], before["model." + k])]
    assert changed, "the discriminator's backbone did not change"
    assert (out / "discriminator" / Discriminator.HEAD_FILE).exists()
    assert json.loads((out / "summary.json").read_text())["history"] == summary["history"]
    assert (out / "student" / "tokenizer.json").exists()

    # one prompt per forward/backward (gradient accumulation) gives the same step as the whole batch at once
    micro = gad(setup["data"], setup["student"], str(tmp_path / "micro"), steps=1, progress=False,
                **{**TINY, "micro_batch": 1})["final"]
    for key in ("d_loss", "d_acc", "reward_mean", "g_loss", "d_grad_norm", "g_grad_norm"):
        assert micro[key] == pytest.approx(rec[key], rel=1e-4, abs=1e-6), key
    w_micro = _weights(tmp_path / "micro" / "student")
    assert all(torch.allclose(w_micro[k], after[k], atol=1e-6) for k in after)


@pytest.mark.parametrize("stage", ["warmup", "gad"])
def test_discriminator_learns_a_separable_toy_case(setup, tmp_path, stage):
    """Teacher responses are one repeated word; the untrained student samples random tokens: a few D-only
    warm-up steps, or a few GAD steps, make D score the teacher above every sample."""
    data = _write_data(tmp_path / "toy.jsonl", response=" ".join(["the"] * 6))
    steps = {"warmup_steps": 6, "warmup_d_only_steps": 6, "steps": 0} if stage == "warmup" else {"steps": 6}
    summary = gad(data, setup["student"], str(tmp_path / "toy"), progress=False,
                  **{**TINY, "d_lr": 1e-2, "save_every": 6, "sft_coef": 0.0, **steps})  # G stays random
    acc = [h["d_acc"] for h in summary["history"]]
    loss = [h["d_loss"] for h in summary["history"]]
    assert len(acc) == 6 and all(h["stage"] == stage and "sft_loss" not in h for h in summary["history"])
    assert acc[-1] == 1.0 and np.mean(acc[-3:]) > acc[0], acc
    assert loss[-1] < 0.5 * loss[0], loss


@pytest.mark.parametrize("options", [{"sft_coef": 0.0}, {"sft_coef": 0.5, "baseline": "teacher",
                                                        "scale_rewards": False}],
                         ids=["paper-grpo", "sft-term+teacher-baseline+no-std"])
def test_warmup_then_gad_resumes_to_the_same_result(setup, tmp_path, options):
    settings = dict(warmup_steps=2, warmup_d_only_steps=1, steps=2, progress=False, **TINY, **options)
    full = gad(setup["data"], setup["student"], str(tmp_path / "full"), **settings)
    assert [h["stage"] for h in full["history"]] == ["warmup"] * 2 + ["gad"] * 2
    assert "sft_loss" not in full["history"][0] and "sft_loss" in full["history"][1]

    class Stop(Exception):
        pass

    seen = []

    def stop_at(stage, step):
        def hook(rec):
            seen.append((rec["stage"], rec["step"]))
            if (rec["stage"], rec["step"]) == (stage, step):
                raise Stop
        return hook

    out = str(tmp_path / "cut")
    with pytest.raises(Stop):  # interrupted inside the warm-up, after its step-1 checkpoint
        gad(setup["data"], setup["student"], out, on_step=stop_at("warmup", 1), **settings)
    with pytest.raises(Stop):  # resumed: warm-up step 2, then interrupted after the first adversarial step
        gad(setup["data"], setup["student"], out, on_step=stop_at("gad", 1), **settings)
    resumed = gad(setup["data"], setup["student"], out, on_step=lambda r: seen.append((r["stage"], r["step"])),
                  **settings)
    assert seen == [("warmup", 1), ("warmup", 2), ("gad", 1), ("gad", 2)]  # no step was redone

    def numbers(h):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert numbers(resumed["history"]) == numbers(full["history"])
    for name in ("student", "discriminator"):
        a, b = _weights(tmp_path / "full" / name), _weights(tmp_path / "cut" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # more adversarial steps continue the run; other settings are refused
    longer = gad(setup["data"], setup["student"], out, **{**settings, "steps": 3})
    assert longer["steps_done"] == 3 and numbers(longer["history"][:4]) == numbers(full["history"])
    with pytest.raises(ValueError, match="learning_rate: 0.001 there, 0.002 now"):
        gad(setup["data"], setup["student"], out, **{**settings, "learning_rate": 2e-3})


def test_cli_gad(setup, tmp_path):
    from bayeskd.cli import main

    out = tmp_path / "cli"
    args = ["gad", "--data", setup["data"], "--student", setup["student"], "--out", str(out), "--steps", "1",
            "--group-size", "2", "--batch-prompts", "2", "--max-new-tokens", "4", "--ppo-epochs", "2", "--seed", "1"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    printed = json.loads(res.output[res.output.index("{"):])
    assert printed["steps_done"] == 1 and "history" not in printed
    assert 0.0 <= printed["final"]["clip_frac_last"] <= 1.0  # the second PPO pass ran against the old policy
    assert (out / "student" / "model.safetensors").exists()
    bad = CliRunner().invoke(main, args[:-2] + ["--group-size", "1"])
    assert bad.exit_code != 0 and "--group-size" in bad.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"] == {**GADConfig().settings(), "steps": 1, "group_size": 2, "batch_prompts": 2,
                                 "max_new_tokens": 4, "ppo_epochs": 2, "seed": 1}  # the rest: the config's defaults
    opts = ["--sft-coef", "0.5", "--baseline", "teacher", "--no-scale-rewards", "--out", str(tmp_path / "cli2")]
    res = CliRunner().invoke(main, args + opts, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "cli2" / "summary.json").read_text())["config"]
    assert (cfg["sft_coef"], cfg["baseline"], cfg["scale_rewards"]) == (0.5, "teacher", False)
    assert json.loads(res.output[res.output.index("{"):])["final"]["sft_loss"] > 0


def test_prompt_batches_visit_every_record_once_per_epoch():
    from bayeskd.distillation.gad import _batch_indices

    idx = [i for step in range(6) for i in _batch_indices(5, 2, seed=0, stage="gad", step=step)]
    assert sorted(idx[:5]) == list(range(5)) and sorted(idx[5:10]) == list(range(5))
    assert idx[:5] != idx[5:10]  # a new permutation each epoch (fixed seed: deterministic)
    assert _batch_indices(5, 2, 0, "gad", 3) == idx[6:8]  # stateless: a resumed run picks the same prompts


# ---------------------------------------------------------------------------------------------------- training arguments

def test_settings_record_gad_fields_and_set_training_arguments_only():
    """The checkpoint stamp / summary config: GAD's fields as before (`lr` is now `learning_rate`), and an honoured
    training argument only when set; run-only ones (logging, progress, output_dir) never."""
    base = GADConfig().settings()
    assert set(base) == {"warmup_steps", "warmup_d_only_steps", "steps", "group_size", "temperature", "batch_prompts",
                         "learning_rate", "d_lr", "weight_decay", "max_grad_norm", "clip", "kl_coef", "ppo_epochs",
                         "adv_eps", "scale_rewards", "baseline", "sft_coef", "max_new_tokens", "max_prompt_tokens",
                         "micro_batch", "save_every", "seed"}
    cfg = GADConfig(lr_scheduler_type="linear", adam_beta2=0.95, logging_steps=3, disable_tqdm=True, output_dir="x")
    assert cfg.settings() == {**base, "lr_scheduler_type": "linear", "adam_beta2": 0.95}


@pytest.mark.parametrize("field, value", [("deepspeed", "ds.json"), ("fsdp", "full_shard"), ("max_steps", 5),
                                          ("eval_strategy", "steps"), ("report_to", "wandb"), ("push_to_hub", True),
                                          ("torch_compile", True), ("optim", "sgd")])
def test_unhonoured_training_arguments_are_refused(field, value):
    with pytest.raises(ValueError, match=f"gad cannot honour {field}="):
        GADConfig(**{field: value})


def test_lr_schedule_is_honoured_and_default_is_constant(setup, tmp_path):
    """linear vs constant (and an LR warm-up) give other weights; the default is the constant LR of before."""
    from bayeskd.distillation.gad import _schedules

    cfg = GADConfig(lr_scheduler_type="linear", lr_warmup_steps=2)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    (sched,) = _schedules(cfg, [opt], [cfg.learning_rate], n_steps=10, step=0)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.0, 5e-6, 1e-5, 1e-5 * 7 / 8, 1e-5 * 6 / 8])
    resumed = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    _schedules(cfg, [resumed], [cfg.learning_rate], n_steps=10, step=4)  # replayed to the step
    assert resumed.param_groups[0]["lr"] == pytest.approx(lrs[-1])

    runs = {}
    for name, extra in {"default": {}, "constant": {"lr_scheduler_type": "constant"},
                        "linear": {"lr_scheduler_type": "linear"}}.items():
        gad(setup["data"], setup["student"], str(tmp_path / name), steps=2, progress=False, **{**TINY, **extra})
        runs[name] = _weights(tmp_path / name / "student")
    assert all(torch.equal(runs["default"][k], runs["constant"][k]) for k in runs["default"])
    assert any(not torch.equal(runs["linear"][k], runs["constant"][k]) for k in runs["linear"])


def test_gradient_checkpointing_seed_and_bf16_are_honoured(setup, tmp_path):
    """Gradient checkpointing gives the same step (the layers are recomputed, not changed); another seed samples
    otherwise; bf16 autocast runs on the CPU."""
    base = gad(setup["data"], setup["student"], str(tmp_path / "base"), steps=1, progress=False, **TINY)
    ckpt = gad(setup["data"], setup["student"], str(tmp_path / "ckpt"), steps=1, progress=False,
               gradient_checkpointing=True, **TINY)
    for key in ("d_loss", "g_loss", "d_grad_norm", "g_grad_norm"):
        assert ckpt["final"][key] == pytest.approx(base["final"][key], rel=1e-4, abs=1e-6), key
    seeded = gad(setup["data"], setup["student"], str(tmp_path / "seed"), steps=1, progress=False,
                 **{**TINY, "seed": 7})
    assert seeded["final"]["reward_mean"] != base["final"]["reward_mean"]
    bf16 = gad(setup["data"], setup["student"], str(tmp_path / "bf16"), steps=1, progress=False, bf16=True, **TINY)
    assert math.isfinite(bf16["final"]["g_loss"]) and bf16["config"]["bf16"] is True
