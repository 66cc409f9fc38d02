"""GAD's building blocks, apart from the job that trains with them (`bayeskd.distillation.gad`): the losses and
advantages (pure functions of tensors) and the discriminator model (a causal-LM backbone with a scalar head)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bayeskd.integrity import atomic_save_safetensors
from bayeskd.teacher_forcing import position_ids


# ---------------------------------------------------------------------------------------------------- losses

def bradley_terry_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """-log sigma(D(x, y_teacher) - D(x, y_student)): teacher_scores [P], student_scores [P, n] (n samples of
    prompt p); the mean over each prompt's group, then over prompts."""
    if teacher_scores.dim() != 1 or student_scores.dim() != 2 or student_scores.shape[0] != teacher_scores.shape[0]:
        raise ValueError(f"need teacher_scores [P] and student_scores [P, n], got {tuple(teacher_scores.shape)} "
                         f"and {tuple(student_scores.shape)}")
    return -F.logsigmoid(teacher_scores[:, None] - student_scores).mean()


def discriminator_accuracy(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> float:
    """Share of (teacher, student sample) pairs of the same prompt where the teacher scores strictly higher."""
    return float((teacher_scores[:, None] > student_scores).float().mean())


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, *, scale: bool = True,
                     baseline: torch.Tensor | None = None) -> torch.Tensor:
    """(r - b) / (std_group + eps) for rewards [P, n]: b is the group's mean (GRPO), or `baseline` [P] when given
    (e.g. D's score of the prompt's teacher response); std is the group's unbiased one (as TRL's GRPO). With
    `scale=False` the division is skipped (Dr. GRPO): the step then shrinks with D's confidence instead of being
    renormalised to unit size. A group whose rewards are all equal gets advantage 0 with the group mean."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"need rewards [P, n] with n >= 2 samples per prompt, got {tuple(rewards.shape)}")
    if baseline is None:
        b = rewards.mean(1, keepdim=True)
    elif baseline.shape != rewards.shape[:1]:
        raise ValueError(f"need a baseline [P] for rewards [P, n], got {tuple(baseline.shape)}")
    else:
        b = baseline[:, None].to(rewards.dtype)
    centred = rewards - b
    return centred / (rewards.std(1, keepdim=True) + eps) if scale else centred


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, clip: float = 0.2, ref_logprobs: torch.Tensor | None = None,
              kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss for [B, T] token log-probs under the current and the sampling policy, advantages [B] and a
    response mask [B, T]: per token -min(rho A, clip(rho, 1-clip, 1+clip) A) + kl_coef * k3, with
    rho = exp(logprobs - old_logprobs) and k3 = exp(ref - logprobs) - (ref - logprobs) - 1 (the unbiased,
    non-negative KL estimator of GRPO); averaged over each sequence's tokens, then over sequences.
    Returns (loss, stats: kl = mean k3 per token, clip_frac = share of tokens whose clipped term was taken)."""
    m = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None].to(logprobs.dtype)
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip, 1 + clip) * a
    per_token = -torch.minimum(unclipped, clipped)
    n_tok = m.sum().clamp(min=1)
    stats = {"clip_frac": float(((clipped < unclipped).to(m.dtype) * m).sum() / n_tok), "kl": 0.0}
    if ref_logprobs is not None:
        d = ref_logprobs - logprobs
        k3 = torch.exp(d) - d - 1
        stats["kl"] = float((k3.detach() * m).sum() / n_tok)
        if kl_coef:
            per_token = per_token + kl_coef * k3
    per_seq = (per_token * m).sum(1) / m.sum(1).clamp(min=1)
    return per_seq.mean(), stats


# ---------------------------------------------------------------------------------------------------- models

def _quiet_from_pretrained(cls, path: str, **kwargs):
    """`cls.from_pretrained` without transformers' load report (a CausalLM checkpoint loaded as a bare backbone
    reports its unused lm_head, which is expected here)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, **kwargs)
    finally:
        transformers.logging.set_verbosity(level)


class Discriminator(torch.nn.Module):
    """A causal-LM backbone (`AutoModel`) and a linear scalar head; the score of a sequence is the head's value
    at its last attended position (padding-aware through `attention_mask`, whatever the padding side).

    Not `AutoModelForSequenceClassification`: it picks the last token that is not the pad *id*, which is wrong
    when pad == EOS (common for Llama) or when a sample contains the pad token.
    """
    HEAD_FILE = "score_head.safetensors"

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            cfg = backbone.config.get_text_config()
            head = torch.nn.Linear(cfg.hidden_size, 1)
            torch.nn.init.normal_(head.weight, std=getattr(cfg, "initializer_range", 0.02))
            torch.nn.init.zeros_(head.bias)
        self.head = head

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "Discriminator":
        """The backbone of any HF checkpoint at `path` (a causal LM's base model, or a saved discriminator) and the
        head saved next to it; without a saved head, a new one (drawn from torch's global RNG)."""
        from transformers import AutoModel

        backbone = _quiet_from_pretrained(AutoModel, str(path), **kwargs)
        d = cls(backbone)
        head_path = Path(path) / cls.HEAD_FILE
        if head_path.exists():
            from safetensors.torch import load_file

            d.head.load_state_dict(load_file(str(head_path)))
        return d

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The backbone through HF's `save_pretrained`, the head as safetensors next to it."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(path))
        atomic_save_safetensors({k: v.detach().cpu() for k, v in self.head.state_dict().items()},
                                Path(path) / self.HEAD_FILE)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [B] (float32) of sequences [B, L]."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask)).last_hidden_state
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions * attention_mask.long()).argmax(-1)  # the last attended position of each row
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()
