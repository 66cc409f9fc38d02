"""The job behind `bayeskd align-proxy`, Proxy-KD's first half: align a white-box proxy to the black-box teacher
(the second half, distillation with alignment-weighted soft labels, is the trainer's method "proxy-kd").

Alignment (`align_proxy`):
- stage 1, SFT of the proxy on the teacher responses (`bayeskd.distillation.trainer.distill` in SFT mode)
  -> out/sft/;
- stage 2, rounds of preference optimisation -> out/round_{i}/: the current proxy samples its own response y_P per
  prompt, the teacher's y_T is preferred, and TRL's `DPOTrainer` minimises
  -log σ(β[(log π(y_T) - log π_ref(y_T)) - (log π(y_P) - log π_ref(y_P))]) + nll_weight · NLL(y_T),
  the reference being the previous round's proxy (`loss_type=["sigmoid", "sft"]`). TRL's "sft" term is the
  per-token mean NLL of y_T over the batch (the RPO convention), not the sequence sum; `proxy_preference_loss`
  computes either.
- out/final/ is the aligned proxy (from_pretrained directory with tokenizer); out/summary.json records every stage
  and the alignment diagnostics before/after. Finished stages are skipped on rerun (rounds can be raised); a rerun
  with other settings is refused (`CacheMismatchError`).
- Held-out slice (`holdout_records`): a seeded random sample of the records is used by no stage, so that
  `estimate-posterior` can choose its prior/proxy combination on records the proxy has not seen (cross-fitting,
  `bayeskd.posterior.calibrate`). What the proxy was trained on (data, a sha256 fingerprint of the records, the
  training and held-out indices as [start, stop) ranges) is in out/summary.json ("training") and in
  `bayeskd_training.json` inside every model directory (sft/, round_<i>/, final/), so a later job finds it from the
  proxy's path alone (`bayeskd.posterior.calibrate.read_training_info`).

Weighted distillation (`bayeskd.distillation.trainer`, method "proxy-kd"):
loss = CE(y_T) + α · mean_t[w(x, y_T) · KL_t(p_proxy ‖ p_S)] with w = σ((s - μ)/γ), s the proxy's log p(y_T|x)
read from the target shards' per-row extras `proxy_teacher_logprob`
(`bayeskd.distillation.targets.proxy_kd_weights`).

Diagnostics (as in the Proxy-KD paper's figures): the share of teacher tokens that are the proxy's top-1, and the
share of positions whose top-K proxy mass exceeds 0.95 for K = 1..64 (`alignment_diagnostics`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bayeskd.data import TokenizedData, load_teacher_records, load_tokenizer, tokenize_records
from bayeskd.record_checks import logprob_entries
from bayeskd.records import records_fingerprint
from bayeskd.posterior.calibrate import TRAINING_INFO, TRAINING_INFO_FORMAT, index_ranges
from bayeskd.distillation.checkpoints import final_is_current, read_stage, record_stage
from bayeskd.resume import RUN_ONLY_ARGS, check_stamp
from bayeskd.integrity import atomic_write_bytes, atomic_write_json
from bayeskd.job_config import job_config, setting
from bayeskd.teacher_forcing import pad_batch, response_rows, select_rows
from bayeskd.locks import locks_output

logger = logging.getLogger(__name__)

ALIGN_CONFIG = "align_config.json"
ALIGN_VERSION = 1
DEFAULT_KS = tuple(range(1, 65))
TRAIN_RECORDS = "train_records.jsonl"  # out/: the records SFT trains on when some are held out


def default_holdout(n_records: int) -> int:
    """Records `align_proxy` holds out by default: 10% of them, at most 256 (none below 10 records)."""
    return min(256, n_records // 10)


def holdout_indices(n_records: int, holdout: int, seed: int) -> list[int]:
    """The `holdout` records (sorted indices) no alignment stage trains on: a seeded random sample, not the tail, as
    teacher data is often ordered (by prompt, topic or time) and the slice should look like the rest."""
    if not 0 <= holdout < n_records:
        raise ValueError(f"holdout_records must be in [0, {n_records - 1}] (at least one record left to train on), "
                         f"got {holdout}")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n_records)[:holdout])


# ---------------------------------------------------------------------------------------------------- pure functions

def proxy_preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                          ref_rejected: torch.Tensor, beta: float, nll_weight: float = 1.0,
                          chosen_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of -log σ(β[(π_c - ref_c) - (π_r - ref_r)]), plus `nll_weight` × the chosen response's NLL.

    All inputs are per-sequence log-probabilities [B] (sums over response tokens). The NLL term is -mean(π_c) (the
    sequence-level -log π(y_T)); with `chosen_tokens` [B] (response lengths) it is -Σπ_c / Σ chosen_tokens, the
    per-token mean over the batch, which is what TRL's `loss_type="sft"` computes.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise ValueError(f"per-sequence log-probabilities must all be [B], got shapes {sorted(map(tuple, shapes))}")
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    pref = -F.logsigmoid(beta * margin).mean()
    if chosen_tokens is None:
        nll = -policy_chosen.mean()
    else:
        nll = -policy_chosen.sum() / chosen_tokens.sum().clamp(min=1)
    return pref + nll_weight * nll


def top1_match_ratio(logprobs: torch.Tensor, tokens: torch.Tensor) -> float:
    """Share of rows whose argmax (log-probabilities or logits [N, V]) is the observed token [N]."""
    if logprobs.dim() != 2 or tokens.shape != logprobs.shape[:1]:
        raise ValueError(f"expected logprobs [N, V] and tokens [N], got {tuple(logprobs.shape)}, {tuple(tokens.shape)}")
    if len(tokens) == 0:
        raise ValueError("no rows")
    return float((logprobs.argmax(-1) == tokens).double().mean())


def topk_mass_share(logprobs: torch.Tensor, ks: Sequence[int] = DEFAULT_KS, threshold: float = 0.95) -> list[float]:
    """For each K in `ks`: the share of rows whose K most likely tokens hold more than `threshold` of the mass.

    `logprobs` [N, V] are log-probabilities (rows of a log_softmax). A peaked (confident) proxy reaches the
    threshold at small K.
    """
    ks = [int(k) for k in ks]
    if logprobs.dim() != 2 or logprobs.shape[0] == 0:
        raise ValueError(f"expected non-empty logprobs [N, V], got {tuple(logprobs.shape)}")
    if not ks or min(ks) < 1 or max(ks) > logprobs.shape[1]:
        raise ValueError(f"ks must lie in [1, V={logprobs.shape[1]}], got {ks[:3]}...")
    mass = logprobs.double().topk(max(ks), dim=-1).values.exp().cumsum(-1)  # [N, max K]
    return [float((mass[:, k - 1] > threshold).double().mean()) for k in ks]


# ---------------------------------------------------------------------------------------------------- model passes

def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(n: int, batch_size: int):
    for lo in range(0, n, batch_size):
        yield range(lo, min(lo + batch_size, n))


@torch.no_grad()
def _response_logprobs(model, seqs, masks, pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-softmax rows [M, V] at the response positions, the response tokens [M], the row's batch item [M])."""
    b = {k: v.to(device) for k, v in pad_batch(seqs, masks, pad).items()}
    logits, tokens = response_rows(model, b)
    item = select_rows(torch.arange(len(seqs), device=device)[:, None].expand_as(b["response_mask"]),
                       b["response_mask"])
    return torch.log_softmax(logits.float(), -1), tokens, item


@torch.no_grad()
def sequence_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                      pad_token_id: int = 0, batch_size: int = 8) -> torch.Tensor:
    """log π(response | prompt) summed over the response tokens, float64 [N] (teacher-forced, eval mode)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    was_training, device = model.training, _device_of(model)
    model.eval()
    out = torch.zeros(len(prompts), dtype=torch.float64)
    for rows in _batches(len(prompts), batch_size):
        seqs = [list(prompts[i]) + list(responses[i]) for i in rows]
        masks = [np.arange(len(s)) >= len(prompts[i]) for s, i in zip(seqs, rows)]
        lp, tok, item = _response_logprobs(model, seqs, masks, pad_token_id, device)
        per_row = lp.gather(1, tok[:, None])[:, 0].double().cpu()
        out[rows.start:rows.stop] = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, item.cpu(), per_row)
    model.train(was_training)
    return out


@torch.no_grad()
def alignment_diagnostics(model, tokenized: TokenizedData, *, ks: Sequence[int] = DEFAULT_KS,
                          threshold: float = 0.95, batch_size: int = 8, max_records: int | None = None,
                          pad_token_id: int = 0) -> dict[str, Any]:
    """The proxy's agreement with the teacher text over the response positions of (the first `max_records` of)
    `tokenized`: `top1_match` (share of teacher tokens that are the proxy's argmax), `topk_mass_share[j]` (share of
    positions whose top-`ks[j]` mass exceeds `threshold`), `teacher_token_logprob` (mean log q(teacher token))."""
    n = len(tokenized) if max_records is None else min(max_records, len(tokenized))
    ks = [k for k in ks if k <= tokenized.vocab_size]
    was_training, device = model.training, _device_of(model)
    model.eval()
    positions, match, logprob_sum = 0, 0.0, 0.0
    above = np.zeros(len(ks))
    for rows in _batches(n, batch_size):
        lp, tok, _ = _response_logprobs(model, [tokenized.input_ids[i] for i in rows],
                                        [tokenized.response_mask[i] for i in rows], pad_token_id, device)
        m = len(tok)
        if m == 0:
            continue
        lp = lp[:, :tokenized.vocab_size]  # a proxy with a padded vocabulary: only real tokens count
        positions += m
        match += top1_match_ratio(lp, tok) * m
        above += np.asarray(topk_mass_share(lp, ks, threshold)) * m
        logprob_sum += float(lp.gather(1, tok[:, None]).double().sum())
    model.train(was_training)
    if positions == 0:
        raise ValueError("no response positions to evaluate")
    return {"records": n, "positions": positions, "top1_match": match / positions, "threshold": threshold,
            "topk_mass_ks": ks, "topk_mass_share": (above / positions).tolist(),
            "teacher_token_logprob": logprob_sum / positions}


@torch.no_grad()
def sample_responses(model, prompts: Sequence[Sequence[int]], *, temperature: float, max_new_tokens: int,
                     eos_token_id: int | None, pad_token_id: int, seed: int, batch_size: int = 8) -> list[list[int]]:
    """One sampled continuation per prompt (token ids; up to and including the first EOS), with HF `generate`.

    temperature 0 is greedy. Prompts are left-padded per batch; the draw depends on (seed, batch_size).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens: the proxy needs at least one token to sample from (use a "
                         "tokenizer that adds BOS, or non-empty prompts)")
    was_training, device = model.training, _device_of(model)
    model.eval()
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id,
                              "eos_token_id": eos_token_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for rows in _batches(len(prompts), batch_size):
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            att = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                ids[j, width - len(prompts[i]):] = torch.as_tensor(np.asarray(prompts[i], dtype=np.int64))
                att[j, width - len(prompts[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kwargs)[:, width:]
            for row in gen.tolist():
                if eos_token_id is not None and eos_token_id in row:
                    row = row[:row.index(eos_token_id) + 1]
                out.append(row)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------- alignment

def _data_hash(tokenized: TokenizedData) -> str:
    h = hashlib.sha256()
    for ids, p in zip(tokenized.input_ids, tokenized.prompt_lengths):
        h.update(np.int64(p).tobytes())
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def _subset(tokenized: TokenizedData, indices: Sequence[int]) -> TokenizedData:
    """The records `indices` of `tokenized`, in that order."""
    from dataclasses import replace

    idx = [int(i) for i in indices]
    return replace(tokenized, input_ids=[tokenized.input_ids[i] for i in idx],
                   response_mask=[tokenized.response_mask[i] for i in idx],
                   prompt_lengths=np.asarray(tokenized.prompt_lengths)[idx])


def _finished(stage: Path) -> bool:
    return (stage / "summary.json").exists()


def _publish(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete directory `tmp` (a stage is visible only once fully written)."""
    record_stage(tmp)  # sizes and checksums, checked when a rerun skips the stage (read_stage)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)  # a stage interrupted before it finished: start it again
    return path


def _copy_model_dir(src: Path, dst_tmp: Path) -> None:
    def link_or_copy(a, b):
        try:
            os.link(a, b)  # same filesystem: no second copy of the weights
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst_tmp, copy_function=link_or_copy)


@functools.lru_cache(maxsize=1)
def pretokenized_dpo_trainer_class() -> type:
    """TRL's `DPOTrainer`, taking a dataset already tokenized as prompt_ids / chosen_ids / rejected_ids (built from
    `tokenize_records`): TRL's own tokenisation (prompt + completion jointly) would split the text differently
    from the rest of bayeskd. Built on first use so importing this module does not import TRL."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


def _dpo_round(policy_dir: Path, stage_tmp: Path, tok, tokenized: TokenizedData, *, round_index: int, beta: float,
               nll_weight: float, temperature: float, max_new_tokens: int, learning_rate: float,
               dpo_epochs: float, batch_size: int, seed: int, logging_steps: int, device: str,
               training_args: dict[str, Any]) -> tuple[dict[str, Any], torch.nn.Module]:
    """One round: sample y_P with the policy, train it with DPO(+NLL) against a frozen copy of itself, save.
    Returns the round's summary and the trained policy."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir)).to(device)
    ref = AutoModelForCausalLM.from_pretrained(str(policy_dir)).to(device)
    prompts = [ids[:int(p)].tolist() for ids, p in zip(tokenized.input_ids, tokenized.prompt_lengths)]
    chosen = [ids[int(p):].tolist() for ids, p in zip(tokenized.input_ids, tokenized.prompt_lengths)]
    t0 = time.perf_counter()
    rejected = sample_responses(policy, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                                eos_token_id=tok.eos_token_id, pad_token_id=pad, seed=seed + round_index,
                                batch_size=batch_size)
    sample_seconds = time.perf_counter() - t0
    identical = sum(c == r for c, r in zip(chosen, rejected))

    def margins(model) -> dict[str, float]:
        lc = sequence_logprobs(model, prompts, chosen, pad_token_id=pad, batch_size=batch_size)
        lr = sequence_logprobs(model, prompts, rejected, pad_token_id=pad, batch_size=batch_size)
        return {"chosen_logprob": float(lc.mean()), "rejected_logprob": float(lr.mean()),
                "margin": float((lc - lr).mean())}

    before = margins(policy)
    ds = Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": chosen, "rejected_ids": rejected})
    args = dict(output_dir=str(stage_tmp / "trainer"), beta=beta, loss_type=["sigmoid", "sft"],
                loss_weights=[1.0, nll_weight], learning_rate=learning_rate, num_train_epochs=dpo_epochs,
                per_device_train_batch_size=batch_size, max_length=None, bf16=False, activation_checkpointing=False,
                save_strategy="no", report_to=[], logging_steps=logging_steps, seed=seed + round_index,
                disable_dropout=True, use_cpu=device == "cpu")
    args.update(training_args)
    trainer = pretokenized_dpo_trainer_class()(model=policy, ref_model=ref, args=DPOConfig(**args),
                                               train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    after = margins(policy)
    trainer.save_model(str(stage_tmp))
    tok.save_pretrained(str(stage_tmp))
    shutil.rmtree(stage_tmp / "trainer", ignore_errors=True)
    with open(stage_tmp / "pairs.jsonl", "w") as f:  # what the round trained on, for inspection
        for p, c, r in zip(prompts, chosen, rejected):
            f.write(json.dumps({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}) + "\n")
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {"stage": f"round_{round_index}", "pairs": len(ds), "identical_pairs": identical,
            "mean_rejected_tokens": float(np.mean([len(r) for r in rejected])),
            "before": before, "after": after, "steps": int(trainer.state.global_step),
            "train_loss": float(result.training_loss), "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "sample_seconds": round(sample_seconds, 3), "train_seconds": round(train_seconds, 3),
            "log_history": trainer.state.log_history, "policy": str(policy_dir)}, policy


@dataclass
class AlignProxyConfig:
    """The `align-proxy` job's settings, its one config: every field is a `bayeskd align-proxy` option
    (`bayeskd.cli_config.config_options`), so each default is written here once. The inputs (data, proxy,
    tokenizer, output) and `training_args` (a mapping for both trainers, from Python) are the job's arguments."""
    sft_epochs: float = setting(1.0, "Epochs of SFT on the teacher responses first (0: none).", min=0)
    rounds: int = setting(2, "Preference rounds (teacher response preferred over the proxy's own sample).", min=0)
    beta: float = setting(0.1, "DPO β.", min=0, min_open=True)
    nll_weight: float = setting(1.0, "Weight of the per-token NLL of the teacher response added to the DPO loss.",
                                min=0)
    temperature: float = setting(1.0, "Sampling temperature of the proxy's responses (0: greedy).", min=0)
    max_new_tokens: int = setting(64, "Longest response the proxy samples per prompt.", min=1)
    sft_learning_rate: float = setting(2e-5, "SFT learning rate.")
    learning_rate: float = setting(1e-6, "DPO learning rate.")
    dpo_epochs: float = setting(1.0, "Epochs over the pairs per round.", min=0, min_open=True)
    batch_size: int = setting(8, "Records per batch (SFT, DPO, sampling and diagnostics).", min=1)
    max_length: int | None = setting(None, "Truncate records to this many tokens.", min=2)
    seed: int = setting(0, "Seed of the training, the proxy's samples and the held-out slice.")
    logging_steps: int = setting(10, "Log every N training steps.", min=1)
    diagnostic_records: int | None = setting(256, "Records scored by the alignment diagnostics (top-1 match, top-K "
                                             "mass).", min=1)
    holdout_records: int | Sequence[int] | None = setting(
        None, "Records no stage trains on (a seeded random slice), for estimate-posterior's calibration (default: "
        "10% of the records, at most 256; 0: none). From Python also a sequence of record indices.", min=0)
    device: str | None = setting(None, "torch device (default: cuda when available, else cpu).")

    def __post_init__(self):
        if self.rounds < 0 or self.sft_epochs < 0 or (self.rounds == 0 and self.sft_epochs == 0):
            raise ValueError(f"need rounds >= 0 and sft_epochs >= 0, not both 0 (got rounds={self.rounds}, "
                             f"sft_epochs={self.sft_epochs})")
        if (not self.beta > 0 or self.nll_weight < 0 or self.temperature < 0 or self.max_new_tokens < 1
                or self.batch_size < 1):
            raise ValueError(f"need beta > 0, nll_weight >= 0, temperature >= 0, max_new_tokens >= 1, batch_size >= "
                             f"1 (got {self.beta}, {self.nll_weight}, {self.temperature}, {self.max_new_tokens}, "
                             f"{self.batch_size})")


@locks_output()
def align_proxy(data: str, proxy: str, out: str, *, tokenizer: str | None = None,
                config: AlignProxyConfig | None = None, split: str = "train", skip_bad: bool = False,
                training_args: dict[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
    """Align `proxy` (a from_pretrained path) to the teacher responses in `data`; returns out/summary.json.

    The settings: `config` (an `AlignProxyConfig`) or `settings`, its fields. Stage 1 (`sft_epochs` > 0): SFT on
    the teacher responses -> out/sft/. Stage 2: `rounds` rounds of DPO with the teacher response chosen over the
    proxy's own sample (drawn at `temperature`, at most `max_new_tokens`) plus `nll_weight` × the per-token NLL
    of the teacher response, reference = the previous round's proxy -> out/round_{i}/. out/final/ is the last
    stage's model and tokenizer. Diagnostics (`alignment_diagnostics` on the first `diagnostic_records` records)
    are recorded for the initial proxy, after every stage and for the final model. Resumable: finished stages are
    reused; other settings than the first run's (except `rounds`) raise `CacheMismatchError`. `training_args` go
    to both trainers (e.g. {"bf16": True}). Runs in one process: sampling, scoring and both trainers on `device`
    (default: cuda when available).

    `holdout_records` (default `default_holdout`: 10% of the records, at most 256; 0: none): a seeded random sample
    of records that neither SFT nor the preference rounds see (diagnostics are on the training records); a sequence
    of indices: exactly those records. Every
    model directory gets `bayeskd_training.json` (data, records fingerprint, training and held-out indices), so
    `estimate-posterior --calibrate` scores the aligned proxy only on records it was not trained on.
    """
    from transformers import AutoModelForCausalLM

    from bayeskd.distillation.trainer import distill

    conf = job_config(AlignProxyConfig, config, settings, "align_proxy")
    sft_epochs, rounds, beta, nll_weight = conf.sft_epochs, conf.rounds, conf.beta, conf.nll_weight
    temperature, max_new_tokens, batch_size, max_length = (conf.temperature, conf.max_new_tokens, conf.batch_size,
                                                           conf.max_length)
    sft_learning_rate, learning_rate, dpo_epochs = conf.sft_learning_rate, conf.learning_rate, conf.dpo_epochs
    seed, logging_steps, diagnostic_records = conf.seed, conf.logging_steps, conf.diagnostic_records
    holdout_records, device = conf.holdout_records, conf.device
    training_args = dict(training_args or {})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer or proxy)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    records, report = load_teacher_records(data, split=split, skip_bad=skip_bad)
    if holdout_records is not None and not isinstance(holdout_records, (int, np.integer)):
        heldout = sorted({int(i) for i in holdout_records})  # these records (the lab scores exactly them)
        if heldout and not 0 <= heldout[0] <= heldout[-1] < len(records) or len(heldout) >= len(records):
            raise ValueError(f"holdout_records: indices must lie in [0, {len(records)}) and leave a record to "
                             f"train on")
        n_holdout = len(heldout)
    else:
        n_holdout = default_holdout(len(records)) if holdout_records is None else int(holdout_records)
        heldout = holdout_indices(len(records), n_holdout, seed)
    train_idx = sorted(set(range(len(records))) - set(heldout))
    # every stage below sees only the training records
    tokenized = _subset(tokenize_records(records, tok, max_length=max_length), train_idx)
    training = {"format": TRAINING_INFO_FORMAT, "job": "align-proxy", "data": str(data), "split": split,
                "skip_bad": skip_bad, "records": len(records), "records_fingerprint": records_fingerprint(records),
                "trained_on": index_ranges(train_idx), "heldout": index_ranges(heldout), "holdout_seed": seed}
    cfg = {"version": ALIGN_VERSION, "data": str(data), "data_hash": _data_hash(tokenized), "proxy": str(proxy),
           "tokenizer_fingerprint": tokenized.fingerprint, "sft_epochs": sft_epochs, "beta": beta,
           "nll_weight": nll_weight, "temperature": temperature, "max_new_tokens": max_new_tokens,
           "sft_learning_rate": sft_learning_rate, "learning_rate": learning_rate, "dpo_epochs": dpo_epochs,
           "batch_size": batch_size, "max_length": max_length, "seed": seed,
           # what is trained, not how it is shown (a rerun with or without progress bars resumes)
           "training_args": {k: v for k, v in training_args.items() if k not in RUN_ONLY_ARGS},
           "diagnostic_records": diagnostic_records,
           # absent (None) without a holdout, so output directories made before holdouts existed still resume
           "holdout": {"records": n_holdout, "indices": hashlib.sha256(json.dumps(heldout).encode()).hexdigest()}
           if heldout else None}
    check_stamp(out_dir / ALIGN_CONFIG, cfg, what="align-proxy",
                hint="refusing to resume. Use a new --out, or the same settings (only --rounds may change).")

    def diagnose(model) -> dict[str, Any]:
        return alignment_diagnostics(model, tokenized, batch_size=batch_size, max_records=diagnostic_records,
                                     pad_token_id=pad)

    before_path = out_dir / "diagnostics_before.json"
    if not before_path.exists():
        atomic_write_json(before_path, diagnose(AutoModelForCausalLM.from_pretrained(proxy).to(device)))
    stages: list[dict[str, Any]] = []
    current = Path(proxy)
    if sft_epochs > 0:
        stage = out_dir / "sft"
        if not _finished(stage):
            tmp = _fresh(out_dir / ".sft.tmp")
            sft_args = dict(num_train_epochs=sft_epochs, learning_rate=sft_learning_rate,
                            per_device_train_batch_size=batch_size, max_length=max_length, seed=seed,
                            logging_steps=logging_steps, use_cpu=device == "cpu", save_strategy="no")
            sft_data, sft_read = data, {"split": split, "skip_bad": skip_bad}
            if heldout:  # SFT reads a file: give it the training records only (kept in out/ for inspection)
                sft_data, sft_read = str(out_dir / TRAIN_RECORDS), {}
                atomic_write_bytes(out_dir / TRAIN_RECORDS, "".join(  # (logprobs read from Parquet: as JSON lists)
                    json.dumps(records[i], ensure_ascii=False, default=logprob_entries) + "\n"
                    for i in train_idx).encode("utf-8"))
            s = distill(sft_data, str(proxy), str(tmp), tokenizer=tokenizer, **sft_read,
                        **{**sft_args, **training_args})
            s = {"stage": "sft", **{k: s[k] for k in ("steps", "train_loss", "first_loss", "final_loss",
                                                      "train_seconds", "log_history")}}
            s["diagnostics"] = diagnose(AutoModelForCausalLM.from_pretrained(tmp).to(device))
            atomic_write_json(tmp / "summary.json", json.loads(json.dumps(s, default=str)))
            atomic_write_json(tmp / TRAINING_INFO, training)
            _publish(tmp, stage)
        stages.append(read_stage(stage))  # its files checked against their record first
        current = stage
    for i in range(1, rounds + 1):
        stage = out_dir / f"round_{i}"
        if not _finished(stage):
            tmp = _fresh(out_dir / f".round_{i}.tmp")
            s, policy = _dpo_round(current, tmp, tok, tokenized, round_index=i, beta=beta, nll_weight=nll_weight,
                                   temperature=temperature, max_new_tokens=max_new_tokens,
                                   learning_rate=learning_rate, dpo_epochs=dpo_epochs, batch_size=batch_size,
                                   seed=seed, logging_steps=logging_steps, device=device,
                                   training_args=training_args)
            s["diagnostics"] = diagnose(policy)
            atomic_write_json(tmp / "summary.json", json.loads(json.dumps(s, default=str)))
            atomic_write_json(tmp / TRAINING_INFO, training)
            _publish(tmp, stage)
        stages.append(read_stage(stage))  # its files checked against their record first
        current = stage

    # out/final: the last stage. Rebuilt when the stage list changed (e.g. more rounds on a rerun).
    final = out_dir / "final"
    if not final_is_current(final, current.name):
        tmp = _fresh(out_dir / ".final.tmp")
        _copy_model_dir(current, tmp)
        for extra in ("summary.json", "pairs.jsonl"):
            if (tmp / extra).exists():
                (tmp / extra).unlink()
        atomic_write_json(tmp / "source.json", {"stage": current.name})
        _publish(tmp, final)
    # written on every run (not only when final/ is rebuilt): a final/ made before this file existed gets it too;
    # a fresh file, so the stage directory final/ hard-links to is not touched
    atomic_write_json(final / TRAINING_INFO, training)
    summary = {
        "data": str(data), "proxy": str(proxy), "out": str(out_dir), "final": str(final), "config": cfg,
        "rounds": rounds, "records": len(records), "skipped_records": int(report.skipped),
        "holdout_records": len(heldout), "training": training,
        "stages": [{k: v for k, v in s.items() if k != "log_history"} for s in stages],
        "diagnostics_before": json.loads(before_path.read_text()),
        "diagnostics_after": stages[-1]["diagnostics"],
    }
    summary["alignment"] = {f"{key}_{when}": summary[f"diagnostics_{when}"][key]  # the headline numbers
                            for key in ("top1_match", "teacher_token_logprob") for when in ("before", "after")}
    atomic_write_json(out_dir / "summary.json", json.loads(json.dumps(summary, default=str)))
    return summary
