"""The lab's on-policy study: does training on the student's own samples pay, and what does each target cost?

One warm start per seed, then every continuation from it at one recipe (constant learning rate `onpolicy_lr`, the
KD recipe's CE weight, forward KL, `onpolicy_epochs` epochs of the training prompts, batch and seed of the lab):

- warm start: a posterior-KD run of `onpolicy_warm_epochs` epochs (the lab's best black-box off-policy student),
  checkpointed every epoch; the checkpoint with the lowest validation kl_tf (where it stops improving); the lab's
  posterior-KD learning curve is that run when its epochs and checkpoints are the same (trained once);
- `offpolicy-more`: more off-policy posterior-KD from it, for `onpolicy_offpolicy_epochs` epochs, checkpointed every
  half epoch: the row at `onpolicy_epochs` compares at equal steps; for equal wall-clock the same run goes on (for
  as many epochs as the slowest on-policy row's seconds need, at most `onpolicy_equal_time_max_epochs`) and each
  on-policy row is compared with the checkpoint whose elapsed seconds are nearest its own ("short" where even the
  longest run had fewer seconds); only the checkpoints compared are scored;
- `offpolicy-whitebox`: more off-policy KD from the real teacher's logits (the whole vocabulary), checkpointed as
  `offpolicy-more`: what the white-box on-policy rows are matched against (equal steps and equal seconds), so their
  gain is the on-policy effect, not the better target's;
- `onpolicy-posterior`: λ = `onpolicy_fraction` of each batch the student's samples, targets the posterior (prior
  rows at the student's contexts x the aligned proxy, the calibration's best fixed combination): no teacher call;
- `onpolicy-k20` / `onpolicy-k0`: the same, conditioned on the teacher server's scores of the samples (echo +
  top-20 log-probabilities, or only the sampled token's): the lab teacher over HTTP, as it was sampled;
- `onpolicy-whitebox`: bayeskd's trainer with the real teacher's logits at the samples (white-box);
- `trl-gkd-fkl` / `trl-gkd` / `trl-gkd-rkl`: TRL's GKDTrainer (`bayeskd.lab.trl_peers`), λ = 1, β 0 / 0.5 / 1.

Every row is scored on the test half (nll, kl_tf, and kl_own pooled over `onpolicy_own_samples` samples per test
prompt), with its seconds per 1k trained tokens and its teacher requests and scored tokens per trained token.
"""
from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from bayeskd.lab.recipe import mean_std
from bayeskd.lab.trl_peers import GKD_BETAS, trl_gkd

BAYESKD_ROWS = ("onpolicy-posterior", "onpolicy-k20", "onpolicy-k0", "onpolicy-whitebox")
ONPOLICY_METHODS = ("offpolicy-more", "offpolicy-whitebox", *BAYESKD_ROWS, *GKD_BETAS)
WHITEBOX_ROWS = ("onpolicy-whitebox", *GKD_BETAS)  # their off-policy match: offpolicy-whitebox
SCORED_K = {"onpolicy-k20": 20, "onpolicy-k0": 0}
METRICS = ("nll", "kl_tf", "kl_own")
TEACHER_NAME = "lab-teacher"  # the model name serve-teacher answers to for the scored rows

# score(model_dir, seed) -> {"nll", "kl_tf", "kl_own"} on the test half; valid(model_dir, seed) -> validation kl_tf
Score = Callable[[Path, int], dict[str, float]]


def online_combination(calibration: dict[str, Any]) -> dict[str, Any]:
    """The posterior settings of the trainer's online combination: the calibration's best fixed one (the online
    kernel takes no adaptive weights), as BayesKDConfig fields."""
    row = min((r for r in calibration["table"] if r["mode"] != "adaptive"), key=lambda r: r["nll"])
    names = {"a": "posterior_a", "b": "posterior_b", "c": "posterior_c", "w": "posterior_w"}
    return {"posterior_mode": row["mode"], **{names[k]: float(v) for k, v in row.items() if k in names}}


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, directory) of a run's checkpoints, the finished model last."""
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    final = json.loads((out / "summary.json").read_text())["steps"]
    return [(s, out / f"checkpoint-{s}") for s in steps if s != final] + [(final, out)]


def warm_start(seed: int, train, valid: Callable[[Path, int], float], cfg, steps_per_epoch: int,
               log: Callable[[str], None], name: str | None = None) -> dict[str, Any]:
    """The seed's warm start: the validation-best epoch checkpoint of one posterior-KD run (in run/`name`: the
    learning curve's run when it is this very run, so it is trained once)."""
    out = train("posterior-kd", seed, name or f"onpolicy/warm-s{seed}", num_train_epochs=cfg.onpolicy_warm_epochs,
                save_strategy="steps", save_steps=steps_per_epoch, save_only_model=True)
    curve = [{"steps": s, "kl_tf_valid": valid(d, seed), "dir": str(d)} for s, d in _checkpoints(out)]
    best = min(curve, key=lambda r: r["kl_tf_valid"])
    log(f"[lab] on-policy warm start seed {seed}: step {best['steps']} of {curve[-1]['steps']} (validation kl_tf "
        f"{best['kl_tf_valid']:.4f}; curve " + ", ".join(f"{r['kl_tf_valid']:.4f}" for r in curve) + ")")
    return {"best": best, "curve": curve}


def _price(summary: dict[str, Any]) -> dict[str, float]:
    """Seconds per 1k trained tokens (the response tokens the loss is on), and teacher requests and scored tokens
    per trained token."""
    tokens = max(1, int(summary.get("train_response_tokens") or 0))
    scoring = (summary.get("onpolicy") or {}).get("scoring") or {}
    return {"train_seconds": float(summary.get("train_seconds", float("nan"))),
            "seconds_per_1k_tokens": 1000.0 * float(summary.get("train_seconds", float("nan"))) / tokens,
            "train_tokens": float(tokens),
            "requests_per_token": float(scoring.get("requests", 0)) / tokens,
            "scored_tokens_per_token": float(scoring.get("scored_tokens", 0)) / tokens}


def onpolicy_study(paths: dict[str, str], run: Path, cfg, progress: bool, train, score: Score,
                   valid: Callable[[Path, int], float], steps_per_epoch: int, calibration: dict[str, Any],
                   log: Callable[[str], None] = print, warm_names: dict[int, str] | None = None) -> dict[str, Any]:
    """The study (module docstring) for the rows of `cfg.methods` in ONPOLICY_METHODS, over `cfg.seeds` seeds.
    `train(method, seed, name, **distill overrides)` trains a lab student (the overrides may give `student`);
    `score` / `valid` score a model directory; `warm_names`: per seed, the run that already is its warm start's."""
    from bayeskd.lab.records import train_records
    from bayeskd.teachers.server import running_server

    rows = [m for m in ONPOLICY_METHODS if m in cfg.methods]
    data = str(train_records(run, cfg))
    continuation = dict(num_train_epochs=cfg.onpolicy_epochs, learning_rate=cfg.onpolicy_lr,
                        lr_scheduler_type="constant", warmup_steps=0)
    onpolicy = dict(onpolicy_fraction=cfg.onpolicy_fraction, onpolicy_temperature=cfg.onpolicy_temperature,
                    onpolicy_max_new_tokens=cfg.max_new_tokens)
    posterior = dict(targets=str(run / "prior" / "topk"), proxy=str(paths["pipeline_proxy"]),
                     prior=str(run / "prior"), **online_combination(calibration))
    per_seed: dict[str, list[dict[str, float]]] = {}
    warm: dict[int, Any] = {}
    equal_time: dict[str, list[dict[str, float]]] = {}  # against off-policy posterior-KD
    equal_time_whitebox: dict[str, list[dict[str, float]]] = {}  # the white-box rows against off-policy white-box
    servers = ExitStack()  # the teacher server, started by the first scored row, stopped at the end (also on error)

    def scored(point: dict[str, Any], seed: int) -> dict[str, Any]:
        """An off-policy checkpoint with its scores: only the ones a comparison reads are scored (each costs
        own samples)."""
        if "kl_own" not in point:
            point.update(score(Path(point["dir"]), seed))
        return point

    url = None
    with servers:
        for seed in range(cfg.seeds):
            warm[seed] = warm_start(seed, train, valid, cfg, steps_per_epoch, log, (warm_names or {}).get(seed))
            start = Path(warm[seed]["best"]["dir"])
            per_seed.setdefault("warm start", []).append(score(start, seed))
            off = _OffPolicy(train, cfg, seed, start, steps_per_epoch, continuation, scored)
            for method in rows:
                name = f"onpolicy/{method}-s{seed}"
                if method == "offpolicy-more":
                    m = off.continued("posterior-kd", name)
                elif method == "offpolicy-whitebox":
                    m = off.continued("white-box", name, whitebox_top_k=0)
                elif method in GKD_BETAS:
                    kw = {**cfg.train_kwargs(seed, progress), **continuation}
                    out = trl_gkd(data, str(start), paths["teacher"], run / name, kw, beta=GKD_BETAS[method],
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.onpolicy_temperature,
                                  lmbda=cfg.onpolicy_fraction)
                    m = {**score(out, seed), **_price(json.loads((out / "summary.json").read_text()))}
                else:
                    extra: dict[str, Any] = {}
                    if method == "onpolicy-whitebox":
                        extra = dict(teacher=paths["teacher"], onpolicy_targets="teacher", whitebox_top_k=0)
                    elif method == "onpolicy-posterior":
                        extra = dict(**posterior, onpolicy_targets="posterior")
                    else:
                        if url is None:
                            url = servers.enter_context(running_server(paths["teacher"], name=TEACHER_NAME))
                        extra = dict(**posterior, onpolicy_targets="scored", teacher_url=url,
                                     teacher_model=TEACHER_NAME, onpolicy_score_top_k=SCORED_K[method])
                    out = train("onpolicy", seed, name, student=str(start), **continuation, **onpolicy, **extra)
                    m = {**score(out, seed), **_price(json.loads((out / "summary.json").read_text()))}
                per_seed.setdefault(method, []).append(m)
                log(f"[lab] on-policy {method} seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
            # each on-policy row against off-policy training of the same seconds: posterior-KD for every row,
            # white-box KD for the white-box rows ("short": the off-policy run, at its longest, had fewer seconds)
            for kind, table in (("posterior-kd", equal_time), ("white-box", equal_time_whitebox)):
                matched = [m for m in rows if not m.startswith("offpolicy-") and kind in off.curves
                           and (kind == "posterior-kd" or m in WHITEBOX_ROWS) and cfg.onpolicy_equal_time_max_epochs]
                if matched:
                    off.lengthen(kind, max(per_seed[m][-1]["train_seconds"] for m in matched))
                for method in matched:
                    t = per_seed[method][-1]["train_seconds"]
                    near = scored(min(off.curves[kind], key=lambda r: abs(r["seconds"] - t)), seed)
                    table.setdefault(method, []).append({
                        "offpolicy_steps": near["steps"], "offpolicy_seconds": near["seconds"], "seconds": t,
                        "short": bool(off.curves[kind][-1]["seconds"] < 0.9 * t),
                        **{f"offpolicy_{k}": near[k] for k in METRICS if k in near}})
            warm[seed]["offpolicy_curve"] = off.curves.get("posterior-kd", [])
            warm[seed]["offpolicy_whitebox_curve"] = off.curves.get("white-box", [])
    summary = {method: {k: mean_std([r[k] for r in runs]) for k in runs[0]} for method, runs in per_seed.items()}
    return {"rows": rows, "per_seed": per_seed, "summary": summary, "warm_start": warm, "equal_time": equal_time,
            "equal_time_whitebox": equal_time_whitebox, "gains": _gains(per_seed, equal_time, equal_time_whitebox),
            "recipe": {**continuation, **onpolicy, "ce_weight": cfg.ce_weight, "divergence": "forward_kl",
                       "online_combination": online_combination(calibration)}}


class _OffPolicy:
    """One seed's off-policy continuations from its warm start `start` (posterior-KD, white-box): each a
    constant-lr run checkpointed every half epoch, its curve (steps, seconds, directory) in `curves[kind]`."""

    def __init__(self, train, cfg, seed: int, start: Path, steps_per_epoch: int, continuation: dict[str, Any],
                 scored: Callable[[dict[str, Any], int], dict[str, Any]]):
        self.train, self.cfg, self.seed, self.start = train, cfg, seed, start
        self.steps_per_epoch, self.continuation, self.scored = steps_per_epoch, continuation, scored
        self.curves: dict[str, list[dict[str, Any]]] = {}
        self.runs: dict[str, tuple[str, dict[str, Any]]] = {}  # kind -> (name, train overrides)

    def run(self, kind: str, name: str, epochs: float, **extra: Any) -> dict[str, Any]:
        """More off-policy training of `kind` for `epochs`, checkpointed every half epoch (at most ~40
        checkpoints): its curve in `curves`; returns its summary."""
        steps = math.ceil(epochs * self.steps_per_epoch)
        out = self.train(kind, self.seed, name, student=str(self.start),
                         **{**self.continuation, "num_train_epochs": epochs}, save_strategy="steps",
                         save_steps=max(1, self.steps_per_epoch // 2, math.ceil(steps / 40)), save_only_model=True,
                         **extra)
        summary = json.loads((out / "summary.json").read_text())
        per_step = summary["train_seconds"] / max(1, summary["steps"])
        self.curves[kind] = [{"steps": s, "seconds": s * per_step, "dir": str(d)} for s, d in _checkpoints(out)]
        return summary

    def continued(self, kind: str, name: str, **extra: Any) -> dict[str, Any]:
        """The off-policy row of `kind`: its checkpoint at `onpolicy_epochs` (equal steps), scored and priced."""
        self.runs[kind] = (name, extra)
        summary = self.run(kind, name, self.cfg.onpolicy_offpolicy_epochs, **extra)
        at = math.ceil(self.cfg.onpolicy_epochs * self.steps_per_epoch)
        m = dict(self.scored(min(self.curves[kind], key=lambda r: abs(r["steps"] - at)), self.seed))
        share = m.pop("steps") / max(1, summary["steps"])  # this checkpoint's part of the run
        m.pop("dir")
        m.update(_price(summary), train_seconds=m.pop("seconds"))
        m["train_tokens"] *= share
        return m

    def lengthen(self, kind: str, seconds: float) -> None:
        """Off-policy training of `kind` long enough to match `seconds` (on-policy steps cost several off-policy
        ones): the same run for more epochs (constant lr: its first checkpoints are the short run's), at most
        `onpolicy_equal_time_max_epochs`. Each try retrains from the warm start: `save_only_model` checkpoints
        carry no optimizer state to resume from, and off-policy epochs are cheap."""
        for _ in range(3):  # (a longer run can be faster per step than the one it was planned from)
            end = self.curves[kind][-1]
            per_epoch = end["seconds"] * self.steps_per_epoch / max(1, end["steps"])
            epochs = min(self.cfg.onpolicy_equal_time_max_epochs, math.ceil(1.3 * seconds / max(per_epoch, 1e-9)))
            if end["seconds"] >= 0.95 * seconds or epochs * self.steps_per_epoch <= end["steps"]:
                return
            name, extra = self.runs[kind]
            self.run(kind, f"{name}-{epochs}ep", float(epochs), **extra)


def _gains(per_seed: dict[str, list[dict[str, float]]], equal_time: dict[str, list[dict[str, float]]],
           equal_time_whitebox: dict[str, list[dict[str, float]]] | None = None) -> dict[str, Any]:
    """Per row and seed, kl_own lowered (positive: better) from the warm start, from more off-policy posterior-KD at
    equal steps and at equal seconds, and (white-box rows) from more off-policy white-box KD at equal steps and
    seconds: the on-policy effect at the same targets. For the black-box rows, the share of white-box on-policy's effect (TRL's
    forward-KL GKD against off-policy white-box KD) each recovers against off-policy posterior-KD, at equal steps."""
    out: dict[str, Any] = {}
    warm = per_seed.get("warm start", [])
    off = per_seed.get("offpolicy-more", [])
    off_wb = per_seed.get("offpolicy-whitebox", [])
    for method, runs in per_seed.items():
        if method in ("warm start",):
            continue
        g = {"vs_warm_start": [w["kl_own"] - r["kl_own"] for w, r in zip(warm, runs)]}
        if off and method != "offpolicy-more":
            g["vs_offpolicy_equal_steps"] = [o["kl_own"] - r["kl_own"] for o, r in zip(off, runs)]
        if off_wb and method in WHITEBOX_ROWS:
            g["vs_offpolicy_whitebox_equal_steps"] = [o["kl_own"] - r["kl_own"] for o, r in zip(off_wb, runs)]
        for key, table in (("vs_offpolicy_equal_time", equal_time),
                           ("vs_offpolicy_whitebox_equal_time", equal_time_whitebox or {})):
            if method in table:
                g[key] = [e["offpolicy_kl_own"] - r["kl_own"] for e, r in zip(table[method], runs)]
                g[f"{key}_short"] = [bool(e.get("short", False)) for e in table[method]]
        out[method] = g
    ref = out.get("trl-gkd-fkl", {}).get("vs_offpolicy_whitebox_equal_steps")
    for method in ("onpolicy-k20", "onpolicy-k0", "onpolicy-posterior"):
        mine = out.get(method, {}).get("vs_offpolicy_equal_steps")
        if ref and mine:
            out[method]["share_of_whitebox_gain"] = [m / r if r > 0 else float("nan") for m, r in zip(mine, ref)]
    return out


def format_onpolicy(study: dict[str, Any]) -> list[str]:
    """The on-policy section of report.md."""
    r = study["recipe"]
    lines = [f"## On-policy distillation (from a warm start; {r['num_train_epochs']:g} epoch(s) more at constant lr "
             f"{r['learning_rate']:g}, λ {r['onpolicy_fraction']:g}, forward KL, CE weight {r['ce_weight']:g}; "
             "test half)", "",
             "| row | nll | kl_tf | kl_own | kl_own gain vs off-policy posterior-KD, equal steps / equal seconds "
             "| vs off-policy white-box, equal steps / equal seconds | s / 1k tokens | teacher requests / token "
             "| scored tokens / token |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    s, gains = study["summary"], study["gains"]
    for method, row in s.items():
        g = gains.get(method, {})

        def fmt(key: str) -> str:  # (*: an off-policy run shorter in seconds than the row, at its longest)
            return f"{mean_std(g[key])['mean']:+.4f}" + ("*" if any(g.get(f"{key}_short", ())) else "") \
                if key in g else "–"

        price = (f"{row['seconds_per_1k_tokens']['mean']:.2f} | {row['requests_per_token']['mean']:.4f} | "
                 f"{row['scored_tokens_per_token']['mean']:.3f}") if "seconds_per_1k_tokens" in row else "– | – | –"
        lines.append(f"| {method} | {row['nll']['mean']:.4f} | {row['kl_tf']['mean']:.4f} ± {row['kl_tf']['std']:.4f} "
                     f"| {row['kl_own']['mean']:.4f} ± {row['kl_own']['std']:.4f} | "
                     f"{fmt('vs_offpolicy_equal_steps')} / {fmt('vs_offpolicy_equal_time')} | "
                     f"{fmt('vs_offpolicy_whitebox_equal_steps')} / {fmt('vs_offpolicy_whitebox_equal_time')} | "
                     f"{price} |")
    return lines + ["", "kl_own: KL(teacher ‖ student) on the student's own samples, pooled over several samples per "
                    "test prompt. A positive gain: lower kl_own than off-policy training from the same warm start. "
                    "*: at equal seconds, the off-policy run at its longest had fewer seconds than the row.", ""]
