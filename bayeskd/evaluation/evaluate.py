"""Dataset-level evaluation against a readable teacher: the job behind `bayeskd evaluate` and the lab's tables.

Estimation quality: at the response positions of teacher text, how close each estimate (target shards, an
in-memory `SparseDist`, or dense log-probabilities) is to the teacher's true next-token distribution:
KL(teacher‖estimate), top-1 match and top-k mass coverage (`bayeskd.evaluation.metrics`).
Student quality: on held-out teacher text, the student's NLL of the teacher tokens and KL(teacher‖student)
teacher-forced; on the student's own samples, KL(teacher‖student) at the positions the student wrote.

Rows follow the target-shard convention (`bayeskd.teacher_forcing`): for each record, one row per response
token, row j predicting response token j from everything before it (the logits at position prompt_length + j - 1);
`response_logprobs` is `bayeskd.teacher_forcing.target_logprobs`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bayeskd.evaluation.metrics import (kl_teacher_to_estimate, smoothed_one_hot, summarize, top1_match,
                                        topk_mass_coverage)
from bayeskd.core.sparse import SparseDist
from bayeskd.integrity import atomic_write_json
from bayeskd.job_config import job_config, setting
from bayeskd.teacher_forcing import target_logprobs as response_logprobs

COVERAGE_K = (1, 8)


def response_tokens(tokenized, indices: Sequence[int] | None = None) -> torch.Tensor:
    """The response tokens of the records `indices` (all by default), concatenated in target-row order."""
    seqs = tokenized.response_sequences()
    indices = range(len(tokenized)) if indices is None else indices
    parts = [seqs[int(i)].astype(np.int64) for i in indices]
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.long)


def estimate_metrics(teacher_lp: torch.Tensor, estimate: SparseDist | torch.Tensor, valid: torch.Tensor | None = None,
                     coverage_k: Sequence[int] = COVERAGE_K) -> dict[str, float]:
    """Mean KL(teacher‖estimate) (nats per token), top-1 match and top-k mass coverage over the valid rows."""
    n = teacher_lp.shape[0]
    got = estimate.num_rows if isinstance(estimate, SparseDist) else estimate.shape[0]
    if got != n:
        raise ValueError(f"the estimate has {got} rows, the teacher {n}: not the same positions")
    metrics = {"kl": kl_teacher_to_estimate(teacher_lp, estimate), "top1": top1_match(teacher_lp, estimate)}
    v = teacher_lp.shape[1]
    for k in coverage_k:
        if k <= v:
            metrics[f"coverage@{k}"] = topk_mass_coverage(teacher_lp, estimate, k)
    return summarize(metrics, valid)


def read_target_rows(targets_dir: str | Path, tokenized, indices: Sequence[int]) -> SparseDist:
    """The rows of the records `indices` from a target-shard directory made for `tokenized`'s data and tokenizer
    (checked as the trainer checks them), in target-row order."""
    from bayeskd.distillation.targets import TeacherTargetsDataset

    dataset = TeacherTargetsDataset(tokenized, str(targets_dir))
    return SparseDist.cat([dataset.record_rows(int(i)) for i in indices])


def estimation_table(teacher_lp: torch.Tensor, estimates: Mapping[str, SparseDist | torch.Tensor],
                     valid: torch.Tensor | None = None,
                     coverage_k: Sequence[int] = COVERAGE_K) -> dict[str, dict[str, float]]:
    """`estimate_metrics` for each named estimate at the same teacher rows."""
    return {name: estimate_metrics(teacher_lp, est, valid, coverage_k) for name, est in estimates.items()}


def one_hot_estimate(tokenized, indices: Sequence[int], vocab_size: int, eps: float = 0.1) -> SparseDist:
    """The smoothed one-hot of the observed teacher token at every response position (the no-estimate baseline)."""
    return smoothed_one_hot(response_tokens(tokenized, indices), vocab_size, eps)


def student_metrics(teacher, student, tokenized, *, own_samples=None, indices: Sequence[int] | None = None,
                    teacher_rows: tuple[torch.Tensor, torch.Tensor] | None = None, batch_size: int = 16,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Student quality against a readable teacher (both causal LMs sharing the vocabulary of `tokenized`).

    `tokenized`: held-out teacher text (its records `indices`, all by default). `own_samples`: the student's own
    responses (tokenized the same way) to held-out prompts, or None. `teacher_rows`: the teacher's
    `response_logprobs` on those records when already computed (scoring several students). Returns nll (nats
    per teacher token), kl_tf (mean KL(teacher‖student) at the teacher's positions) and, with own samples, kl_own
    (at the student's positions)."""
    V = int(tokenized.vocab_size)
    t_lp, valid = teacher_rows if teacher_rows is not None else response_logprobs(
        teacher, tokenized, indices, vocab_size=V, batch_size=batch_size, device=device)
    s_lp, _ = response_logprobs(student, tokenized, indices, vocab_size=V, batch_size=batch_size, device=device)
    tokens = response_tokens(tokenized, indices)
    nll = -s_lp.gather(1, tokens[:, None]).squeeze(1).double()
    out = summarize({"nll": nll, "kl_tf": kl_teacher_to_estimate(t_lp, s_lp)}, valid)
    del t_lp, s_lp
    if own_samples is not None and len(own_samples):
        t_lp, valid = response_logprobs(teacher, own_samples, vocab_size=V, batch_size=batch_size, device=device)
        s_lp, _ = response_logprobs(student, own_samples, vocab_size=V, batch_size=batch_size, device=device)
        out.update(summarize({"kl_own": kl_teacher_to_estimate(t_lp, s_lp)}, valid))
    return out


def _named_paths(items: Sequence[str], what: str) -> dict[str, str]:
    """["name=path", "path"] -> {name: path} (a bare path is named by its directory name)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not path or not Path(path).exists():
            raise FileNotFoundError(f"{what} {item!r}: {path!r} does not exist")
        if name in out:
            raise ValueError(f"{what} name {name!r} given twice")
        out[name] = path
    return out


@dataclass
class EvaluateConfig:
    """The `evaluate` job's settings, its one config: every field is a `bayeskd evaluate` option
    (`bayeskd.cli_config.config_options`), so each default is written here once. What is scored (teacher, data,
    targets, students, prompts) and where the report goes are the job's arguments."""
    max_records: int | None = setting(None, "Score only the first N records.", min=1)
    max_new_tokens: int = setting(48, "With --prompts: the longest response a student samples.", min=1)
    seed: int = setting(0, "With --prompts: the students' sampling seed.")
    one_hot_eps: float = setting(0.1, "The baseline estimate: 1 - eps on the teacher's token, eps spread over the "
                                 "other tokens (below 1).", min=0, max=1)
    batch_size: int = setting(16, "Records per forward pass.", min=1)


def evaluate(teacher: str, data: str, *, tokenizer: str | None = None, targets: Sequence[str] = (),
             students: Sequence[str] = (), prompts: str | None = None, out: str | None = None,
             skip_bad: bool = False, config: EvaluateConfig | None = None, **settings: Any) -> dict[str, Any]:
    """The job behind `bayeskd evaluate`: score target shards (`targets`: "name=DIR") and students (`students`:
    "name=PATH") against a readable `teacher` (a causal LM path) on teacher text `data`.

    Estimation quality is measured at `data`'s response positions (the first `max_records` records), where the
    target shards were estimated, with the smoothed one-hot of the teacher token as the baseline row. Student
    quality is measured on `data` too (pass held-out teacher text); with `prompts` (JSONL with "prompt") every
    student also samples its own responses, scored by KL(teacher‖student) at its own positions.
    `skip_bad`: skip malformed records of `data` (counted in the report's "skipped_records"), as the job that
    made the targets did. The settings: `config` (an `EvaluateConfig`) or `settings`, its fields. Writes `out`
    (JSON) when given; returns the report."""
    from transformers import AutoModelForCausalLM

    from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records

    cfg = job_config(EvaluateConfig, config, settings, "evaluate")
    max_records, max_new_tokens, seed, one_hot_eps, batch_size = (cfg.max_records, cfg.max_new_tokens, cfg.seed,
                                                                  cfg.one_hot_eps, cfg.batch_size)
    t0 = time.perf_counter()
    target_dirs, student_dirs = _named_paths(targets, "targets"), _named_paths(students, "student")
    if not target_dirs and not student_dirs:
        raise ValueError("nothing to evaluate: give --targets NAME=DIR and/or --student NAME=PATH")
    tok = load_tokenizer(tokenizer or teacher)
    records, load_report = load_teacher_records(data, skip_bad=skip_bad)
    tokenized = tokenize_records(records, tok)  # all records: the target shards cover all of them
    idx = list(range(len(tokenized) if max_records is None else min(max_records, len(tokenized))))
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher)
    report: dict[str, Any] = {"teacher": teacher, "data": data, "records": len(idx)}
    if skip_bad:  # (without it nothing is skipped; the report stays as it was, its numbers pinned by a test)
        report["skipped_records"] = int(load_report.skipped)
    if target_dirs:
        t_lp, valid = response_logprobs(teacher_model, tokenized, idx, batch_size=batch_size)
        ests: dict[str, SparseDist | torch.Tensor] = {
            f"one-hot (eps={one_hot_eps})": one_hot_estimate(tokenized, idx, tokenized.vocab_size, one_hot_eps)}
        ests.update({name: read_target_rows(d, tokenized, idx) for name, d in target_dirs.items()})
        report["positions"] = int(valid.sum())
        report["estimation"] = estimation_table(t_lp, ests, valid)
        del t_lp
    if student_dirs:
        report["students"] = {}
        prompt_records = load_teacher_records(prompts)[0] if prompts else None
        t_rows = response_logprobs(teacher_model, tokenized, idx, batch_size=batch_size)  # once for all students
        for name, path in student_dirs.items():
            model = AutoModelForCausalLM.from_pretrained(path)
            own = (sample_own(path, prompt_records, tok, max_new_tokens=max_new_tokens, seed=seed)
                   if prompt_records else None)
            report["students"][name] = student_metrics(teacher_model, model, tokenized, own_samples=own,
                                                       indices=idx, teacher_rows=t_rows, batch_size=batch_size)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if out:
        atomic_write_json(Path(out), json.loads(json.dumps(report)))
    return report


def sample_own(model_path: str, prompt_records: Sequence[dict], tokenizer, *, max_new_tokens: int = 48,
               temperature: float = 1.0, seed: int = 0, batch_size: int = 32):
    """A model's own responses to the prompts of `prompt_records`, tokenized like teacher data (text only, as
    the lab's black-box teacher produces them)."""
    from bayeskd.data import tokenize_records
    from bayeskd.teachers.local import BlackBoxTeacher
    from bayeskd.teachers.sampling import sample_records

    recs, _ = sample_records(BlackBoxTeacher(model_path), prompt_records, max_new_tokens, temperature, seed,
                             batch_size)
    return tokenize_records(recs, tokenizer) if recs else None


def format_estimation(table: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of `estimation_table`'s result."""
    cols = list(next(iter(table.values())).keys()) if table else []
    lines = ["| estimate | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in table.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4f}" if isinstance(x, float) else str(x)
