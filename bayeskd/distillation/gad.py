"""GAD: generative adversarial distillation from a black-box teacher ("Black-Box On-Policy Distillation of Large
Language Models"). The student is a generator G; a discriminator D (a causal-LM backbone + a scalar head,
initialised from the student) learns to score the teacher's responses above G's samples; G is trained by GRPO
with D's score as the reward.

One step, on a batch of `batch_prompts` prompts:
  roll out `group_size` samples per prompt from G (temperature sampling, left-padded prompts)
  -> score them with D (the rewards come from D before its update)
  -> group advantages (r - mean_group) / (std_group + eps), the same on every token of a sample (`baseline`:
     D(teacher response) instead of the group mean; `scale_rewards=False`: no division, Dr. GRPO)
  -> update D: Bradley-Terry -log sigma(D(x, y_teacher) - D(x, y_student)), mean over the group, then prompts
  -> update G: PPO-clip token loss + kl_coef * k3-KL to the reference model (GRPO), `ppo_epochs` passes, plus
     sft_coef * cross-entropy on the batch's teacher responses (0: the paper's GAD).
Stages: warm-up in out/warmup/ (SFT of G on the teacher responses while D trains on G's samples; the first
`warmup_d_only_steps` steps update D only), then the adversarial stage in out/, starting from the warm-up
checkpoints with fresh optimizers; the warm-up student is the KL reference.

Why a loop of our own rather than TRL's GRPOTrainer: TRL takes reward models as fixed scorers and has no hook to
train one on each step's rollouts, which is the point of GAD. The loop is plain PyTorch on HF models.

Every sequence (prompt + response) is laid out right-padded with explicit position ids, for G, D and the
reference alike, so the scores and log-probs do not depend on how a batch was padded.

This module is the job (rollouts, updates, checkpoints, the loop); the losses and the discriminator model are in
`bayeskd.distillation.gad_parts`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import transformers
from transformers.trainer_utils import SchedulerType

from bayeskd.data import DataError, load_tokenized_records, load_tokenizer
from bayeskd.distillation.gad_parts import (Discriminator, bradley_terry_loss, discriminator_accuracy,
                                            group_advantages, grpo_loss)
from bayeskd.distillation.checkpoints import verify_file_record, with_file_record
from bayeskd.resume import check_settings, read_stamp
from bayeskd.integrity import atomic_write_json
from bayeskd.job_config import job_config, setting
from bayeskd.teacher_forcing import pad_prompt_response, token_logprobs
from bayeskd.locks import locks_output

logger = logging.getLogger(__name__)

STATE = "state.json"
STATE_VERSION = 1
# settings a rerun may change without refusing the checkpoint (steps: while the LR schedule does not depend on it)
RESUMABLE = ("steps", "save_every", "micro_batch")
ADDED_LATER = {"scale_rewards": True, "baseline": "group", "sft_coef": 0.0}  # settings newer than STATE_VERSION 1


# ---------------------------------------------------------------------------------------------------- config

@dataclass
class GADConfig(transformers.TrainingArguments):
    """GAD settings, the `gad` job's one config: `TrainingArguments` plus GAD's own fields (every field is a
    `bayeskd gad` option; output_dir is gad's `out`). Steps are optimizer steps of the stage; each step uses
    `batch_prompts` prompts.

    GAD is its own loop, not the Trainer: of the inherited fields it honours the optimizer's (learning_rate, which
    `--lr` also sets, weight_decay, adam_beta1/2, adam_epsilon, max_grad_norm, optim adamw_torch[_fused]), the
    schedule (lr_scheduler_type, lr_scheduler_kwargs; the LR warm-up is `lr_warmup_steps`), seed, bf16/fp16
    autocast, gradient/activation checkpointing, use_cpu, logging_steps and disable_tqdm (`HONOURED`); any other
    inherited field set to a value other than its default is refused (`unsupported_training_arguments`), so none
    is silently ignored. `warmup_steps` is GAD's SFT warm-up, not the Trainer's LR warm-up."""
    # GAD's warm-up stage keeps its name (`--warmup-steps`, as the lab and the experiments spell it); the
    # Trainer's LR warm-up is `lr_warmup_steps` below
    warmup_steps: int = setting(0, "Warm-up steps: SFT of the student on the teacher responses while the discriminator "
                           "trains (0: adversarial at once). Not the Trainer's LR warm-up: that is --lr-warmup-steps.",
                           min=0)
    warmup_d_only_steps: int = setting(0, "The first warm-up steps update the discriminator only.", min=0)
    steps: int = setting(100, "Adversarial (GRPO) steps.", min=0)
    group_size: int = setting(8, "Student samples per prompt.", min=2)
    # At 0.8 against a teacher sampled at 1, D tells the two apart by sharpness and GRPO flattens the student (lab:
    # entropy +0.12 nats, KL on own samples +0.035; experiments/gad_tune.py).
    temperature: float = setting(1.0, "Student sampling temperature (also the policy's in the PPO ratio): the one the "
                            "teacher's responses were sampled at (generate's default, 1).", min=0, min_open=True)
    batch_prompts: int = setting(4, "Prompts per step.", min=1)
    learning_rate: float = setting(1e-5, "Student (generator) AdamW learning rate, warm-up SFT included.", min=0,
                                   min_open=True, flags=("--learning-rate", "--lr"))
    d_lr: float = setting(1e-5, "Discriminator AdamW learning rate.")
    weight_decay: float = setting(0.0, "AdamW weight decay of both models (every parameter).", min=0)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm of both models.", min=0, min_open=True)
    lr_warmup_steps: float = setting(0, "Linear LR warm-up of both optimizers at the start of each stage, in steps (a "
                                "float < 1: that share of the stage's steps); the Trainer's warmup_steps.", min=0)
    clip: float = setting(0.2, "PPO clip range.")
    kl_coef: float = setting(0.001, "Weight of the k3 KL to the reference (the warm-up student); 0: none (no reference "
                        "model is loaded).", min=0)
    ppo_epochs: int = setting(1, "Student updates per rollout batch (>1 makes the clip bite).", min=1)
    adv_eps: float = setting(1e-4, "Added to the group's reward std before dividing by it.", min=0, min_open=True)
    scale_rewards: bool = setting(True, "Divide advantages by the group's reward std (GRPO) or not (Dr. GRPO).")
    baseline: str = setting("group", "Advantage baseline: the group's mean reward, or D's score of the prompt's teacher "
                       "response (scored in the same D call).", choices=("group", "teacher"))
    # The lab measured 1 as the best GAD (it keeps teacher-forced KL below the SFT start; experiments/gad_tune.py).
    sft_coef: float = setting(1.0, "Weight of a cross-entropy term on the batch's teacher responses in each GRPO step "
                         "(0: the paper's GAD).", min=0)
    max_new_tokens: int = setting(128, "Sample length; teacher responses are cut to it too (no length cue for D).", min=1)
    max_prompt_tokens: int = setting(512, "Prompts are cut from the left to this many tokens.", min=1)
    micro_batch: int | None = setting(None, "Prompts per forward/backward (gradient accumulation); default: the whole "
                                 "batch.", min=1)
    save_every: int = setting(50, "Checkpoint every N steps (and at the end of each stage).", min=1)
    seed: int = setting(42, "Seed of the sampling, the prompt order and a new discriminator head.")
    # transformers' defaults that gad changes: the loop as it always ran (a constant LR, torch's AdamW), a log line
    # every 10 steps, a progress bar
    lr_scheduler_type: str = setting("constant", "LR schedule of both optimizers over each stage "
                                     "(transformers.get_scheduler).", choices=tuple(t.value for t in SchedulerType))
    optim: str = setting("adamw_torch", "Optimizer of both models: torch's AdamW, or its fused kernel.",
                         choices=("adamw_torch", "adamw_torch_fused"))
    logging_steps: float = setting(10, "Log a line (logger bayeskd.distillation.gad, INFO) every N steps of a stage (a "
                                   "float < 1: that share of the stage's steps).", min=0, min_open=True)
    disable_tqdm: bool = setting(False, "No progress bar.")

    def __post_init__(self):
        ints = {"warmup_steps": 0, "warmup_d_only_steps": 0, "steps": 0, "group_size": 2, "batch_prompts": 1,
                "ppo_epochs": 1, "max_new_tokens": 1, "max_prompt_tokens": 1, "save_every": 1}
        for name, low in ints.items():
            if int(getattr(self, name)) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.warmup_d_only_steps > self.warmup_steps:
            raise ValueError(f"warmup_d_only_steps ({self.warmup_d_only_steps}) must be <= warmup_steps "
                             f"({self.warmup_steps})")
        for name in ("temperature", "learning_rate", "d_lr", "max_grad_norm", "adv_eps", "logging_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.clip < 1:
            raise ValueError(f"clip must be in (0, 1), got {self.clip}")
        if self.kl_coef < 0 or self.weight_decay < 0 or self.sft_coef < 0 or self.lr_warmup_steps < 0:
            raise ValueError(f"kl_coef, weight_decay, sft_coef and lr_warmup_steps must be >= 0, got {self.kl_coef}, "
                             f"{self.weight_decay}, {self.sft_coef}, {self.lr_warmup_steps}")
        if self.baseline not in ("group", "teacher"):
            raise ValueError(f"baseline must be 'group' or 'teacher', got {self.baseline!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or None, got {self.micro_batch}")
        if _plain(self.optim) not in ("adamw_torch", "adamw_torch_fused"):
            raise ValueError(f"gad cannot honour optim={_plain(self.optim)!r}: its optimizers are torch's AdamW "
                             "(adamw_torch or adamw_torch_fused)")
        if _plain(self.lr_scheduler_type) in ("reduce_lr_on_plateau", "greedy"):
            raise ValueError(f"gad cannot honour lr_scheduler_type={_plain(self.lr_scheduler_type)!r}: it needs an "
                             "evaluation metric, and gad does not evaluate")
        unsupported = unsupported_training_arguments(self)
        if unsupported:  # checked before TrainingArguments normalises the values
            name, value = unsupported[0]
            others = f" (and {', '.join(n for n, _ in unsupported[1:])})" if len(unsupported) > 1 else ""
            hint = f"; {_HINTS[name]}" if name in _HINTS else ""
            raise ValueError(f"gad cannot honour {name}={value!r}{others}: GAD runs its own training loop, not the "
                             f"Trainer{hint}")
        if self.fp16 and not torch.cuda.is_available():
            raise ValueError("gad cannot honour fp16 without CUDA (fp16 autocast needs a gradient scaler on a GPU); "
                             "on the CPU use bf16")
        if self.bf16 and not torch.cuda.is_available():  # bf16 autocast on the CPU (TrainingArguments: use_cpu)
            if not torch.amp.autocast_mode.is_autocast_available("cpu"):
                raise ValueError("gad cannot honour bf16 here: this torch has no CPU autocast")
            self.use_cpu = True
        super().__post_init__()

    def settings(self) -> dict[str, Any]:
        """What the run trains with, as its checkpoints and summary record it: GAD's own fields, then the honoured
        training arguments that change the numbers (`TRAINING_SETTINGS`) where they differ from their defaults (a
        checkpoint older than them ran with the defaults)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _GAD_FIELDS}
        defaults = _defaults(type(self))
        out.update({name: _plain(getattr(self, name)) for name in TRAINING_SETTINGS
                    if _plain(getattr(self, name)) != _plain(defaults[name])})
        return out


# Inherited fields the loop honours (the rest must keep their defaults); the settings a run records always (GAD's
# own) and where not default (added with the training arguments); what to do instead of a refused field.
HONOURED = ("output_dir", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
            "optim", "lr_scheduler_type", "lr_scheduler_kwargs", "seed", "bf16", "fp16", "gradient_checkpointing",
            "gradient_checkpointing_kwargs", "activation_checkpointing", "activation_checkpointing_kwargs", "use_cpu",
            "logging_steps", "disable_tqdm", "report_to", "warmup_steps")
TRAINING_SETTINGS = ("adam_beta1", "adam_beta2", "adam_epsilon", "optim", "lr_scheduler_type", "lr_scheduler_kwargs",
                     "lr_warmup_steps", "bf16", "fp16")
_HINTS = {**{name: f"gad's own setting is {own}" for name, own in (
    ("max_steps", "steps"), ("num_train_epochs", "steps"), ("per_device_train_batch_size", "batch_prompts"),
    ("gradient_accumulation_steps", "micro_batch"), ("save_steps", "save_every"))},
    "resume_from_checkpoint": "a rerun of the same command resumes", "push_to_hub": "upload out/student yourself",
    "report_to": "the per-step history is in out/summary.json and the log"}
_NO_REPORTING = (None, "none", [], ["none"], ())


def _plain(value: Any) -> Any:
    """An Enum member as its value (TrainingArguments turns strings into enums)."""
    return getattr(value, "value", value)


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING
            else None for f in fields(cls)}


@functools.cache
def _normalised_defaults() -> dict[str, Any]:
    """The defaults as `TrainingArguments.__post_init__` leaves them (a config copied with `dataclasses.replace`
    carries these)."""
    args = transformers.TrainingArguments(output_dir="unused")
    return {f.name: getattr(args, f.name) for f in fields(args)}


def unsupported_training_arguments(cfg: GADConfig) -> list[tuple[str, Any]]:
    """The inherited `TrainingArguments` fields set on `cfg` that the GAD loop cannot honour: (name, value) of each
    one not in `HONOURED` that differs from its default, and `report_to` naming an integration."""
    defaults, normalised = _defaults(type(cfg)), _normalised_defaults()
    found = [(f.name, _plain(getattr(cfg, f.name))) for f in fields(transformers.TrainingArguments)
             if f.name not in HONOURED
             and _plain(getattr(cfg, f.name)) not in (_plain(defaults[f.name]), _plain(normalised[f.name]))]
    if cfg.report_to not in _NO_REPORTING:  # GAD's history is in out/summary.json; no integration callbacks
        found.append(("report_to", cfg.report_to))
    return found


_GAD_FIELDS = frozenset({f.name for f in fields(GADConfig)} - {f.name for f in fields(transformers.TrainingArguments)}
                        - set(TRAINING_SETTINGS) | {"warmup_steps", "learning_rate", "weight_decay", "max_grad_norm",
                                                    "seed"})


# ---------------------------------------------------------------------------------------------------- rollouts

def _pack(prompts: list[list[int]], responses: list[list[int]], pad: int, device) -> dict[str, torch.Tensor]:
    """Prompt + response, right-padded on `device`: input_ids, attention_mask, response_mask [B, L]."""
    return {k: v.to(device) for k, v in pad_prompt_response(prompts, responses, pad).items()}


def _token_logprobs(model, s: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log p(token t | tokens < t) at temperature, [B, L-1] (position t-1 predicts token t)."""
    return token_logprobs(model, s, temperature, explicit_positions=True)


@torch.no_grad()
def rollout(model, prompts: list[list[int]], group_size: int, temperature: float, max_new_tokens: int, pad: int,
            eos: int | None, device: str | torch.device = "cpu") -> list[list[int]]:
    """`group_size` samples per prompt (prompt-major: samples of prompt i are rows i*n .. i*n+n-1), each cut after
    its first EOS."""
    from transformers import GenerationConfig

    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: generation continues every row from its last column
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                           max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    out = model.generate(input_ids=ids.repeat_interleave(group_size, 0).to(device),
                         attention_mask=mask.repeat_interleave(group_size, 0).to(device), generation_config=gen)
    samples = []
    for row in out[:, L:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        samples.append(row)
    return samples


def _chunks(n_prompts: int, micro: int | None) -> list[range]:
    size = micro or n_prompts
    return [range(i, min(i + size, n_prompts)) for i in range(0, n_prompts, size)]


# ---------------------------------------------------------------------------------------------------- updates

class _Precision:
    """One optimizer's mixed precision: bf16/fp16 autocast of the forward passes (`autocast`), and for fp16 a
    gradient scaler (`backward`, `step`); in float32 (`_Precision()`) the plain calls."""

    def __init__(self, dtype: torch.dtype | None = None, device_type: str = "cpu"):
        self.dtype, self.device_type = dtype, device_type
        self.scaler = torch.amp.GradScaler(device_type) if dtype is torch.float16 else None

    def autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, opt, params, max_norm: float) -> torch.Tensor:
        """Clip the gradients (unscaled) to `max_norm`, step; returns their norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler is None:
            opt.step()
        else:  # a step whose gradients overflowed is skipped, and the scale lowered
            self.scaler.step(opt)
            self.scaler.update()
        return grad_norm


FP32 = _Precision()


def _update_discriminator(D, opt, prompts, teacher, samples, cfg: GADConfig, pad: int, device,
                          amp: _Precision = FP32) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One Bradley-Terry step of D. Returns the rewards [P, n] (the student samples' scores before the step), the
    teacher responses' scores [P] (same call) and the step's statistics."""
    P, n = len(prompts), cfg.group_size
    opt.zero_grad(set_to_none=True)
    t_all, s_all, loss_sum = [], [], 0.0
    for ch in _chunks(P, cfg.micro_batch):
        with amp.autocast():
            t = D(**_d_inputs(prompts, teacher, ch, 1, pad, device)).float()
            s = D(**_d_inputs(prompts, samples, ch, n, pad, device)).float().view(len(ch), n)
            loss = bradley_terry_loss(t, s) * (len(ch) / P)
        amp.backward(loss)
        loss_sum += float(loss.detach())
        t_all.append(t.detach())
        s_all.append(s.detach())
    grad_norm = amp.step(opt, D.parameters(), cfg.max_grad_norm)
    t, s = torch.cat(t_all), torch.cat(s_all)
    return s, t, {"d_loss": loss_sum, "d_acc": discriminator_accuracy(t, s), "teacher_score": float(t.mean()),
               "reward_mean": float(s.mean()), "reward_std": float(s.std()), "d_grad_norm": float(grad_norm)}


def _d_inputs(prompts, responses, ch: range, per_prompt: int, pad: int, device) -> dict[str, torch.Tensor]:
    rows = [i * per_prompt + j for i in ch for j in range(per_prompt)]
    s = _pack([prompts[r // per_prompt] for r in rows], [responses[r] for r in rows], pad, device)
    return {"input_ids": s["input_ids"], "attention_mask": s["attention_mask"]}


def _update_generator_grpo(G, ref, opt, prompts, samples, advantages, cfg: GADConfig, pad: int,
                           device, teacher: list[list[int]] | None = None, amp: _Precision = FP32) -> dict[str, float]:
    """`ppo_epochs` PPO-clip passes of G over the rollout batch (old log-probs: G before the first pass); with
    `cfg.sft_coef`, each pass adds sft_coef times the cross-entropy on the prompts' `teacher` responses."""
    P, n = len(prompts), cfg.group_size
    n_teacher = sum(len(r) for r in teacher) if cfg.sft_coef and teacher is not None else 0
    batches = []
    for ch in _chunks(P, cfg.micro_batch):
        rows = [i * n + j for i in ch for j in range(n)]
        s = _pack([prompts[r // n] for r in rows], [samples[r] for r in rows], pad, device)
        with torch.no_grad(), amp.autocast():
            old = _token_logprobs(G, s, cfg.temperature) if cfg.ppo_epochs > 1 else None
            ref_lp = _token_logprobs(ref, s, cfg.temperature) if ref is not None else None
        batches.append((ch, s, old, ref_lp, advantages[list(ch)].reshape(-1)))
    stats: dict[str, float] = {}
    for epoch in range(cfg.ppo_epochs):
        opt.zero_grad(set_to_none=True)
        acc = {"g_loss": 0.0, "kl_ref": 0.0, "clip_frac": 0.0, **({"sft_loss": 0.0} if n_teacher else {})}
        for ch, s, old, ref_lp, adv in batches:
            with amp.autocast():
                lp = _token_logprobs(G, s, cfg.temperature)
                # One pass per rollout: the sampling policy is G itself, ratio 1 with the policy gradient.
                loss, st = grpo_loss(lp, lp.detach() if old is None else old, adv, s["response_mask"][:, 1:],
                                     clip=cfg.clip, ref_logprobs=ref_lp, kl_coef=cfg.kl_coef)
            w = len(ch) / P
            amp.backward(loss * w)
            acc["g_loss"] += float(loss.detach()) * w
            acc["kl_ref"] += st["kl"] * w
            acc["clip_frac"] += st["clip_frac"] * w
            if n_teacher:
                with amp.autocast():
                    sft = _teacher_nll(G, prompts, teacher, ch, n_teacher, pad, device)
                amp.backward(cfg.sft_coef * sft)
                acc["sft_loss"] += float(sft.detach())
        grad_norm = amp.step(opt, G.parameters(), cfg.max_grad_norm)
        if epoch == 0:  # the first pass measures the policy that sampled the batch
            stats = {**acc, "g_grad_norm": float(grad_norm)}
    if cfg.ppo_epochs > 1:
        stats["clip_frac_last"] = acc["clip_frac"]  # how far the last pass moved from the sampling policy
    return stats


def _update_generator_sft(G, opt, prompts, teacher, cfg: GADConfig, pad: int, device,
                          amp: _Precision = FP32) -> dict[str, float]:
    """One SFT step of G: cross-entropy on the teacher's response tokens, mean over the batch's tokens."""
    total = sum(len(r) for r in teacher)
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for ch in _chunks(len(prompts), cfg.micro_batch):
        with amp.autocast():
            loss = _teacher_nll(G, prompts, teacher, ch, total, pad, device)
        amp.backward(loss)
        loss_sum += float(loss.detach())
    grad_norm = amp.step(opt, G.parameters(), cfg.max_grad_norm)
    return {"sft_loss": loss_sum, "g_grad_norm": float(grad_norm)}


def _teacher_nll(G, prompts, teacher, ch: range, total: int, pad: int, device) -> torch.Tensor:
    """The summed negative log-likelihood of the teacher responses of prompts `ch` under G, divided by `total`
    (the batch's teacher tokens, so the chunks add up to the batch's token mean)."""
    s = _pack([prompts[i] for i in ch], [teacher[i] for i in ch], pad, device)
    return -(_token_logprobs(G, s) * s["response_mask"][:, 1:]).sum() / total


# ---------------------------------------------------------------------------------------------------- checkpoints

def _save_checkpoint(stage_dir: Path, G, tok, D, opt_g, opt_d, state: dict[str, Any]) -> None:
    """Write the whole checkpoint to a temporary folder whose state.json, written last, marks it complete; then
    move it into place (`_commit`), so an interruption never leaves a mix of two steps behind."""
    tmp = stage_dir / f".saving-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        G.save_pretrained(str(tmp / "student"))
        tok.save_pretrained(str(tmp / "student"))
        D.save_pretrained(tmp / "discriminator")
        torch.save({"student": opt_g.state_dict(), "discriminator": opt_d.state_dict()}, tmp / "optimizers.pt")
        atomic_write_json(tmp / STATE, with_file_record(tmp, state))  # checked on resume (verify_file_record)
    except BaseException:  # e.g. a full disk: no half-written checkpoint is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(stage_dir, tmp)


def _commit(stage_dir: Path, tmp: Path) -> None:
    """Move a complete checkpoint folder into place; idempotent, so a commit cut short is finished later."""
    for name in ("student", "discriminator", "optimizers.pt"):
        src, dst = tmp / name, stage_dir / name
        if src.exists():
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            os.replace(src, dst)
    os.replace(tmp / STATE, stage_dir / STATE)
    shutil.rmtree(tmp)


def _load_state(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's state.json after finishing (or dropping) an interrupted save; None when there is none."""
    for tmp in sorted(stage_dir.glob(".saving-*")):
        if (tmp / STATE).exists():
            _commit(stage_dir, tmp)
        else:
            shutil.rmtree(tmp)
    return read_stamp(stage_dir / STATE)


def _check_resume(stage_dir: Path, state: dict[str, Any], want: dict[str, Any]) -> None:
    """Refuse a checkpoint made with other settings (`RESUMABLE` aside) or in another format."""
    # The format version sits beside the config in state.json: compared with it, so a change of either is named.
    have = {**ADDED_LATER, **state.get("config", {})}  # a checkpoint older than a setting ran with its default
    if "lr" in have:  # recorded before the config became TrainingArguments: the same setting
        have["learning_rate"] = have.pop("lr")
    ignore = RESUMABLE
    if (want.get("lr_scheduler_type", "constant") not in ("constant", "constant_with_warmup")
            or 0 < float(want.get("lr_warmup_steps", 0)) < 1):  # the schedule depends on the stage's length
        ignore = tuple(name for name in RESUMABLE if name != "steps")
    check_settings({"version": state.get("version"), **have}, {"version": STATE_VERSION, **want},
                   where=stage_dir, what="GAD", hint="rerun with the same settings to resume, or use another --out",
                   ignore=ignore)


# ---------------------------------------------------------------------------------------------------- gad

def _path_key(p: str | None) -> str | None:
    """A path as recorded in the checkpoint: absolute when it exists locally (a hub id stays as is)."""
    return str(Path(p).resolve()) if p is not None and Path(p).exists() else p


def _step_seed(seed: int, stage: str, step: int) -> int:
    """Each step seeds torch from (seed, stage, step): a resumed run samples exactly what an uninterrupted one
    would."""
    return int(np.random.SeedSequence([seed, {"warmup": 0, "gad": 1}[stage], step]).generate_state(1)[0])


def _batch_indices(n_records: int, batch_prompts: int, seed: int, stage: str, step: int) -> list[int]:
    """Prompts of a step: a seeded permutation per epoch, walked `batch_prompts` at a time (stateless)."""
    positions = range(step * batch_prompts, (step + 1) * batch_prompts)
    perms = {e: np.random.default_rng([seed, {"warmup": 0, "gad": 1}[stage], e]).permutation(n_records)
             for e in {j // n_records for j in positions}}
    return [int(perms[j // n_records][j % n_records]) for j in positions]


def _prepare_data(data: str, tok, cfg: GADConfig, split: str, skip_bad: bool) -> tuple[list[list[int]],
                                                                                        list[list[int]], int]:
    """(prompt ids, teacher response ids, records skipped as malformed)."""
    tokd, report = load_tokenized_records(data, tok, split=split, skip_bad=skip_bad)
    prompts, responses = [], []
    for i, (ids, p) in enumerate(zip(tokd.input_ids, tokd.prompt_lengths)):
        p = int(p)
        if p == 0:
            raise DataError(f"{data}: record {i} (counting kept records from 0) has an empty prompt; GAD samples the "
                            "student from the prompt, so it needs at least one prompt token")
        prompts.append(ids[max(0, p - cfg.max_prompt_tokens):p].tolist())
        responses.append(ids[p:p + cfg.max_new_tokens].tolist())
    return prompts, responses, int(report.skipped)


def _checkpoint_layers(model, kwargs: dict | None) -> None:
    """Gradient (activation) checkpointing of `model`'s layers while it stays in eval mode (no dropout): HF
    checkpoints a layer only while the layer is training, so the checkpointed layers alone are marked so; their
    submodules (dropout included) stay in eval, and without gradients (sampling) a layer runs as is, cache included."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ValueError(f"gad cannot honour gradient_checkpointing for {type(model).__name__}: it has no "
                         "checkpointable layers")
    for m in layers:
        m.training = True


def _schedules(cfg: GADConfig, opts, base_lrs, n_steps: int, step: int) -> list:
    """One `transformers.get_scheduler` schedule per optimizer over the stage's `n_steps`, moved on to `step` (a
    resumed stage's optimizers have their saved state; the schedule is a function of the step, so it is replayed,
    not saved)."""
    from transformers import get_scheduler

    warm = int(cfg.lr_warmup_steps) if cfg.lr_warmup_steps >= 1 else math.ceil(n_steps * cfg.lr_warmup_steps)
    schedules = []
    for opt, lr in zip(opts, base_lrs):
        for group in opt.param_groups:
            group["initial_lr"] = lr
        schedules.append(get_scheduler(_plain(cfg.lr_scheduler_type), opt, num_warmup_steps=warm,
                                       num_training_steps=n_steps, scheduler_specific_kwargs=cfg.lr_scheduler_kwargs))
    for _ in range(step):
        _advance(schedules)
    return schedules


def _advance(schedules) -> None:
    with warnings.catch_warnings():  # a D-only warm-up step leaves G's optimizer unstepped: its schedule moves on
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for schedule in schedules:
            schedule.step()


def _log_every(logging_steps: float, n_steps: int) -> int:
    return max(1, int(logging_steps) if logging_steps >= 1 else math.ceil(n_steps * logging_steps))


@locks_output()
def gad(data: str, student: str, out: str, *, discriminator: str | None = None, tokenizer: str | None = None,
        config: GADConfig | None = None, split: str = "train", skip_bad: bool = False, device: str | None = None,
        progress: bool = True, on_step: Callable[[dict[str, Any]], None] | None = None,
        **settings: Any) -> dict[str, Any]:
    """Distill `student` (a `from_pretrained` path) from the teacher responses in `data` by GAD; see the module
    docstring. `discriminator`: where D starts (default: the student's backbone with a new head). `settings`
    are `GADConfig` fields (or pass `config`; its output_dir is replaced by `out`): warmup_steps (the SFT warm-up),
    warmup_d_only_steps, steps, group_size=8, temperature=1, sft_coef=1, batch_prompts, learning_rate, d_lr,
    clip=0.2, kl_coef=0.001, max_new_tokens, seed, the honoured training arguments (lr_scheduler_type,
    lr_warmup_steps, bf16, gradient_checkpointing, ...), ...

    Writes out/warmup/{student,discriminator,optimizers.pt,state.json} (warm-up), the same under out/ (the
    adversarial stage; out/student is the distilled student with its tokenizer) and out/summary.json. A rerun
    with the same settings resumes from the last checkpoint (`steps` may be raised to train further); other
    settings are refused. `on_step(record)` is called after each step (and its checkpoint, if any).
    Returns the summary: the config, steps done, the per-step history (D accuracy, rewards, KL, losses).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    cfg = job_config(GADConfig, config, settings, "gad")
    cfg.output_dir = str(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and not cfg.use_cpu else "cpu"))
    if cfg.fp16 and device.type != "cuda":
        raise ValueError(f"gad cannot honour fp16 on {device} (fp16 autocast needs a GPU's gradient scaler); use bf16")
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    progress = progress and not cfg.disable_tqdm
    out_dir = Path(out)
    warm_dir = out_dir / "warmup"
    t0 = time.perf_counter()

    tok = load_tokenizer(tokenizer or student)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError(f"{tokenizer or student}: the tokenizer has neither a pad nor an EOS token to pad with")
    prompts, teacher, skipped = _prepare_data(data, tok, cfg, split, skip_bad)
    run_key = {**cfg.settings(), "data": _path_key(data), "student": _path_key(student),
               "discriminator": _path_key(discriminator), "tokenizer": _path_key(tokenizer), "split": split}

    def load_models(g_path: str, d_path: str):
        torch.manual_seed(cfg.seed)  # a new discriminator head is drawn from it
        G = AutoModelForCausalLM.from_pretrained(g_path).to(device).eval()  # eval: no dropout, ratio is exact
        D = Discriminator.from_pretrained(d_path).to(device).eval()
        if cfg.activation_checkpointing:
            for model in (G, D.backbone):
                _checkpoint_layers(model, cfg.activation_checkpointing_kwargs)
        width = G.get_output_embeddings().weight.shape[0]
        if width < len(tok):
            raise ValueError(f"{g_path}: the model's vocabulary ({width}) is smaller than the tokenizer's ({len(tok)})")
        return G, D

    def optimizers(G, D):
        adam = dict(weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                    **({"fused": True} if _plain(cfg.optim) == "adamw_torch_fused" else {}))
        return (torch.optim.AdamW(G.parameters(), lr=cfg.learning_rate, **adam),
                torch.optim.AdamW(D.parameters(), lr=cfg.d_lr, **adam))

    def run_stage(stage: str, stage_dir: Path, n_steps: int, start: tuple[str, str], ref_path: str | None):
        stage_dir.mkdir(parents=True, exist_ok=True)
        state = _load_state(stage_dir)
        if state is None and (stage_dir / "student").exists():
            logger.warning("%s: no %s beside the checkpoint (deleted?); starting this stage again", stage_dir, STATE)
        if state is not None:
            verify_file_record(stage_dir, state, STATE)  # a damaged checkpoint is named, never loaded
            _check_resume(stage_dir, state, run_key)
            if int(state["step"]) >= n_steps:  # finished already: nothing to load
                return list(state["history"])
            G, D = load_models(str(stage_dir / "student"), str(stage_dir / "discriminator"))
            opt_g, opt_d = optimizers(G, D)
            saved = torch.load(stage_dir / "optimizers.pt", map_location=device, weights_only=True)
            opt_g.load_state_dict(saved["student"])
            opt_d.load_state_dict(saved["discriminator"])
            step, history = int(state["step"]), list(state["history"])
        else:
            G, D = load_models(*start)
            opt_g, opt_d = optimizers(G, D)
            step, history = 0, []
        schedules = _schedules(cfg, (opt_g, opt_d), (cfg.learning_rate, cfg.d_lr), n_steps, step)
        amp_g, amp_d = _Precision(dtype, device.type), _Precision(dtype, device.type)
        log_every = _log_every(cfg.logging_steps, n_steps)
        ref = None
        if ref_path is not None:
            ref = AutoModelForCausalLM.from_pretrained(ref_path).to(device).eval().requires_grad_(False)

        def save():
            _save_checkpoint(stage_dir, G, tok, D, opt_g, opt_d, {"version": STATE_VERSION, "stage": stage,
                                                                  "step": step, "config": run_key,
                                                                  "history": history})

        bar = tqdm(range(step, n_steps), desc=f"GAD {stage}", disable=not progress, leave=False)
        for _ in bar:
            t_step = time.perf_counter()
            torch.manual_seed(_step_seed(cfg.seed, stage, step))
            idx = _batch_indices(len(prompts), cfg.batch_prompts, cfg.seed, stage, step)
            ps, ts = [prompts[i] for i in idx], [teacher[i] for i in idx]
            with amp_g.autocast():
                samples = rollout(G, ps, cfg.group_size, cfg.temperature, cfg.max_new_tokens, pad, tok.eos_token_id,
                                  device)
            rewards, t_scores, rec = _update_discriminator(D, opt_d, ps, ts, samples, cfg, pad, device, amp_d)
            if stage == "gad":
                adv = group_advantages(rewards, cfg.adv_eps, scale=cfg.scale_rewards,
                                       baseline=t_scores if cfg.baseline == "teacher" else None)
                rec.update(_update_generator_grpo(G, ref, opt_g, ps, samples, adv, cfg, pad, device, ts, amp_g))
            elif step >= cfg.warmup_d_only_steps:
                rec.update(_update_generator_sft(G, opt_g, ps, ts, cfg, pad, device, amp_g))
            step += 1
            _advance(schedules)
            rec = {"stage": stage, "step": step, **rec,
                   "sample_tokens": float(np.mean([len(s) for s in samples])),
                   "seconds": round(time.perf_counter() - t_step, 4)}
            history.append(rec)
            bar.set_postfix(d_acc=f"{rec['d_acc']:.2f}", reward=f"{rec['reward_mean']:.3f}")
            if step % log_every == 0:
                logger.info("GAD %s step %d/%d: %s", stage, step, n_steps,
                            {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
            if step % cfg.save_every == 0 or step == n_steps:
                save()
            if on_step is not None:
                on_step(rec)
        if not (stage_dir / STATE).exists():  # a stage of 0 steps still leaves its models in place
            save()
        return history

    history: list[dict[str, Any]] = []
    start = (student, discriminator or student)
    if cfg.warmup_steps:
        history += run_stage("warmup", warm_dir, cfg.warmup_steps, start, None)
        start = (str(warm_dir / "student"), str(warm_dir / "discriminator"))
    ref_path = start[0] if cfg.kl_coef > 0 else None  # the student the adversarial stage starts from
    history += run_stage("gad", out_dir, cfg.steps, start, ref_path)

    gad_rows = [h for h in history if h["stage"] == "gad"]
    summary = {
        "method": "gad", "data": str(data), "student": str(student), "discriminator": discriminator,
        "out": str(out_dir), "config": cfg.settings(), "records": len(prompts),
        "skipped_records": skipped,
        "warmup_steps_done": sum(h["stage"] == "warmup" for h in history), "steps_done": len(gad_rows),
        "final": gad_rows[-1] if gad_rows else None,
        "student_out": str(out_dir / "student"), "discriminator_out": str(out_dir / "discriminator"),
        "seconds": round(time.perf_counter() - t0, 4), "history": history,
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
