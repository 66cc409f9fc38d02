"""The lab's KD recipe, chosen on validation prompts, and the students' learning curves.

The lab's held-out prompts (none shares text with a training prompt) are split by text in two halves:
- validation: chooses the CE weight of every KD student (the same one for all: methods are compared at one recipe)
  and the white-box teacher's K (64 or the whole vocabulary); nothing else is scored there;
- test: every student table and curve is scored there, and nothing is chosen on it.

A recipe is chosen by the validation teacher-forced KL(teacher ‖ student), mean over seeds, of the KD methods in
RECIPE_METHODS: the CE weight with the lowest mean over them (white-box at its best K for that weight), then the
white-box K with the lowest KL at that weight.

The learning curves train the main methods once for max(curve_epochs) epochs (cosine schedule over the whole run)
and score the checkpoints at each of curve_epochs: teacher-forced KL and KL on the student's own samples against
trained tokens, so a ranking measured at one budget can be checked at others.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RECIPE_METHODS = ("posterior-kd", "white-box")  # what the CE weight and the white-box K are chosen on
CURVE_METHODS = ("sft", "posterior-kd", "posterior-kd-text", "white-box")

# train(method, seed, out_name, **distill overrides) -> the student's directory
Train = Callable[..., Path]
# score(model_dir, seed) -> {"kl_tf": ..., "kl_own": ..., ...}
Score = Callable[[Path, int], dict[str, float]]


def split_heldout(records: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Record indices of the validation and the test half: the distinct prompt texts ordered by their sha256, the
    first half validation (deterministic, and a prompt's records all land on one side)."""
    texts = sorted({r["prompt"] for r in records}, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    if len(texts) < 2:
        raise ValueError(f"{len(texts)} distinct held-out prompt(s): at least 2 are needed for validation and test")
    valid = set(texts[:len(texts) // 2])
    return ([i for i, r in enumerate(records) if r["prompt"] in valid],
            [i for i, r in enumerate(records) if r["prompt"] not in valid])


def mean_std(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def _tag(value: float) -> str:
    return f"{value:g}".replace(".", "p")


def choose_recipe(methods: Sequence[str], ce_weights: Sequence[float], whitebox_ks: Sequence[int], seeds: int,
                  train: Train, score_valid: Score, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every (method, CE weight, white-box K, seed) of the grid, score it on the validation half and choose
    (module docstring). A grid of one point trains nothing."""
    methods = [m for m in RECIPE_METHODS if m in methods]
    if (len(ce_weights) == 1 and len(whitebox_ks) == 1) or not methods:
        return {"ce_weight": float(ce_weights[0]), "whitebox_top_k": int(whitebox_ks[0]), "grid": [],
                "chosen_on": "not chosen: a grid of one point (or no KD method to choose on)"}
    grid = []
    for method in methods:
        for ce in ce_weights:
            for k in (whitebox_ks if method == "white-box" else (None,)):
                extra = {} if k is None else {"whitebox_top_k": int(k)}
                name = f"{method}-ce{_tag(ce)}" + ("" if k is None else f"-k{k}")
                kl = [score_valid(train(method, seed, f"recipe/{name}-s{seed}", ce_weight=float(ce), **extra),
                                  seed)["kl_tf"] for seed in range(seeds)]
                grid.append({"method": method, "ce_weight": float(ce), "whitebox_top_k": k, "kl_tf": mean_std(kl)})
                log(f"[lab] recipe {name}: validation kl_tf {grid[-1]['kl_tf']['mean']:.4f}")

    def best(method: str, ce: float) -> dict[str, Any]:
        return min((r for r in grid if r["method"] == method and r["ce_weight"] == ce),
                   key=lambda r: r["kl_tf"]["mean"])

    score = {ce: float(np.mean([best(m, ce)["kl_tf"]["mean"] for m in methods])) for ce in ce_weights}
    ce = min(ce_weights, key=lambda w: score[w])
    k = best("white-box", ce)["whitebox_top_k"] if "white-box" in methods else int(whitebox_ks[0])
    return {"ce_weight": float(ce), "whitebox_top_k": int(k), "grid": grid,
            "score": {str(w): s for w, s in score.items()}, "chosen_on": "validation kl_tf, mean over seeds and over " + ", ".join(methods)}


def curve_checkpoints(epochs: Sequence[float], steps_per_epoch: int) -> tuple[list[int], int]:
    """The steps a learning curve scores at, and the checkpoint interval of its run (their gcd)."""
    want = sorted({max(1, math.ceil(e * steps_per_epoch)) for e in epochs})
    return want, math.gcd(*want)


def learning_curves(methods: Sequence[str], epochs: Sequence[float], seeds: int, steps_per_epoch: int,
                    train: Train, score_test: Score, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One run of max(epochs) epochs per method and seed, its checkpoints at `epochs` scored on the test half."""
    top = max(epochs)
    want, every = curve_checkpoints(epochs, steps_per_epoch)
    rows = []
    for method in methods:
        for seed in range(seeds):
            out = train(method, seed, f"curves/{method}-s{seed}", num_train_epochs=top, save_strategy="steps",
                        save_steps=every, save_only_model=True)
            summary = json.loads((out / "summary.json").read_text())
            tokens_per_step = summary["train_tokens"] / max(1, summary["steps"])
            for step in want:
                ckpt = out if step == summary["steps"] else out / f"checkpoint-{step}"  # (the end: the model)
                if not ckpt.exists():
                    raise FileNotFoundError(f"{ckpt}: the curve's checkpoint is missing (steps per epoch "
                                            f"{steps_per_epoch}, run of {summary['steps']} steps)")
                m = score_test(ckpt, seed)
                rows.append({"method": method, "seed": seed, "steps": step, "epochs": step / steps_per_epoch,
                             "tokens": int(round(step * tokens_per_step)), **m})
                log(f"[lab] curve {method} seed {seed} step {step}: kl_tf {m['kl_tf']:.4f} "
                    f"kl_own {m.get('kl_own', float('nan')):.4f}")
    summary_rows = []
    for method in methods:
        for step in want:
            runs = [r for r in rows if r["method"] == method and r["steps"] == step]
            summary_rows.append({"method": method, "steps": step, "epochs": step / steps_per_epoch,
                                 "tokens": int(np.mean([r["tokens"] for r in runs])),
                                 **{k: mean_std([r[k] for r in runs]) for k in ("kl_tf", "kl_own") if k in runs[0]}})
    ranking = {str(step): sorted(methods, key=lambda m: next(r["kl_tf"]["mean"] for r in summary_rows
                                                             if r["method"] == m and r["steps"] == step))
               for step in want}
    return {"run_epochs": top, "steps_per_epoch": steps_per_epoch, "seeds": seeds, "rows": rows,
            "summary": summary_rows, "ranking_kl_tf": ranking}


def format_recipe(recipe: dict[str, Any], validation_records: int) -> list[str]:
    """The recipe section of report.md."""
    lines = [f"## KD recipe (chosen on {validation_records} validation records; every student table is on the "
             "test half)", ""]
    if not recipe.get("grid"):
        return lines + [f"CE weight {recipe['ce_weight']:g}, white-box K {_k(recipe['whitebox_top_k'])} "
                        f"({recipe['chosen_on']}).", ""]
    lines += ["| method | CE weight | white-box K | validation kl_tf |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['ce_weight']:g} | "
              f"{'–' if r['whitebox_top_k'] is None else _k(r['whitebox_top_k'])} | "
              f"{r['kl_tf']['mean']:.4f} ± {r['kl_tf']['std']:.4f} |" for r in recipe["grid"]]
    return lines + ["", f"Chosen ({recipe['chosen_on']}): CE weight {recipe['ce_weight']:g} for every KD student "
                    f"(SFT keeps CE alone), white-box K {_k(recipe['whitebox_top_k'])}.", ""]


def format_curves(curves: dict[str, Any]) -> list[str]:
    """The learning-curve section of report.md: one row per method, one column per budget."""
    summary = curves["summary"]
    steps = sorted({r["steps"] for r in summary})
    methods = list(dict.fromkeys(r["method"] for r in summary))
    cell = {(r["method"], r["steps"]): r for r in summary}
    head = " | ".join(f"{s} steps ({cell[(methods[0], s)]['tokens']} tokens)" for s in steps)
    lines = [f"## Learning curves (one {curves['run_epochs']:g}-epoch cosine run per method and seed, "
             f"{curves['seeds']} seed(s); its checkpoints scored on the test half: kl_tf / kl_own)", "",
             f"| student | {head} |", "|---|" + "---:|" * len(steps)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            f"{cell[(m, s)]['kl_tf']['mean']:.4f} / {cell[(m, s)]['kl_own']['mean']:.4f}" if "kl_own" in cell[(m, s)]
            else f"{cell[(m, s)]['kl_tf']['mean']:.4f}" for s in steps) + " |")
    lines += ["", "Ranking by kl_tf at each budget: " + "; ".join(
        f"{s} steps: {' < '.join(r)}" for s, r in curves["ranking_kl_tf"].items()), ""]
    return lines


def _k(k: int) -> str:
    return "all" if not k else str(k)
