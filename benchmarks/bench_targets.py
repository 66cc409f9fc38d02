"""Lab rows at equal bytes per token: students distilled from (a) uncompressed top-K, (b) compact
top-K and (c) sampled targets, all made from the lab's posterior (its prior, aligned proxy and calibrated
combination, conditioned on the revealed log-probabilities: the posterior-KD student's recipe), at budgets B bytes
per target token.

    .venv/bin/python benchmarks/bench_targets.py --preset tiny [--budgets 64 128 256] [--seeds 3]

Needs a finished `bayeskd lab run --preset P` (runs/lab/P/run/report.json). Per budget B:
  raw        K = floor((B - 4) / 8)  (int32 id + float32 log-prob an entry, float32 tail a row)
  compact=K  the compact codec at the raw row's K (same targets, fewer bytes: is the codec harmless?)
  compact    K from the compact bytes per token measured on these targets (a linear fit a + b K over the
             compact=K rows), so that the shards cost about B
  sampled-h  the lab posterior (K = the lab's top_k), `keep_top` = h * slots entries kept exactly and
             `samples` = slots - keep_top draws from the rest (slots = the compact K of the budget), compact-coded;
             draws repeat and merge, so `samples` is raised once by the measured shortfall to reach about B
Each row: KL(truth || target) at the lab's estimation positions (`estimate_metrics`, as the lab scores targets; a
sampled row has tail 0, so it is +inf wherever a draw misses a token the truth gives mass: `kl_floor` floors the
target at 1e-6 to compare), the shard bytes per token on disk, and `seeds` students distilled with the lab's
posterior-KD recipe, scored as the lab scores them (`student_metrics`: teacher-forced KL to the truth, held-out
NLL). Sampled targets are drawn once (sample_seed 0), shared by every student seed. Everything is kept under
runs/lab/P/run/bench_targets/ (rerun = resume); writes benchmarks/results/targets_<preset>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import RESULTS, write_json

RAW_ENTRY, RAW_ROW = 8, 4  # bytes: int32 id + float32 log-prob an entry; float32 tail a row
KL_FLOOR = 1e-6


def raw_k(budget: float) -> int:
    """Uncompressed top-K that fits `budget` bytes per token."""
    return max(1, int((budget - RAW_ROW) // RAW_ENTRY))


def fit_bytes(ks, bytes_per_token) -> tuple[float, float]:
    """Least-squares a + b K through measured (K, bytes per token) points (b alone through the origin if one)."""
    ks = np.asarray(ks, float)
    y = np.asarray(bytes_per_token, float)
    if len(set(ks.tolist())) < 2:
        return 0.0, float(y.mean() / ks.mean())
    b, a = np.polyfit(ks, y, 1)
    return float(a), float(b)


def k_for_budget(budget: float, a: float, b: float) -> int:
    """The largest K with a + b K <= budget (at least 1)."""
    return max(1, int(math.floor((budget - a) / b + 1e-9)))


def sample_split(slots: int, keep_frac: float, top_k: int) -> tuple[int, int]:
    """(keep_top, samples) for `slots` stored entries: keep_top = floor(keep_frac * slots), capped at the
    posterior's K; the rest are draws."""
    keep = min(int(keep_frac * slots), top_k, slots - 1)
    return keep, slots - keep


def more_draws(samples: int, keep_top: int, slots: int, entries: float) -> int:
    """Draws that fill about `slots` stored entries, given that `samples` draws stored `entries` per token on
    average (repeated draws merge into one entry): scaled by the measured shortfall, never fewer."""
    distinct = max(1e-9, entries - keep_top)
    return max(samples, int(round(samples * (slots - keep_top) / distinct)))


def shard_bytes(d: Path) -> tuple[int, int]:
    """(bytes of the shard files, rows) of a target directory."""
    from bayeskd.core.sparse import read_manifest

    man = read_manifest(d)
    rows = sum(s["rows"] for s in man["shards"].values())
    return sum((d / name).stat().st_size for name in man["shards"]), rows


def _mean_std(values):
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


class Bench:
    def __init__(self, root: str, preset: str, seeds: int, log=print):
        from transformers import AutoModelForCausalLM

        from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
        from bayeskd.evaluation.evaluate import response_logprobs
        from bayeskd.lab.build import build_lab, get_preset
        from bayeskd.lab.run import RUN_CONFIGS, LabRunConfig

        lab_preset = get_preset(preset)
        self.paths = build_lab(root, lab_preset, progress=False)  # reuses the built lab
        self.run = Path(self.paths["root"]) / "run"
        report_path = self.run / "report.json"
        if not report_path.exists():
            raise SystemExit(f"{report_path}: no finished lab run; run `bayeskd lab run --preset {preset}` first")
        self.report = json.loads(report_path.read_text())
        base = lab_preset.base_preset().name
        self.cfg = replace(RUN_CONFIGS.get(lab_preset.name) or RUN_CONFIGS.get(base, LabRunConfig()), seeds=seeds)
        if self.report["config"]["top_k"] != self.cfg.top_k:
            raise SystemExit("the lab run was made with another config than the preset's defaults")
        self.combo = self.report["calibration"]["best"]
        self.proxy = str(self.run / "aligned_proxy" / "final") if self.cfg.align else self.paths["proxy"]
        self.work = self.run / "bench_targets"
        self.log = log
        self.prior = self._prior()
        self.log = log
        tok = load_tokenizer(self.paths["tokenizer"])
        train = tokenize_records(load_teacher_records(str(self.run / "teacher_train.jsonl"))[0], tok)
        self.train_tok = train
        self.est_idx = list(range(min(self.cfg.eval_records, len(train))))
        held, _ = load_teacher_records(str(self.run / "teacher_heldout.jsonl"))
        self.held_tok = tokenize_records(held, tok)
        self.teacher = AutoModelForCausalLM.from_pretrained(self.paths["teacher"])
        self.t_est = response_logprobs(self.teacher, train, self.est_idx)  # the truth where the lab scores targets
        self.t_held = response_logprobs(self.teacher, self.held_tok)  # the truth on held-out text (students)

    def _prior(self) -> str:
        """The lab's prior directory; when it does not load (written by an older version: no checksums), counted
        again with the lab's settings into bench_targets/prior (n-gram counts are deterministic: the same prior)."""
        from bayeskd.priors.base import load_prior
        from bayeskd.priors.estimate import estimate_prior

        try:
            load_prior(self.run / "prior" / "prior")
            return str(self.run / "prior")
        except Exception as e:  # noqa: BLE001 - any damage: recount
            out = self.work / "prior"
            if not (out / "summary.json").exists():
                self.log(f"[prior] the lab's prior does not load ({type(e).__name__}); counting it again in {out}")
                estimate_prior(str(self.run / "teacher_train.jsonl"), self.paths["tokenizer"], out=str(out),
                               order=self.cfg.order, top_k=self.cfg.top_k, write_topk=True,
                               codec="raw")
            return str(out)

    def targets(self, name: str, *, top_k: int, codec: str, samples: int | None = None, keep_top: int = 0) -> Path:
        """The lab's calibrated posterior-KD targets (`estimate_posterior`, as `bayeskd.lab.run` calls it) with K,
        codec and target kind changed."""
        from bayeskd.posterior.estimate import estimate_posterior

        out = self.work / name / "targets"
        if not (out / "summary.json").exists():
            t0 = time.perf_counter()
            estimate_posterior(str(self.run / "teacher_train.jsonl"), self.prior, self.proxy, str(out),
                               top_k=top_k, batch_size=16, codec=codec, samples=samples, keep_top=keep_top,
                               sample_seed=0, **self.combo)
            self.log(f"[targets] {name}: estimated in {time.perf_counter() - t0:.1f} s")
        return out

    def target_metrics(self, d: Path) -> dict[str, float]:
        from bayeskd.evaluation.evaluate import estimate_metrics, read_target_rows
        from bayeskd.evaluation.metrics import kl_teacher_to_estimate

        rows = read_target_rows(d, self.train_tok, self.est_idx)
        t_lp, valid = self.t_est
        m = estimate_metrics(t_lp, rows, valid, coverage_k=())
        m["kl_floor"] = float(kl_teacher_to_estimate(t_lp, rows, floor=KL_FLOOR)[valid].mean())
        m["entries_per_token"] = float(rows.num_listed().double().mean())
        nbytes, n = shard_bytes(d)
        m["bytes_per_token"] = nbytes / n
        return m

    def students(self, name: str, d: Path) -> list[dict[str, float]]:
        """The lab's posterior-KD student (`distill` with the lab's training settings), one per seed, scored with
        `student_metrics` against the teacher on held-out text."""
        from transformers import AutoModelForCausalLM

        from bayeskd import distill
        from bayeskd.evaluation.evaluate import student_metrics

        out = []
        for seed in range(self.cfg.seeds):
            sdir = self.work / name / f"student-s{seed}"
            if not (sdir / "summary.json").exists():
                distill(str(self.run / "teacher_train.jsonl"), self.paths["student"], str(sdir), targets=str(d),
                        **self.cfg.train_kwargs(seed, False))
            model = AutoModelForCausalLM.from_pretrained(str(sdir))
            m = student_metrics(self.teacher, model, self.held_tok, teacher_rows=self.t_held)
            out.append(m)
            self.log(f"[student] {name} seed {seed}: kl_tf={m['kl_tf']:.4f} nll={m['nll']:.4f}")
        return out

    def row(self, name: str, kind: str, budget: float | None, **target_kw) -> dict[str, Any]:
        t0 = time.perf_counter()
        d = self.targets(name, **target_kw)
        res = {"name": name, "kind": kind, "budget": budget, **{k: v for k, v in target_kw.items()},
               "target": self.target_metrics(d), "dir": str(d)}
        per_seed = self.students(name, d)
        res["per_seed"] = per_seed
        res["students"] = {k: _mean_std([r[k] for r in per_seed]) for k in ("kl_tf", "nll")}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        return res


def fmt(ms: dict[str, float]) -> str:
    return f"{ms['mean']:.4f} ± {ms['std']:.4f}"


def markdown(rows: list[dict[str, Any]], lab_ref: dict[str, Any] | None) -> str:
    head = ("| B | target | K / keep_top+samples | entries/tok | bytes/tok | KL(truth‖target) | KL floored 1e-6 "
            "| student KL_tf | student NLL |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        t = r["target"]
        kdesc = (f"{r['keep_top']}+{r['samples']}" if r.get("samples") else str(r["top_k"]))
        lines.append(f"| {r['budget'] if r['budget'] is not None else '—'} | {r['kind']} | {kdesc} | "
                     f"{t['entries_per_token']:.1f} | {t['bytes_per_token']:.1f} | {t['kl']:.4f} | "
                     f"{t['kl_floor']:.4f} | {fmt(r['students']['kl_tf'])} | {fmt(r['students']['nll'])} |")
    if lab_ref:
        lines.append(f"| (lab) | posterior-kd, raw K={lab_ref['k']} | {lab_ref['k']} | {lab_ref['k']} | "
                     f"{lab_ref['bytes_per_token']:.1f} | {lab_ref['kl']:.4f} | — | {fmt(lab_ref['kl_tf'])} | "
                     f"{fmt(lab_ref['nll'])} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/lab")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--budgets", type=float, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--keep-fracs", type=float, nargs="+", default=[0.5],
                    help="sampled rows: keep_top as a share of the stored entries (0: sampling only)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/targets_<preset>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.perf_counter()
    bench = Bench(args.root, args.preset, args.seeds)
    top_k = bench.cfg.top_k
    rows: list[dict[str, Any]] = []
    # (a) raw top-K, and the compact codec at the same K (measures the codec's bytes on these targets)
    fit_pts = []
    for B in args.budgets:
        K = raw_k(B)
        rows.append(bench.row(f"raw-B{B:g}-K{K}", "raw top-K", B, top_k=K, codec="raw"))
        r = bench.row(f"compact-K{K}", "compact top-K (same K as raw)", B, top_k=K, codec="compact")
        rows.append(r)
        fit_pts.append((K, r["target"]["bytes_per_token"]))
    a, b = fit_bytes(*zip(*fit_pts))
    bench.log(f"[fit] compact bytes per token ≈ {a:.2f} + {b:.3f} K")
    # (b) compact top-K at equal bytes; (c) sampled at equal bytes
    for B in args.budgets:
        Kc = k_for_budget(B, a, b)
        rows.append(bench.row(f"compact-B{B:g}-K{Kc}", "compact top-K", B, top_k=Kc, codec="compact"))
        for frac in args.keep_fracs:
            keep, S = sample_split(Kc, frac, top_k)
            name = f"sampled-B{B:g}-h{frac:g}"
            probe_dir = bench.targets(f"{name}-S{S}", top_k=top_k, codec="compact", samples=S, keep_top=keep)
            probe = bench.target_metrics(probe_dir)
            S2 = more_draws(S, keep, Kc, probe["entries_per_token"]) if probe["bytes_per_token"] < 0.95 * B else S
            kind = f"sampled (keep_top={frac:g}·slots)"
            rows.append(bench.row(f"{name}-S{S2}", kind, B, top_k=top_k, codec="compact", samples=S2,
                                  keep_top=keep))
            rows[-1]["probe"] = {"samples": S, "keep_top": keep, "bytes_per_token": probe["bytes_per_token"],
                                 "entries_per_token": probe["entries_per_token"]}
    # the lab's own posterior-KD row for reference (raw K = top_k, same recipe, from report.json)
    ref = None
    stu = bench.report.get("students", {}).get("summary", {}).get("posterior-kd")
    if stu:
        from bayeskd.lab.run import POSTERIOR_DIR

        d = bench.run / POSTERIOR_DIR
        t = bench.target_metrics(d)
        ref = {"k": top_k, "bytes_per_token": t["bytes_per_token"], "kl": t["kl"], "kl_tf": stu["kl_tf"],
               "nll": stu["nll"]}
    table = markdown(rows, ref)
    print(table)
    wall = time.perf_counter() - t_start
    out = Path(args.out) if args.out else RESULTS / f"targets_{args.preset}.json"
    result = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.python_version()}",
              "command": "benchmarks/bench_targets.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "preset": args.preset, "seeds": args.seeds, "compact_fit": {"a": a, "b": b},
              "combination": {k: v for k, v in bench.combo.items() if k != "theta"}, "rows": rows,
              "lab_posterior_kd": ref, "wall_seconds": round(wall, 1)}
    write_json(out, result)
    out.with_suffix(".md").write_text(f"# Targets at equal bytes per token ({args.preset}, {args.seeds} seeds)\n\n"
                                      + table + f"\nwall time {wall:.0f} s\n")
    print(f"wrote {out} and {out.with_suffix('.md')} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
