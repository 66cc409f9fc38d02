"""The lab's students: the KD recipe chosen on validation prompts, every method trained at it and scored on the
test prompts, and the main methods' learning curves (`bayeskd.lab.recipe` says how each is chosen and scored).

Every student directory is reused when its summary exists (a rerun resumes); `bayeskd.lab.run` removes them when a
training setting changes.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bayeskd.lab.records import train_records
from bayeskd.lab.onpolicy import ONPOLICY_METHODS, onpolicy_study
from bayeskd.lab.recipe import (CURVE_METHODS, choose_recipe, curve_checkpoints, learning_curves, mean_std,
                                 split_heldout)
from bayeskd.lab.trl_peers import PEER_METHODS, trl_sft

# The posterior shards posterior-KD learns from: the pipeline's proxy (aligned when the lab aligns one) combined
# with the prior as the calibration chose.
POSTERIOR_DIR = "posterior_calibrated"
TEXT_DIR, BUCKET_DIR = "posterior_text", "evidence_only"  # the text-only posterior; the revealed top-k + a bucket
K5_DIR = "posterior_k5"  # conditioned on the top-5 only (an API that reveals less)
METHODS = ("sft", "prior-kd", "posterior-kd", "posterior-kd-k5", "posterior-kd-text", "bucket-kd", "proxy-kd", "gad",
           "white-box")
EVIDENCE_METHODS = ("posterior-kd-k5", "posterior-kd-text", "bucket-kd")  # need the teacher's revealed log-probs
# every row the lab can run: the students above, TRL's SFT peers (same table) and the on-policy study's rows
ALL_METHODS = (*METHODS, *PEER_METHODS, *ONPOLICY_METHODS)


def _gad_student(seed: int, paths: dict[str, str], run: Path, cfg, progress: bool) -> Path:
    """GAD from the seed's SFT student (the paper's SFT warm-up); D, initialised from it, trains alone first."""
    from bayeskd.distillation.gad import gad

    out = run / "students" / f"gad-s{seed}"
    if not (out / "summary.json").exists():
        sft = distill_student("sft", seed, paths, run, cfg, progress)
        gad(str(train_records(run, cfg)), str(sft), str(out), warmup_steps=cfg.gad_d_warmup,
            warmup_d_only_steps=cfg.gad_d_warmup, steps=cfg.gad_steps, group_size=cfg.gad_group,
            batch_prompts=cfg.gad_batch_prompts, learning_rate=cfg.gad_lr, d_lr=cfg.gad_lr,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.gad_temperature, sft_coef=cfg.gad_sft_coef, seed=seed, progress=progress)
    return out / "student"


def distill_student(method: str, seed: int, paths: dict[str, str], run: Path, cfg, progress: bool,
                    name: str | None = None, **overrides: Any) -> Path:
    """Train (or reuse) the student of `method` with `seed` into run/students/<method>-s<seed> (or run/<name>),
    with `cfg`'s recipe and `overrides` (distill keywords); returns its directory."""
    from bayeskd.distillation.trainer import distill

    out = run / (name or f"students/{method}-s{seed}")
    if method != "gad" and (out / "summary.json").exists():
        return out
    kwargs = cfg.train_kwargs(seed, progress, kd=method not in ("sft", *PEER_METHODS))
    if method != "white-box":
        kwargs.pop("whitebox_top_k", None)
    if "num_train_epochs" in overrides:  # (learning curves, the on-policy study: their epochs, not the step budget)
        kwargs.pop("max_steps", None)
    kwargs.update(overrides)
    student = kwargs.pop("student", paths["student"])  # (the on-policy study starts from a warm start)
    data = str(train_records(run, cfg))
    if method == "sft":
        distill(data, student, str(out), **kwargs)
    elif method in PEER_METHODS:  # TRL's own SFTTrainer (bayeskd.lab.trl_peers)
        trl_sft(data, student, out, kwargs, text=method == "trl-sft-text")
    elif method == "onpolicy":  # the on-policy study's rows: their targets, teacher and server come in overrides
        distill(data, student, str(out), **kwargs)
    elif method == "prior-kd":
        distill(data, student, str(out), targets=str(run / "prior" / "topk"), **kwargs)
    elif method == "posterior-kd":
        distill(data, student, str(out), targets=str(run / POSTERIOR_DIR), **kwargs)
    elif method == "posterior-kd-k5":  # the same posterior conditioned on the top-5 only
        distill(data, student, str(out), targets=str(run / K5_DIR), **kwargs)
    elif method == "posterior-kd-text":  # the same posterior without the revealed log-probabilities
        distill(data, student, str(out), targets=str(run / TEXT_DIR), **kwargs)
    elif method == "bucket-kd":  # TRL's server KD: the revealed top-k, the rest of the mass in one bucket
        distill(data, student, str(out), targets=str(run / BUCKET_DIR), kd_tail="bucket", **kwargs)
    elif method == "proxy-kd":  # the aligned proxy's own top-K, KD weighted by its likelihood of the response
        kwargs.pop("kd_weight")
        distill(data, student, str(out), targets=str(run / "proxy_targets"), method="proxy-kd", **kwargs)
    elif method == "gad":
        return _gad_student(seed, paths, run, cfg, progress)
    elif method == "white-box":  # the upper bound: reads the real teacher's logits (K: cfg's, 0 = all)
        distill(data, student, str(out), teacher=paths["teacher"], **kwargs)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    return out


def students(paths, run: Path, cfg, tok, progress: bool, log: Callable[[str], None], *,
             pipeline_proxy: str | None = None, calibration: dict[str, Any] | None = None
             ) -> tuple[dict[str, Any], Any]:
    """The recipe (chosen on the validation half), every method at it (scored on the test half), the curves and
    the on-policy study (`bayeskd.lab.onpolicy`: needs the pipeline's proxy and the calibration).
    Returns the report's "students" section and `cfg` with the chosen recipe."""
    from transformers import AutoModelForCausalLM

    from bayeskd.data import load_teacher_records, load_tokenized_records, tokenize_records
    from bayeskd.evaluation.evaluate import response_logprobs, sample_own, student_metrics
    from bayeskd.lab.teacher import mean_entropy

    held, _ = load_teacher_records(str(run / "teacher_heldout.jsonl"))
    held_tok = tokenize_records(held, tok)
    valid_idx, test_idx = split_heldout(held)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    t_valid = response_logprobs(teacher, held_tok, valid_idx)
    t_test = response_logprobs(teacher, held_tok, test_idx)  # the teacher on test text: once for every student
    test_prompts = [held[i] for i in test_idx]

    def score(model_dir: Path, seed: int, rows, idx, own: bool) -> dict[str, float]:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        samples = (sample_own(str(model_dir), test_prompts, tok, max_new_tokens=cfg.max_new_tokens, seed=1000 + seed)
                   if own else None)
        return student_metrics(teacher, model, held_tok, indices=idx, teacher_rows=rows, own_samples=samples)

    def train(method: str, seed: int, name: str, **overrides: Any) -> Path:
        return distill_student(method, seed, paths, run, cfg, progress, name=name, **overrides)

    recipe = choose_recipe(cfg.methods, cfg.ce_weights if cfg.ce_weight is None else (cfg.ce_weight,),
                           cfg.whitebox_ks if cfg.whitebox_top_k is None else (cfg.whitebox_top_k,), cfg.seeds, train,
                           lambda d, seed: score(d, seed, t_valid, valid_idx, False), log)
    cfg = replace(cfg, ce_weight=recipe["ce_weight"], whitebox_top_k=recipe["whitebox_top_k"])
    log(f"[lab] KD recipe: CE weight {cfg.ce_weight:g}, white-box K {cfg.whitebox_top_k or 'all'}")

    per_seed: dict[str, list[dict[str, float]]] = {"student init": [score(Path(paths["student"]), 0, t_test, test_idx,
                                                                          True)]}
    d_acc_curves: dict[int, list[dict[str, Any]]] = {}  # GAD: the discriminator's accuracy, step by step
    for method in [m for m in cfg.methods
                   if m not in ONPOLICY_METHODS and (cfg.top_logprobs or m not in EVIDENCE_METHODS)]:
        per_seed[method] = []
        for seed in range(cfg.seeds):
            out = distill_student(method, seed, paths, run, cfg, progress)
            m = score(out, seed, t_test, test_idx, True)
            summary = json.loads(((out.parent if method == "gad" else out) / "summary.json").read_text())
            m["train_seconds"] = summary.get("train_seconds", summary.get("seconds", float("nan")))
            if "train_response_tokens" in summary:  # what each trainer trained on (TRL's text path: other tokens)
                m["trained_tokens"] = float(summary["train_response_tokens"])
                m["seconds_per_1k_tokens"] = 1000.0 * m["train_seconds"] / max(1.0, m["trained_tokens"])
            if method == "gad" and summary.get("history"):
                m["d_acc_final"] = float(summary["history"][-1].get("d_acc", float("nan")))
                d_acc_curves[seed] = [{"stage": h.get("stage"), "step": h.get("step"), "d_acc": h.get("d_acc"),
                                       "reward_mean": h.get("reward_mean")} for h in summary["history"]]
            per_seed[method].append(m)
            log(f"[lab] student {method} seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()))
    summary = {method: {metric: mean_std([r[metric] for r in runs if metric in r]) for metric in runs[0]}
               for method, runs in per_seed.items()}
    curves = None
    # (the learning curves and the on-policy study checkpoint by epochs of the training records)
    steps_per_epoch = int(np.ceil(len(load_tokenized_records(train_records(run, cfg), tok)[0]) / cfg.batch_size))
    curve_methods = [m for m in CURVE_METHODS if m in cfg.methods and (cfg.top_logprobs or m not in EVIDENCE_METHODS)]
    if cfg.curve_epochs and curve_methods:
        curves = learning_curves(curve_methods, cfg.curve_epochs, min(cfg.curve_seeds, cfg.seeds), steps_per_epoch,
                                 train, lambda d, seed: score(d, seed, t_test, test_idx, True), log)
    study = None
    if any(m in ONPOLICY_METHODS for m in cfg.methods):
        if pipeline_proxy is None or calibration is None:
            raise ValueError("the on-policy study needs the pipeline's proxy and the calibration")
        own_prompts = test_prompts * cfg.onpolicy_own_samples  # kl_own pooled: the on-policy effect is small

        def score_pooled(model_dir: Path, seed: int) -> dict[str, float]:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir))
            samples = sample_own(str(model_dir), own_prompts, tok, max_new_tokens=cfg.max_new_tokens,
                                 seed=1000 + seed)
            return student_metrics(teacher, model, held_tok, indices=test_idx, teacher_rows=t_test,
                                   own_samples=samples)

        warm_names = {}  # the curve's posterior-KD run when it is the warm start's run (same recipe and epochs,
        # a checkpoint every epoch): trained once
        if curves and "posterior-kd" in curve_methods and max(cfg.curve_epochs) == cfg.onpolicy_warm_epochs \
                and curve_checkpoints(cfg.curve_epochs, steps_per_epoch)[1] == steps_per_epoch:
            warm_names = {seed: f"curves/posterior-kd-s{seed}" for seed in range(curves["seeds"])}
        study = onpolicy_study({**paths, "pipeline_proxy": pipeline_proxy}, run, cfg, progress, train, score_pooled,
                               lambda d, seed: score(d, seed, t_valid, valid_idx, False)["kl_tf"], steps_per_epoch,
                               calibration, log, warm_names)
    sft_summary = json.loads((run / "students" / "sft-s0" / "summary.json").read_text()) \
        if (run / "students" / "sft-s0" / "summary.json").exists() else {}
    return {"heldout_records": len(test_idx), "validation_records": len(valid_idx), "per_seed": per_seed,
            "summary": summary, "recipe": recipe, "curves": curves, "gad_d_acc": d_acc_curves, "onpolicy": study,
            "budget": {"epochs": cfg.epochs, "steps": sft_summary.get("steps"),
                       "train_tokens": sft_summary.get("train_tokens")},
            "teacher_entropy": mean_entropy(*t_test), "teacher_positions": int(t_test[1].sum())}, cfg
