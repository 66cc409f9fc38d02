"""TRL's own trainers on the lab's data: the peer rows bayeskd's trainers are measured against, run through TRL
itself (its `SFTTrainer` and experimental `GKDTrainer`), not reimplemented.

- `trl-sft`: `SFTTrainer` on the teacher's samples as bayeskd tokenizes them (pre-tokenized `input_ids` with a
  `completion_mask`, `completion_only_loss=True`: TRL drops the mask silently unless asked), bayeskd SFT's budget
  and schedule. A sanity row: it should equal bayeskd's SFT.
- `trl-sft-text`: TRL's own text path (prompt / completion strings). TRL tokenizes prompt + completion itself and
  appends EOS to every completion, also to the samples the teacher's length limit cut, so its tokens are not the
  teacher's: the row shows what a user of TRL's default path gets on the same records.
- `trl-gkd-fkl`, `trl-gkd`, `trl-gkd-rkl`: `GKDTrainer` with the lab teacher in-process (white-box), fully on-policy
  (λ = 1), β = 0 (forward KL, the loss of bayeskd's rows), 0.5 (its default) and 1 (reverse KL). Its loss is
  divided by the step's own sampled tokens (`model_accepts_loss_kwargs` off: TRL otherwise divides by the
  teacher data's token count, which the on-policy batch replaced), bayeskd's normalization.

Every run writes `summary.json` with the keys of a bayeskd `distill` summary the lab reads (steps, train_tokens,
train_seconds); a finished run is reused.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayeskd.integrity import atomic_write_json

PEER_METHODS = ("trl-sft", "trl-sft-text")  # students from the lab's student init, at SFT's budget
GKD_BETAS = {"trl-gkd-fkl": 0.0, "trl-gkd": 0.5, "trl-gkd-rkl": 1.0}


def _common_args(kwargs: dict[str, Any], out: Path) -> dict[str, Any]:
    """TRL config arguments from a lab student's `distill` keywords: the same budget, optimizer schedule, seed and
    logging; TRL's defaults that differ from the lab's (bf16, gradient checkpointing, its learning rate) off."""
    keep = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type",
            "warmup_steps", "seed", "data_seed", "logging_steps", "disable_tqdm")
    return {**{k: kwargs[k] for k in keep if k in kwargs}, "output_dir": str(out), "save_strategy": "no",
            "report_to": [], "bf16": False, "fp16": False, "gradient_checkpointing": False}


def _counting(cls):
    """`cls` counting, as bayeskd's trainer does, the tokens each step reads and those it trains on (labels != -100
    after the shift); nothing else changes."""

    class Counting(cls):
        train_tokens = response_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.train_tokens += int(inputs["attention_mask"].sum())
                self.response_tokens += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    Counting.__name__ = f"Counting{cls.__name__}"
    return Counting


def _finish(trainer, tok, out: Path, t0: float, extra: dict[str, Any]) -> dict[str, Any]:
    seconds = time.perf_counter() - t0
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"trainer": type(trainer).__mro__[1].__name__, "steps": int(trainer.state.global_step),
               "train_tokens": int(trainer.train_tokens), "train_response_tokens": int(trainer.response_tokens),
               "train_seconds": round(seconds, 4),
               "first_loss": history[0]["loss"] if history else None,
               "final_loss": history[-1]["loss"] if history else None,
               "log_history": trainer.state.log_history, **extra}
    atomic_write_json(out / "summary.json", json.loads(json.dumps(summary, default=str)))
    return summary


def trl_sft(data: str, student: str, out: str | Path, kwargs: dict[str, Any], text: bool = False) -> Path:
    """TRL's SFTTrainer on the teacher records `data` from `student` into `out` (`text`: TRL's own tokenization of
    prompt / completion strings; otherwise bayeskd's tokens). `kwargs`: the lab's distill keywords (budget)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records

    out = Path(out)
    if (out / "summary.json").exists():
        return out
    tok = load_tokenizer(student)
    records, _ = load_teacher_records(data)
    if text:
        ds = Dataset.from_dict({"prompt": [r["prompt"] for r in records],
                                "completion": [r["response"] for r in records]})
    else:
        tokenized = tokenize_records(records, tok)
        ds = Dataset.from_dict({"input_ids": [ids.tolist() for ids in tokenized.input_ids],
                                "completion_mask": [m.astype(np.int64).tolist() for m in tokenized.response_mask]})
    args = SFTConfig(**_common_args(kwargs, out), completion_only_loss=True, packing=False)
    trainer = _counting(SFTTrainer)(model=AutoModelForCausalLM.from_pretrained(student), args=args,
                                    train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    _finish(trainer, tok, out, t0, {"mode": "trl-sft-text" if text else "trl-sft", "records": len(records)})
    return out


class PromptCollator:
    """GKD's batch from bayeskd's tokens: `prompts` left-padded (generation continues every row at its end) with
    `prompt_attention_mask`, and the teacher's full rows right-padded with `labels` on the response (used by GKD
    only when a step is off-policy: never at λ = 1)."""

    def __init__(self, pad_token_id: int):
        self.pad = int(pad_token_id)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(it["input_ids"], dtype=torch.long) for it in items]
        plen = [int(it["prompt_length"]) for it in items]
        B, width, pw = len(ids), max(len(x) for x in ids), max(plen)
        full = torch.full((B, width), self.pad, dtype=torch.long)
        attention = torch.zeros_like(full)
        labels = torch.full_like(full, -100)
        prompts = torch.full((B, pw), self.pad, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompts)
        for i, (x, p) in enumerate(zip(ids, plen)):
            full[i, :len(x)] = x
            attention[i, :len(x)] = 1
            labels[i, p:len(x)] = x[p:]
            prompts[i, pw - p:] = x[:p]
            prompt_mask[i, pw - p:] = 1
        return {"input_ids": full, "attention_mask": attention, "labels": labels, "prompts": prompts,
                "prompt_attention_mask": prompt_mask}


def trl_gkd(data: str, student: str, teacher: str, out: str | Path, kwargs: dict[str, Any], *, beta: float,
            max_new_tokens: int, temperature: float = 1.0, lmbda: float = 1.0) -> Path:
    """TRL's GKDTrainer from `student` with the white-box `teacher` in-process, on the prompts of the teacher
    records `data`: on-policy with probability `lmbda` per step, generalized JSD `beta`, the student sampling at
    `temperature` up to `max_new_tokens`. `kwargs`: the lab's distill keywords (budget, schedule, seed)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records

    out = Path(out)
    if (out / "summary.json").exists():
        return out
    tok = load_tokenizer(student)
    records, _ = load_teacher_records(data)
    tokenized = tokenize_records(records, tok)
    ds = Dataset.from_dict({"input_ids": [ids.tolist() for ids in tokenized.input_ids],
                            "prompt_length": [int(p) for p in tokenized.prompt_lengths]})
    args = GKDConfig(**_common_args(kwargs, out), lmbda=lmbda, beta=beta, temperature=temperature,
                     max_new_tokens=max_new_tokens, seq_kd=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trainer = _counting(GKDTrainer)(model=AutoModelForCausalLM.from_pretrained(student),
                                    teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=args,
                                    train_dataset=ds, processing_class=tok, data_collator=PromptCollator(pad))
    trainer.model_accepts_loss_kwargs = False  # the loss over the step's own tokens (the module docstring)
    t0 = time.perf_counter()
    trainer.train()
    _finish(trainer, tok, out, t0, {"mode": "trl-gkd", "beta": beta, "lmbda": lmbda, "temperature": temperature,
                                    "max_new_tokens": max_new_tokens, "records": len(records)})
    return out
