"""Distillation training through the Hugging Face Trainer: sparse teacher targets, SFT and white-box logit KD.

Data flow
- `TeacherTargetsDataset` / `BayesKDCollator` (bayeskd.distillation.targets): records and the rows of their targets,
  in the row order of `bayeskd.teacher_forcing`.
- `BayesKDTrainer.compute_loss`: CE on the teacher tokens (mean over response tokens) x ce_weight + KD
  (mean over response tokens of `fused_posterior_kd` against the targets) x kd_weight. ce_weight defaults to 1
  for SFT and to KD_CE_WEIGHT beside KD (the lab's measured best: the CE term costs a KD student accuracy).

Modes: "sparse-targets" (a targets directory), "sft" (no targets: CE only, sequence-level KD), "white-box"
(a teacher model with the same vocabulary: targets are its top-k at the same positions, tail mass exact) and
"online-posterior" (a targets directory holding the PRIOR's top-K rows plus a proxy model: inside the step the
proxy runs on the same batch without gradient and its dense logits at the response positions go to
`fused_posterior_kd` with the prior rows, so the posterior is formed inside the loss; docs/MATH.md "Online mode").

On-policy (`BayesKDConfig.onpolicy_fraction` λ > 0, GKD's mix; bayeskd.distillation.onpolicy): before each step's
response tokens are counted (`get_batch_samples`), a share λ of every micro-batch's sequences is replaced by the
student's own samples for the same prompts (seeded by (seed, global step), so a resumed run samples the same).
Their targets (`onpolicy_targets`): "teacher", the white-box teacher run on the mixed batch; "posterior", the
prior's top-K rows at the student's contexts (`Prior.topk`, the prior itself given as `prior`) with the proxy run
online on the mixed batch, as the online-posterior mode does for teacher rows: no teacher call; "scored", that
posterior conditioned on a teacher server's scores of the samples (`scorer`,
bayeskd.distillation.onpolicy_scores: echo + logprobs, cached, budgeted), a finished target the fused online loss
cannot take, so the student's rows get their own KD call (`_scored_kd`). The student's tokens get KD only: the CE
term counts them as zeros (every token of the step still weighs alike).

Method "proxy-kd" (`BayesKDConfig.method`, with targets whose shards carry the per-row extras
`proxy_teacher_logprob`): each record gets the weight w = σ((s - μ)/γ) of
`bayeskd.distillation.targets.proxy_kd_weights` (s = the proxy's log p(y_T|x)), and the loss is CE x ce_weight +
proxy_kd_alpha x mean over response tokens of w(record) x KD.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from bayeskd.data import load_tokenized_records, load_tokenizer
from bayeskd.distillation.targets import (CONTEXT_COUNT_KEY, WEIGHT_KEY, WEIGHT_NORMALIZATIONS, BayesKDCollator,
                                          TeacherTargetsDataset)
from bayeskd.losses.linear import fused_linear_ce, fused_linear_kd_and_ce, uses_cut_kernel
from bayeskd.losses.divergences import DIVERGENCES, resolve_beta, row_divergence
from bayeskd.losses.fused import fused_posterior_kd
from bayeskd.core.sparse import SparseDist
from bayeskd.core.names import CONTEXT_COUNT, MODES, TEACHER_LOGPROB
from bayeskd.teacher_forcing import model_logits, select_rows
from bayeskd.distillation.checkpoints import ChecksumCallback, checkpoints, remove_unrecorded, resume_point
from bayeskd.distillation.onpolicy import (ONPOLICY_KEY, SCORED_KEYS, build_batch, choose_rows, prior_rows,
                                           prompt_lengths, sample_responses, scored_evidence, scored_targets,
                                           step_seed)
from bayeskd.integrity import atomic_write_json, staged_dir
from bayeskd.locks import locks_output
from bayeskd.resume import RUN_ONLY_ARGS, as_json, check_settings, read_stamp

logger = logging.getLogger(__name__)

METHODS = ("bayeskd", "proxy-kd")
ONPOLICY_TARGETS = ("auto", "posterior", "teacher", "scored")
# The defaults of a KD student, as the lab measured them (`bayeskd lab run`: chosen on validation prompts, reported
# on held-out ones; benchmarks/results/lab_tiny.md): the CE term on the teacher's tokens beside KD, and the
# white-box teacher's K (0: the whole vocabulary, the true upper bound).
KD_CE_WEIGHT = 0.0
WHITEBOX_TOP_K = 0


def resolve_ce_weight(ce_weight: float | None, has_targets: bool) -> float:
    """The CE weight a run uses: as given, else 1 for SFT (CE is its only loss) and KD_CE_WEIGHT beside KD."""
    if ce_weight is not None:
        return float(ce_weight)
    return KD_CE_WEIGHT if has_targets else 1.0


# ---------------------------------------------------------------------------------------------------- config

@dataclass
class BayesKDConfig(transformers.TrainingArguments):
    """`TrainingArguments` plus the distillation loss settings and the student's LoRA adapter: the `distill` job's
    one config. Every field is a `bayeskd distill` option (`bayeskd.cli_config.config_options`), so each default
    is written here once; `distill`'s own defaults override transformers' where they differ (one epoch, a log line
    every 10 steps, no reporting, the target columns kept, a rerun resuming from the newest checkpoint)."""
    ce_weight: float | None = field(default=None, metadata={
        "help": "Weight of the CE term on the teacher's tokens. Default: 1 for SFT (no targets); 0 beside KD "
                "(KD_CE_WEIGHT, the lab's measured best: the CE term cost KD students 0.1+ nats of KL).", "min": 0})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the KD term against the targets."})
    divergence: str = field(default="forward_kl", metadata={"help": "The KD divergence.", "choices": DIVERGENCES})
    beta: float | None = field(default=None, metadata={"help": "JSD β (default 0.5) or skew-KL α (default 0.1)."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Temperature of target and student in the KD."})
    kd_tail: str = field(default="bucket", metadata={
        "help": "The mass outside the top-K: one bucket, or ignored.", "choices": ("bucket", "ignore")})
    max_length: int | None = field(default=None, metadata={
        "help": "Truncate sequences to this many tokens.", "min": 2})
    fused_backend: str = field(default="auto", metadata={
        "help": "Fused KD backend.", "choices": ("auto", "torch", "triton")})
    fused_linear: bool = field(default=False, metadata={
        "help": "Hidden states and lm_head to the loss (CE and KD): the [N, V] logits are never built (row chunks; "
                "bayeskd.losses.linear). DDP-safe, not for FSDP."})
    cut_logits: bool = field(default=False, metadata={
        "help": "As --fused-linear, through the cut-logits Triton kernel (logits only as on-chip tiles, recomputed "
                "in backward; CUDA). The PyTorch backend has no cut kernel: there the chunked op runs."})
    whitebox_top_k: int = field(default=WHITEBOX_TOP_K, metadata={
        "help": "White-box mode: KD against the teacher's top-K logits (0: the whole vocabulary, the lab's best).",
        "min": 0})
    posterior_mode: str = field(default="log_linear", metadata={
        "help": "Online posterior (--proxy): log_linear (p ∝ p0^a q^b), dirichlet (c) or mixture (w).",
        "choices": MODES})
    posterior_a: float = field(default=1.0, metadata={"help": "Log-linear prior exponent."})
    posterior_b: float = field(default=1.0, metadata={"help": "Log-linear proxy exponent."})
    posterior_c: float = field(default=1.0, metadata={"help": "Dirichlet concentration."})
    posterior_w: float = field(default=0.5, metadata={"help": "Mixture weight of the prior.", "min": 0, "max": 1})
    posterior_evidence: float = field(default=0.0, metadata={"help": "Observations of the teacher token added."})
    onpolicy_fraction: float = field(default=0.0, metadata={
        "help": "On-policy distillation (GKD's mix): this share of each batch's sequences is replaced by the "
                "student's own samples for the same prompts, learned by KD only (0: teacher data only).",
        "min": 0, "max": 1})
    onpolicy_targets: str = field(default="auto", metadata={
        "help": "Targets at the student's samples: posterior (--prior's rows at the student's contexts x --proxy "
                "online, no teacher call), scored (that posterior conditioned on the teacher server's scores of "
                "the samples: --teacher-url, echo + logprobs), teacher (the white-box --teacher's logits), auto "
                "(teacher with --teacher, scored with --teacher-url, else posterior).",
        "choices": ONPOLICY_TARGETS})
    onpolicy_temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature of the student's samples.", "min": 0, "min_open": True})
    onpolicy_max_new_tokens: int = field(default=128, metadata={
        "help": "Most tokens the student samples per response (and never past max_length).", "min": 1})
    onpolicy_score_top_k: int = field(default=20, metadata={
        "help": "Scored targets: the teacher's top-k alternatives asked per sampled token (0: only the sampled "
                "token's log-probability, the per-token reverse-KL recipe; vLLM allows 20 by default).", "min": 0})
    onpolicy_score_budget: int | None = field(default=None, metadata={
        "help": "Scored targets: the most scoring requests (one per sample) over the run, resumed runs included "
                "(the cache's answers count); once spent, unscored samples get posterior targets (default: no "
                "limit).", "min": 0})
    method: str = field(default="bayeskd", metadata={
        "help": "proxy-kd: weight each record's KD term by the proxy's likelihood of the teacher response "
                "(--targets must carry the proxy's teacher-token log-probabilities).", "choices": METHODS})
    proxy_kd_alpha: float = field(default=1.0, metadata={"help": "proxy-kd: weight α of the weighted KD term.",
                                                         "min": 0})
    proxy_kd_normalization: str = field(default="sequence", metadata={
        "help": "proxy-kd: the proxy's log-likelihood summed over the response or averaged per token.",
        "choices": WEIGHT_NORMALIZATIONS, "flags": ("--weight-normalization", "--proxy-kd-normalization")})
    # the student through a LoRA adapter (the `peft` extra), as TRL's ModelConfig spells it
    use_peft: bool = field(default=False, metadata={
        "help": "Train a LoRA adapter instead of the whole student (pip install bayeskd[peft]); OUT holds the "
                "merged student and the adapter in OUT/adapter."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank.", "min": 1})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA α (the update is scaled by α / r).", "min": 1})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path.", "min": 0, "max": 1})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Modules that get an adapter (repeatable; default: all linear layers but the lm_head)."})
    # transformers' defaults that distill changes
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the data."})
    logging_steps: float = field(default=10, metadata={
        "help": "Log every N steps (a float < 1: that share of the run's steps).", "min": 0, "min_open": True})
    save_steps: float = field(default=500, metadata={
        "help": "Save a checkpoint every N steps (0: none); a rerun of the same command resumes from the newest "
                "intact one (damaged ones are skipped with a warning).", "min": 0})
    resume_from_checkpoint: str | None = field(default="latest", metadata={
        "help": "A checkpoint folder to resume from, 'latest' (the newest intact one in the output directory, if "
                "any) or 'none'."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the target columns."})
    report_to: None | str | list[str] = field(default=None, metadata={
        "help": "Integrations to report to (repeatable: wandb, tensorboard, trackio, ..., 'all'); default none."})

    def __post_init__(self):
        if self.report_to is None:
            self.report_to = []
        if self.save_steps == 0:  # no checkpoints
            self.save_strategy = "no"
        if isinstance(self.resume_from_checkpoint, str) and self.resume_from_checkpoint.lower() == "none":
            self.resume_from_checkpoint = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # Launched by torchrun on CPUs: without use_cpu, accelerate leaves the model unwrapped and every rank
            # trains alone on its share of the data (no gradient all-reduce). gloo is the CPU backend.
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        if self.bf16 and not torch.cuda.is_available():  # bf16 autocast on the CPU instead of a refusal
            self.use_cpu = True
        super().__post_init__()
        if (self.ce_weight is not None and self.ce_weight < 0) or self.kd_weight < 0:
            raise ValueError(f"ce_weight and kd_weight must be >= 0, got {self.ce_weight}, {self.kd_weight}")
        if self.kd_tail not in ("bucket", "ignore"):
            raise ValueError(f"kd_tail must be 'bucket' or 'ignore', got {self.kd_tail!r}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.whitebox_top_k < 0:
            raise ValueError(f"whitebox_top_k must be >= 0 (0: the whole vocabulary), got {self.whitebox_top_k}")
        if self.posterior_mode not in MODES:
            raise ValueError(f"posterior_mode must be one of {MODES}, got {self.posterior_mode!r}")
        if not 0.0 <= self.posterior_w <= 1.0:
            raise ValueError(f"posterior_w must be in [0, 1], got {self.posterior_w}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.proxy_kd_normalization not in WEIGHT_NORMALIZATIONS:
            raise ValueError(f"proxy_kd_normalization must be one of {WEIGHT_NORMALIZATIONS}, got "
                             f"{self.proxy_kd_normalization!r}")
        if self.proxy_kd_alpha < 0:
            raise ValueError(f"proxy_kd_alpha must be >= 0, got {self.proxy_kd_alpha}")
        if self.method == "proxy-kd" and self.kd_weight != 1.0:
            raise ValueError("method='proxy-kd' weights the KD term with proxy_kd_alpha; leave kd_weight at 1.0 "
                             f"(got {self.kd_weight})")
        if not 0.0 <= self.onpolicy_fraction <= 1.0:
            raise ValueError(f"onpolicy_fraction must be in [0, 1], got {self.onpolicy_fraction}")
        if self.onpolicy_targets not in ONPOLICY_TARGETS:
            raise ValueError(f"onpolicy_targets must be one of {ONPOLICY_TARGETS}, got {self.onpolicy_targets!r}")
        budget = self.onpolicy_score_budget
        if self.onpolicy_score_top_k < 0 or (budget is not None and budget < 0):
            raise ValueError(f"onpolicy_score_top_k and onpolicy_score_budget must be >= 0, got "
                             f"{self.onpolicy_score_top_k}, {self.onpolicy_score_budget}")
        if not self.onpolicy_temperature > 0 or self.onpolicy_max_new_tokens < 1:
            raise ValueError(f"onpolicy_temperature must be > 0 and onpolicy_max_new_tokens >= 1, got "
                             f"{self.onpolicy_temperature}, {self.onpolicy_max_new_tokens}")
        if not self.posterior_c > 0 or self.posterior_evidence < 0:
            raise ValueError(f"posterior_c must be > 0 and posterior_evidence >= 0, got {self.posterior_c}, "
                             f"{self.posterior_evidence}")


def resolve_onpolicy_targets(cfg: transformers.TrainingArguments, teacher: bool, proxy: bool,
                             prior: bool, server: bool = False) -> str | None:
    """Where an on-policy run's targets at the student's samples come from ("teacher", "posterior" or "scored"),
    or None when the run is off-policy (onpolicy_fraction 0); a clear error when the run cannot give them."""
    if not getattr(cfg, "onpolicy_fraction", 0.0):
        if server:
            raise ValueError("a teacher server scores the student's samples in on-policy training only "
                             "(onpolicy_fraction > 0)")
        return None
    kind = getattr(cfg, "onpolicy_targets", "auto")
    if kind == "auto":
        kind = "teacher" if teacher else ("scored" if server else "posterior") if proxy else None
    if kind is None:
        raise ValueError("on-policy training (onpolicy_fraction > 0) needs targets at the student's samples: a "
                         "white-box teacher (onpolicy_targets='teacher') or a proxy with the prior "
                         "(onpolicy_targets='posterior'); sparse targets and SFT have none there")
    if kind == "teacher" and not teacher:
        raise ValueError("onpolicy_targets='teacher' needs a white-box teacher model (--teacher)")
    if kind in ("posterior", "scored") and not (proxy and prior):
        raise ValueError(f"onpolicy_targets='{kind}' needs the proxy (--proxy, with the prior's top-K rows as "
                         "--targets) and the prior itself (--prior: an estimate-prior output) to query at the "
                         f"student's contexts; got {'a' if proxy else 'no'} proxy and {'a' if prior else 'no'} prior")
    if (kind == "scored") != server:
        raise ValueError("onpolicy_targets='scored' needs the teacher server that scores the samples "
                         "(--teacher-url and --teacher-model)" if kind == "scored" else
                         f"a teacher server (--teacher-url) scores samples for onpolicy_targets='scored' only, "
                         f"not '{kind}'")
    if getattr(cfg, "method", "bayeskd") == "proxy-kd":
        raise ValueError("method='proxy-kd' weights records of the teacher's data; it has no on-policy form")
    if kind in ("posterior", "scored") and getattr(cfg, "posterior_evidence", 0.0):
        raise ValueError("posterior_evidence adds observations of the teacher's token; the student's samples have "
                         "none (use posterior_evidence=0 with on-policy training)")
    return kind


def _lm_head_loss(cfg: BayesKDConfig, device: torch.device) -> str:
    """How the loss met the lm_head: "logits" (the model's), "chunked" or "cut" (the cut-logits kernel; without
    the Triton backend cut_logits runs the chunked op, and the summary says so)."""
    if uses_cut_kernel(cfg.cut_logits, cfg.fused_backend, device):
        return "cut"
    return "chunked" if cfg.fused_linear or cfg.cut_logits else "logits"


# ---------------------------------------------------------------------------------------------------- trainer

def _teacher_rows_mean(ce_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
    """The CE of an on-policy batch: the rows of the teacher's tokens summed, over all the batch's rows (the
    student's samples count as zeros, so every response token of the step weighs alike)."""
    return (ce_rows.float() * teacher_rows).sum() / ce_rows.shape[0]


def whitebox_targets(teacher_logits: torch.Tensor, k: int) -> SparseDist:
    """Top-k of a teacher's logits [M, V] as a SparseDist (float32), tail = the exact mass outside the top-k."""
    lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    k = min(k, lp.shape[-1])
    top_lp, top_idx = lp.topk(k, dim=-1)
    tail = (1.0 - top_lp.exp().sum(-1)).clamp(min=0.0)
    if k == lp.shape[-1]:
        tail = torch.zeros_like(tail)
    return SparseDist(top_idx.to(torch.int32), top_lp, tail, lp.shape[-1])


class _HiddenStatesOut(torch.nn.Module):
    """Stands in for the lm_head during one forward: returns its input (the last hidden states), keeping the real
    lm_head as a submodule so the parameters the wrappers (DDP) registered stay where they were."""

    def __init__(self, lm_head: torch.nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # A zero that depends on the lm_head weight: DDP with find_unused_parameters (the Trainer's default)
        # would otherwise mark the weight unused at the end of forward, then again when the loss's gradient
        # reaches it ("mark a variable ready only once").
        return hidden + self.lm_head.weight.view(-1)[:1].sum() * 0


@contextmanager
def _hidden_states_out(model):
    """Make `model`'s forward return its last hidden states as `logits`; yields the lm_head (Linear, no bias)."""
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "get_output_embeddings"):  # DDP and friends
        inner = inner.module
    lm_head = inner.get_output_embeddings()
    if not isinstance(lm_head, torch.nn.Linear) or lm_head.bias is not None:
        raise ValueError(f"fused_linear needs an lm_head that is a Linear without bias, got {lm_head!r}")
    for key in ("final_logit_softcapping", "logit_scale"):  # applied after the lm_head: they would hit hidden states
        if getattr(inner.config, key, None) not in (None, 1.0):
            raise ValueError(f"fused_linear does not support models whose config sets {key}")
    inner.set_output_embeddings(_HiddenStatesOut(lm_head))
    try:
        yield lm_head
    finally:
        inner.set_output_embeddings(lm_head)


def lora_config(cfg: BayesKDConfig):
    """The LoRA adapter `cfg` asks for (`use_peft`, `lora_*`), or None."""
    if not cfg.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ValueError("use_peft needs the peft package: pip install 'bayeskd[peft]'") from e
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules or []) or "all-linear", task_type="CAUSAL_LM")


def with_adapter(model: torch.nn.Module, peft_config: Any, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """`model` wrapped in the adapter of `peft_config` (a `peft.PeftConfig`): only the adapter's parameters train."""
    try:
        from peft import get_peft_model
    except ImportError as e:
        raise ValueError("peft_config needs the peft package: pip install 'bayeskd[peft]'") from e
    if gradient_checkpointing:  # the frozen embeddings give no grad to checkpoint through otherwise
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


class BayesKDTrainer(transformers.Trainer):
    """`transformers.Trainer` with the distillation loss (see the module docstring).

    `teacher_model`: a readable teacher with the student's vocabulary (white-box mode: ordinary logit KD against
    its top-`whitebox_top_k` at every response position). Without it, the batch's sparse targets are used when
    present, else the loss is CE only (SFT). Logs `ce_loss` / `kd_loss`: their means since the last log.

    With `fused_linear` (a `BayesKDConfig` field) the student's last hidden states and lm_head weight go to the
    loss: CE (as the KL from the teacher token's one-hot) and KD run through `fused_linear_posterior_kd`, and the
    student's [N, V] logits are never built. The outputs returned with `return_outputs` then carry the hidden
    states as `logits`. `cut_logits` does the same through the cut-logits kernel (Triton backend).

    `peft_config` (a `peft.PeftConfig`, as TRL's trainers take it): the model is wrapped in that adapter and only
    the adapter trains (`BayesKDConfig.use_peft` builds a LoRA one: `lora_config`).

    `proxy_model` (online-posterior mode): the batch's targets are the PRIOR's top-K rows; the proxy runs on the
    same batch (eval, no gradient) and its logits at the response positions (sliced to the student's V) are the
    dense proxy of `fused_posterior_kd(rows, prior_rows, proxy_rows, mode=posterior_mode, a, b, c, w)`.

    `prior` (a `bayeskd.priors.base.Prior`, on-policy posterior targets): queried at the student's samples for
    their prior rows (K = the batch's). `mix_onpolicy` is the step's on-policy batch (the module docstring).
    `scorer` (a `bayeskd.distillation.onpolicy_scores.SampleScorer`, on-policy scored targets): the teacher
    server's evidence at the student's samples; the student's rows then get that posterior conditioned on it.
    """

    def __init__(self, model: torch.nn.Module | None = None, args: transformers.TrainingArguments | None = None,
                 *rest, teacher_model: torch.nn.Module | None = None, proxy_model: torch.nn.Module | None = None,
                 peft_config: Any = None, prior: Any = None, scorer: Any = None, **kwargs):
        if teacher_model is not None and proxy_model is not None:
            raise ValueError("give either teacher_model (white-box) or proxy_model (online posterior), not both")
        self.onpolicy = resolve_onpolicy_targets(args, teacher_model is not None, proxy_model is not None,
                                                 prior is not None, scorer is not None) if args is not None else None
        self.scorer = scorer
        if peft_config is not None:  # as TRL's trainers: the student trains through the adapter only
            checkpointing = bool(args and (args.gradient_checkpointing or getattr(args, "activation_checkpointing", 0)))
            model = with_adapter(model, peft_config, gradient_checkpointing=checkpointing)
        super().__init__(model, args, *rest, **kwargs)
        # The loss is the mean over the response tokens of the whole optimizer step (every micro-batch of every
        # rank): compute_loss weights its micro-batch mean by its share of them (`_get_num_items_in_batch`), so
        # unequal response lengths across ranks or accumulation steps weigh every token alike.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            self.teacher_model = teacher_model.to(self.args.device)
        self.proxy_model = proxy_model
        if proxy_model is not None:
            proxy_model.eval()
            proxy_model.requires_grad_(False)
            self.proxy_model = proxy_model.to(self.args.device)
        self._acc = {"ce_loss": 0.0, "kd_loss": 0.0, "n": 0, "kd_n": 0}
        self.train_tokens = 0  # every token the student read (prompts included)
        self.response_tokens = 0  # the tokens it was trained to predict
        self.prior = prior
        self.onpolicy_stats = {"sequences": 0, "tokens": 0, "seconds": 0.0}

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The step's micro-batches, on-policy ones mixed in (`mix_onpolicy`) before their tokens are counted."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.onpolicy is None or not batch_samples:
            return batch_samples, num_items
        step = self.state.global_step  # the steps done: a run resumed from checkpoint-s samples step s + 1 alike
        # every micro-batch sampled first, then the teacher's scores (asked as each was built) collected
        started = [self._start_mix(b, step, micro=i) for i, b in enumerate(batch_samples)]
        batch_samples = [self._finish_mix(out, pending) for out, pending in started]
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def mix_onpolicy(self, inputs: dict[str, torch.Tensor], step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """`inputs` (a collated batch) with a share `onpolicy_fraction` of its sequences replaced by the student's
        samples for their prompts, drawn from the seed of (seed, `step`, `micro`, rank); `onpolicy_mask` marks
        them. Their targets: the prior's rows at their contexts when the batch holds prior rows (posterior), else
        none (the white-box teacher runs on the mixed batch in `compute_loss`); scored targets add the teacher's
        evidence at the samples (`SCORED_KEYS`)."""
        return self._finish_mix(*self._start_mix(inputs, step, micro))

    def _finish_mix(self, out: dict[str, torch.Tensor], pending: tuple | None) -> dict[str, torch.Tensor]:
        """A batch of `_start_mix` with the teacher's evidence at the samples, once the server has answered."""
        if pending is None:
            return out
        t0 = time.perf_counter()
        rows, responses, evidence = pending
        out.update(scored_evidence(out, rows, responses, evidence.result()))
        self.onpolicy_stats["seconds"] += time.perf_counter() - t0
        return out

    def _start_mix(self, inputs: dict[str, torch.Tensor], step: int, micro: int = 0
                   ) -> tuple[dict[str, torch.Tensor], tuple | None]:
        """`mix_onpolicy`'s batch before the teacher's scores, and for scored targets (rows, responses, the
        scorer's pending evidence): the server answers while the prior rows and the batch are built and the step's
        next micro-batches sampled (else None)."""
        cfg = self.args
        t0 = time.perf_counter()
        seed = step_seed(cfg.seed, step, micro, cfg.process_index)
        rows = choose_rows(int(inputs["input_ids"].shape[0]), cfg.onpolicy_fraction, seed)
        if len(rows) == 0:
            return inputs, None
        plens = prompt_lengths(inputs)
        prompts = [inputs["input_ids"][j, :int(plens[j])] for j in rows.tolist()]
        cap = cfg.onpolicy_max_new_tokens
        max_new = [cap if cfg.max_length is None else max(1, min(cap, cfg.max_length - len(p))) for p in prompts]
        model = self.accelerator.unwrap_model(self.model)
        pad, eos = self._special_ids(model)
        responses = sample_responses(model, prompts, temperature=cfg.onpolicy_temperature, max_new_tokens=max_new,
                                     pad_token_id=pad, eos_token_id=eos, seed=seed)
        pending = None
        if self.onpolicy == "scored":  # asked now, answered while the prior rows and the batch are built
            pending = (rows, responses, self.scorer.submit(prompts, responses))
        student_targets = None
        if "target_indices" in inputs:
            if self.onpolicy not in ("posterior", "scored") or self.prior is None:
                raise ValueError("on-policy samples in a batch of targets need the prior (onpolicy_targets="
                                 "'posterior' or 'scored' with a prior)")
            student_targets = prior_rows(self.prior, prompts, responses, int(inputs["target_indices"].shape[1]))
        out = build_batch(inputs, rows, prompts, responses, pad, student_targets)
        st = self.onpolicy_stats
        st["sequences"] += len(rows)
        st["tokens"] += int(sum(len(r) for r in responses))
        st["seconds"] += time.perf_counter() - t0
        return out, pending

    def _special_ids(self, model) -> tuple[int, int | None]:
        """(pad, eos) token ids for sampling: the collator's pad and the tokenizer's EOS (else the model's)."""
        tok = self.processing_class
        eos = getattr(tok, "eos_token_id", None)
        if eos is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = getattr(self.data_collator, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "pad_token_id", None)
        pad = pad if pad is not None else (eos if eos is not None else 0)
        return int(pad), eos

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Response tokens (loss rows) in the step's micro-batches, summed over the ranks."""
        n = torch.tensor(sum(int(b["response_mask"][:, 1:].sum()) for b in batch_samples), device=device)
        return self.accelerator.gather(n).sum() if self.args.world_size > 1 else n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.args
        input_ids, attention = inputs["input_ids"], inputs["attention_mask"]
        rmask = inputs["response_mask"]
        lm_head = None
        cut = getattr(cfg, "cut_logits", False)
        if getattr(cfg, "fused_linear", False) or cut:
            # rows are the student's last hidden states [M, H]; the loss applies lm_head (row chunks or tiles)
            with _hidden_states_out(model) as lm_head:
                out = model(input_ids=input_ids, attention_mask=attention)
        else:
            out = model(input_ids=input_ids, attention_mask=attention)
        rows = select_rows(out.logits, rmask)  # [M, V] (or [M, H]) in the targets' row order
        tokens = select_rows(input_ids[:, 1:], rmask, shifted=True)
        if rows.shape[0] == 0:  # no response token in this batch (e.g. all truncated): a zero loss with a graph
            zero = out.logits.sum() * 0.0
            return (zero, out) if return_outputs else zero
        V = rows.shape[-1] if lm_head is None else lm_head.weight.shape[0]
        backend = getattr(cfg, "fused_backend", "auto")
        teacher_rows = None  # on-policy: the rows of the teacher's tokens (the student's samples get no CE)
        if ONPOLICY_KEY in inputs:
            grid = ~inputs[ONPOLICY_KEY].to(rmask.device)[:, None].expand(-1, rmask.shape[1] - 1)
            teacher_rows = select_rows(grid, rmask, shifted=True).to(rows.device)
        if lm_head is not None:
            ce = None  # hidden states: with the KD below
        elif teacher_rows is None:
            ce = F.cross_entropy(rows.float(), tokens)
        else:
            ce = _teacher_rows_mean(F.cross_entropy(rows.float(), tokens, reduction="none"), teacher_rows)

        target = dense_teacher = None
        if self.teacher_model is not None:
            with torch.no_grad():
                t_logits = select_rows(model_logits(self.teacher_model, input_ids, attention), rmask)
            if t_logits.shape[-1] != V:
                raise ValueError(f"teacher vocabulary {t_logits.shape[-1]} != student vocabulary {V}")
            k = getattr(cfg, "whitebox_top_k", WHITEBOX_TOP_K) or V
            if k >= V and lm_head is None:  # the whole vocabulary: dense, no top-k sort or sparse scatter (~50x)
                dense_teacher = t_logits
            else:
                target = whitebox_targets(t_logits, k)
        elif "target_indices" in inputs:
            extras = {CONTEXT_COUNT: inputs[CONTEXT_COUNT_KEY]} if CONTEXT_COUNT_KEY in inputs else {}
            target = SparseDist(inputs["target_indices"], inputs["target_logprobs"], inputs["target_tail"], V,
                                extras=extras)
            if target.num_rows != rows.shape[0]:
                raise ValueError(f"{target.num_rows} target rows for {rows.shape[0]} response tokens")
        elif self.proxy_model is not None:
            raise ValueError("online-posterior mode needs the prior's top-K rows in the batch (a targets directory)")
        proxy_rows, posterior = None, {}
        if self.proxy_model is not None and target is not None:
            proxy_rows = self._proxy_rows(input_ids, attention, rmask, V)
            posterior = dict(mode=getattr(cfg, "posterior_mode", "log_linear"), a=getattr(cfg, "posterior_a", 1.0),
                             b=getattr(cfg, "posterior_b", 1.0), c=getattr(cfg, "posterior_c", 1.0),
                             w=getattr(cfg, "posterior_w", 0.5))
            evidence = getattr(cfg, "posterior_evidence", 0.0)
            if evidence:
                posterior.update(teacher_tokens=tokens, evidence=evidence)
        kd = None
        proxy_kd = getattr(cfg, "method", "bayeskd") == "proxy-kd"
        if target is not None and rows.shape[0] > 0:
            target = target.to(rows.device)
            loss_kw = dict(divergence=getattr(cfg, "divergence", "forward_kl"), beta=getattr(cfg, "beta", None),
                           temperature=getattr(cfg, "kd_temperature", 1.0), tail=getattr(cfg, "kd_tail", "bucket"),
                           backend=backend)
            if SCORED_KEYS[0] in inputs:  # scored samples: the student's rows against their own finished target
                per_row, ce = self._scored_kd(rows, lm_head, tokens, target, proxy_rows, posterior, loss_kw, cut,
                                              teacher_rows, inputs, ce)
            elif lm_head is None:
                per_row = fused_posterior_kd(rows, target, proxy_rows, **posterior, **loss_kw, inplace=False)
            else:  # CE and KD from the hidden states: one pass over the logits with the cut kernel
                per_row, ce_rows = fused_linear_kd_and_ce(rows, lm_head.weight, tokens, target, proxy_rows,
                                                          **posterior, **loss_kw, cut=cut)
                ce = ce_rows.mean() if teacher_rows is None else _teacher_rows_mean(ce_rows, teacher_rows)
            if proxy_kd:
                if WEIGHT_KEY not in inputs:
                    raise ValueError("method='proxy-kd' needs per-row weights in the batch (a TeacherTargetsDataset "
                                     "made with weight_normalization)")
                per_row = per_row * inputs[WEIGHT_KEY].to(per_row.device)
            kd = per_row.mean()
        elif dense_teacher is not None and rows.shape[0] > 0:  # the same divergence on the dense distributions
            T, divergence = getattr(cfg, "kd_temperature", 1.0), getattr(cfg, "divergence", "forward_kl")
            per_row = row_divergence(torch.log_softmax(dense_teacher.float() / T, dim=-1),
                                     torch.log_softmax(rows.float() / T, dim=-1), divergence,
                                     resolve_beta(divergence, getattr(cfg, "beta", None)))
            kd = per_row.mean()
        if ce is None:  # hidden states, no targets
            ce = fused_linear_ce(rows, lm_head.weight, tokens, cut=cut, backend=backend).mean()
        ce_w = resolve_ce_weight(getattr(cfg, "ce_weight", None), target is not None or dense_teacher is not None)
        kd_w = getattr(cfg, "proxy_kd_alpha", 1.0) if proxy_kd else getattr(cfg, "kd_weight", 1.0)
        loss = ce * ce_w if ce_w else ce * 0.0
        if kd is not None and kd_w:
            loss = loss + kd * kd_w
        if num_items_in_batch is not None:  # this micro-batch's share of the step's tokens; DDP averages ranks
            loss = loss * (rows.shape[0] * self.args.world_size / float(num_items_in_batch))

        if model.training:
            self._acc["ce_loss"] += float(ce.detach())
            self._acc["n"] += 1
            if kd is not None:
                self._acc["kd_loss"] += float(kd.detach())
                self._acc["kd_n"] += 1
            self.train_tokens += int(attention.sum())
            self.response_tokens += int(rows.shape[0])
        return (loss, out) if return_outputs else loss

    def _scored_kd(self, rows, lm_head, tokens, target, proxy_rows, posterior, loss_kw, cut, teacher_rows, inputs,
                   ce) -> tuple[torch.Tensor, torch.Tensor]:
        """KD of an on-policy batch with scored samples, in two calls: the teacher's rows against the posterior the
        fused loss forms (prior rows x the proxy online), the student's against that posterior conditioned on the
        teacher's scores (`onpolicy.scored_targets`: a finished sparse target, which the fused online path cannot
        take). Returns (per-row KD, the teacher's rows first, then the student's; the CE, from the hidden states
        where the loss has them: the teacher's rows summed over all rows)."""
        if proxy_rows is None:
            raise ValueError("scored on-policy targets need the proxy (online-posterior mode)")
        teacher_rows = teacher_rows.bool()
        t_at, s_at = teacher_rows.nonzero()[:, 0], (~teacher_rows).nonzero()[:, 0]
        if len(s_at) != inputs[SCORED_KEYS[0]].shape[0]:
            raise ValueError(f"{inputs[SCORED_KEYS[0]].shape[0]} rows of the teacher's scores for {len(s_at)} rows "
                             "of the student's samples")
        calls = [(t_at, target[t_at], proxy_rows[t_at], posterior)] if len(t_at) else []
        if len(s_at):
            cond = scored_targets(target[s_at], proxy_rows[s_at], {k: inputs[k] for k in SCORED_KEYS},
                                  **{k: posterior[k] for k in ("mode", "a", "b", "c", "w")})
            calls.append((s_at, cond, None, {}))
        parts, ce_sum = [], None
        for at, tgt, prx, post in calls:
            if lm_head is None:
                parts.append(fused_posterior_kd(rows[at], tgt, prx, **post, **loss_kw, inplace=False))
            else:
                per_row, ce_rows = fused_linear_kd_and_ce(rows[at], lm_head.weight, tokens[at], tgt, prx, **post,
                                                          **loss_kw, cut=cut)
                parts.append(per_row)
                if prx is not None:
                    ce_sum = ce_rows.float().sum()
        if lm_head is not None:
            ce = (ce_sum if ce_sum is not None else rows.sum() * 0.0) / rows.shape[0]
        return torch.cat(parts), ce

    @torch.no_grad()
    def _proxy_rows(self, input_ids: torch.Tensor, attention: torch.Tensor, response_mask: torch.Tensor,
                    vocab_size: int) -> torch.Tensor:
        """The proxy's logits [M, vocab_size] (float32) at the response positions, in the student rows' order."""
        proxy = self.proxy_model
        if proxy.training:  # the Trainer's model.train() does not reach it, but a caller might
            proxy.eval()
        logits = select_rows(model_logits(proxy, input_ids, attention), response_mask)
        if logits.shape[-1] < vocab_size:
            raise ValueError(f"proxy vocabulary {logits.shape[-1]} < student vocabulary {vocab_size}: the proxy "
                             "must share the student tokenizer")
        return logits[:, :vocab_size].float()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        a = self._acc
        if a["n"] and "loss" in logs:
            logs["ce_loss"] = round(a["ce_loss"] / a["n"], 6)
            if a["kd_n"]:
                logs["kd_loss"] = round(a["kd_loss"] / a["kd_n"], 6)
            self._acc = {"ce_loss": 0.0, "kd_loss": 0.0, "n": 0, "kd_n": 0}
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------- distill

SETTINGS = "distill_settings.json"


@locks_output()
def distill(data: str, student: str, out: str, *, targets: str | None = None, teacher: str | None = None,
            proxy: str | None = None, prior: str | None = None, teacher_url: str | None = None,
            teacher_model: str | None = None, tokenizer: str | None = None, split: str = "train",
            skip_bad: bool = False, config: BayesKDConfig | None = None, peft_config: Any = None,
            **training_args: Any) -> dict[str, Any]:
    """Train `student` (a `from_pretrained` path) on teacher `data`; save the student + tokenizer to `out`.

    Mode: "sparse-targets" with `targets` (a shard directory), "online-posterior" with `targets` holding the
    prior's top-K rows and `proxy` (a model path sharing the tokenizer; posterior settings in `posterior_*`),
    "white-box" with `teacher` (a model path with the same vocabulary), else "sft" (`targets` None or "none").
    `tokenizer` defaults to the student's directory. The settings: `config` (a `BayesKDConfig`; its output_dir is
    replaced by `out`) or `training_args`, its fields (every `TrainingArguments` field included). Writes
    `out/summary.json` and returns it.

    `method="proxy-kd"` (a `BayesKDConfig` field): `targets` must carry the per-row extras `proxy_teacher_logprob`;
    the KD term is weighted per record (`proxy_kd_normalization`) and scaled by `proxy_kd_alpha`.
    `use_peft` (or a `peft_config`, any `peft.PeftConfig`): the student trains through an adapter; `out` then holds
    the student with the adapter merged (a `from_pretrained` model like any other) and `out/adapter` the adapter.
    `onpolicy_fraction` > 0: on-policy training (BayesKDTrainer); posterior targets at the student's samples need
    `prior` (a saved prior or an `estimate-prior` output, `bayeskd.priors.base.load_prior`) beside `proxy`;
    scored targets also `teacher_url` (an OpenAI-compatible server that answers echo with logprobs, probed before
    training: one line if it cannot) and `teacher_model` (its model name): the samples' scores are cached in
    `out/onpolicy_scores.jsonl` (`bayeskd.distillation.onpolicy_scores`), so a resumed run asks nothing twice.
    """
    from transformers import AutoModelForCausalLM

    if config is not None and training_args:
        raise ValueError(f"give either config or training arguments ({', '.join(sorted(training_args))}), not both")
    if targets is not None and str(targets).lower() == "none":
        targets = None
    if targets is not None and teacher is not None:
        raise ValueError("give either targets (sparse-targets mode) or teacher (white-box mode), not both")
    if proxy is not None and targets is None:
        raise ValueError("online-posterior mode (proxy) needs targets: the prior's top-K shards "
                         "(`bayeskd estimate-prior --write-topk`)")
    mode = ("online-posterior" if proxy is not None else "sparse-targets" if targets is not None
            else "white-box" if teacher is not None else "sft")
    out_dir = Path(out)
    if config is not None:
        training_args = {k: v for k, v in config.to_dict().items() if k not in RUN_ONLY_ARGS}  # the stamp below
        cfg = copy.copy(config)
        cfg.output_dir = str(out_dir)
    else:
        training_args.setdefault("output_dir", str(out_dir))
        cfg = BayesKDConfig(**training_args)
    peft_config = peft_config if peft_config is not None else lora_config(cfg)
    if mode == "sft" and cfg.ce_weight == 0:
        raise ValueError("ce_weight=0 without KD targets or a teacher leaves no loss to train on: SFT's loss is the "
                         "CE term (give ce_weight > 0, or targets / a teacher for KD)")
    if (teacher_url is None) != (teacher_model is None):
        raise ValueError("a teacher server needs both teacher_url and teacher_model (the model name it serves)")
    onpolicy = resolve_onpolicy_targets(cfg, teacher is not None, proxy is not None, prior is not None,
                                        teacher_url is not None)
    if prior is not None and onpolicy not in ("posterior", "scored"):
        raise ValueError("prior is read by on-policy posterior targets only (onpolicy_fraction > 0 with a proxy); "
                         "off-policy, --targets holds the prior's rows")
    proxy_kd = cfg.method == "proxy-kd"
    if proxy_kd and (targets is None or teacher is not None):
        raise ValueError("method='proxy-kd' needs targets (the proxy's top-K shards with the per-row extras "
                         f"'{TEACHER_LOGPROB}', from `bayeskd estimate-posterior --proxy P` without --prior) and "
                         "no white-box teacher")

    tok = load_tokenizer(tokenizer or student)
    scorer = None
    if teacher_url is not None:  # probed now: a server that cannot score is refused before any model is loaded
        from bayeskd.distillation.onpolicy_scores import SampleScorer, cache_name

        cache = out_dir / cache_name(cfg.process_index, cfg.world_size)
        scorer = SampleScorer(teacher_url, teacher_model, tok, cache, top_k=cfg.onpolicy_score_top_k,
                              budget=cfg.onpolicy_score_budget)
        scorer.probe()
    # untruncated: target rows are per full response (read once per process: the lab trains ~25 students on it)
    tokenized, report = load_tokenized_records(data, tok, split=split, skip_bad=skip_bad)
    dataset = TeacherTargetsDataset(tokenized, targets, max_length=cfg.max_length,
                                    weight_normalization=cfg.proxy_kd_normalization if proxy_kd else None)
    model = AutoModelForCausalLM.from_pretrained(student)
    if model.get_output_embeddings().weight.shape[0] < tokenized.vocab_size:
        raise ValueError(f"{student}: the model's vocabulary ({model.get_output_embeddings().weight.shape[0]}) is "
                         f"smaller than the tokenizer's ({tokenized.vocab_size})")
    if dataset.vocab_size is not None and model.get_output_embeddings().weight.shape[0] != dataset.vocab_size:
        raise ValueError(f"{student}: the model's vocabulary ({model.get_output_embeddings().weight.shape[0]}) "
                         f"differs from the targets' ({dataset.vocab_size})")
    whitebox = AutoModelForCausalLM.from_pretrained(teacher) if teacher is not None else None
    proxy_model = None
    if proxy is not None:
        proxy_model = AutoModelForCausalLM.from_pretrained(proxy)
        width = proxy_model.get_output_embeddings().weight.shape[0]
        if width < model.get_output_embeddings().weight.shape[0]:
            raise ValueError(f"{proxy}: the proxy's vocabulary ({width}) is smaller than the student's "
                             f"({model.get_output_embeddings().weight.shape[0]}); it must share the tokenizer")
        if cfg.posterior_mode == "dirichlet" and len(dataset) and CONTEXT_COUNT_KEY not in dataset[0]:
            raise ValueError(f"{targets}: posterior_mode='dirichlet' needs the prior's context counts in the "
                             "target shards (extras 'context_count', written by the n-gram prior)")
    prior_model = None
    if prior is not None:
        from bayeskd.priors.base import load_prior

        prior_model = load_prior(prior)
        made = Path(prior) / "prior_config.json"  # an estimate-prior output names its tokenizer
        made_with = read_stamp(made).get("tokenizer_fingerprint") if made.exists() else None
        if made_with is not None and made_with != tokenized.fingerprint:
            raise ValueError(f"{prior}: the prior was counted with another tokenizer than {tokenizer or student}")
        if prior_model.vocab_size != model.get_output_embeddings().weight.shape[0]:
            raise ValueError(f"{prior}: the prior's vocabulary ({prior_model.vocab_size}) differs from the "
                             f"student's ({model.get_output_embeddings().weight.shape[0]})")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # what a checkpoint in out was trained with; resuming is refused when it differs
    settings = as_json({"data": str(data), "student": str(student), "targets": targets, "teacher": teacher,
                        "proxy": proxy, **({"prior": str(prior)} if prior is not None else {}),
                        **({"teacher_model": teacher_model} if teacher_url is not None else {}),
                        "tokenizer": tokenizer, "split": split, "skip_bad": skip_bad,
                        **{k: v for k, v in training_args.items() if k not in RUN_ONLY_ARGS},
                        **({"peft_config": repr(peft_config)} if peft_config is not None and not cfg.use_peft else {})})
    trainer = BayesKDTrainer(model=model, args=cfg, data_collator=BayesKDCollator(pad), train_dataset=dataset,
                             processing_class=tok, teacher_model=whitebox, proxy_model=proxy_model,
                             peft_config=peft_config, prior=prior_model, scorer=scorer,
                             callbacks=[ChecksumCallback()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    start = resume_point(cfg.resume_from_checkpoint, out_dir)
    if start is not None:  # a checkpoint of other settings would silently mix two runs: refuse it
        check_settings(read_stamp(out_dir / SETTINGS) or {}, settings, where=out_dir, what="a distill run",
                       hint="use another --out, or remove its checkpoint-* folders to start again")
    if trainer.is_world_process_zero():
        atomic_write_json(out_dir / SETTINGS, settings)
    before = checkpoints(out_dir)
    try:
        result = trainer.train(resume_from_checkpoint=start)
    except BaseException:  # a save cut short (full disk, interrupt) leaves a checkpoint without a record: drop it
        if trainer.is_world_process_zero():
            remove_unrecorded(out_dir, before)
        raise
    finally:
        if scorer is not None:
            scorer.close()
    seconds = time.perf_counter() - t0
    # saved aside, then renamed into place: a full disk leaves no partial model in out (the Trainer saves from
    # the main process only, which also moves the files)
    main_process = trainer.is_world_process_zero()
    with staged_dir(out_dir, main=main_process) as staging:
        if peft_config is None:
            trainer.save_model(str(staging))
        else:  # the adapter, and the student with it merged: what every later stage loads
            trainer.save_model(str(staging / "adapter"))
            if main_process:
                trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(str(staging))
    train_tokens = trainer.train_tokens
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank's tokens count
        t = torch.tensor([train_tokens], dtype=torch.long, device=trainer.args.device)
        torch.distributed.all_reduce(t)
        train_tokens = int(t.item())
    if main_process:
        with staged_dir(out_dir, ".saving-tokenizer") as staging:  # as the model: no partial file on a full disk
            tok.save_pretrained(str(staging))

    history = [h for h in trainer.state.log_history if "loss" in h]
    last = history[-1] if history else {}
    first = history[0] if history else {}
    summary = {
        "mode": mode, "data": str(data), "student": str(student), "targets": targets, "teacher": teacher,
        "proxy": proxy, "posterior_mode": cfg.posterior_mode if proxy is not None else None, "method": cfg.method,
        "lm_head_loss": _lm_head_loss(cfg, trainer.args.device),
        "ce_weight": resolve_ce_weight(cfg.ce_weight, mode != "sft"), "kd_weight": cfg.kd_weight,
        "whitebox_top_k": (cfg.whitebox_top_k or tokenized.vocab_size) if mode == "white-box" else None,
        "records": len(tokenized), "skipped_records": int(report.skipped),
        "steps": int(trainer.state.global_step), "epochs": float(trainer.state.epoch or 0.0),
        "train_loss": float(result.training_loss),
        "final_loss": last.get("loss"), "final_ce_loss": last.get("ce_loss"), "final_kd_loss": last.get("kd_loss"),
        "first_loss": first.get("loss"), "first_ce_loss": first.get("ce_loss"),
        "first_kd_loss": first.get("kd_loss"),
        "train_tokens": int(train_tokens), "train_response_tokens": int(trainer.response_tokens),
        "train_seconds": round(seconds, 4),
        "train_tokens_per_second": round(train_tokens / seconds, 2) if seconds > 0 else None,
        "log_history": trainer.state.log_history,
        "out": str(out_dir),
    }
    if peft_config is not None:
        summary["adapter"] = {"type": str(getattr(peft_config, "peft_type", type(peft_config).__name__)),
                              "trainable_params": int(trainable), "out": str(out_dir / "adapter")}
    if onpolicy is not None:
        st = trainer.onpolicy_stats
        summary["onpolicy"] = {"fraction": cfg.onpolicy_fraction, "targets": onpolicy, "prior": prior,
                               "temperature": cfg.onpolicy_temperature,
                               "max_new_tokens": cfg.onpolicy_max_new_tokens, "sequences": st["sequences"],
                               "sampled_tokens": st["tokens"], "sampling_seconds": round(st["seconds"], 4)}
        if scorer is not None:  # the price of the scored targets: teacher requests and scored tokens
            summary["onpolicy"]["scoring"] = scorer.summary()
    if proxy_kd:
        w = dataset.proxy_kd_weights
        summary.update(proxy_kd_alpha=cfg.proxy_kd_alpha, proxy_kd_normalization=cfg.proxy_kd_normalization,
                       proxy_kd_weights={"mean": float(w.mean()), "min": float(w.min()), "max": float(w.max())})
    if main_process:
        atomic_write_json(out_dir / "summary.json", json.loads(json.dumps(summary, default=str)))
    return summary
