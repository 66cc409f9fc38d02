"""The lab benchmark: every estimator and every distillation method scored against the lab teacher's truth.

    python benchmarks/bench_lab.py --preset tiny --seeds 3      # CPU, tens of minutes
    python benchmarks/bench_lab.py --preset small --seeds 3     # the benchmark preset (a GPU, or hours of CPU)
    # the on-policy study (bayeskd.lab.onpolicy) with TRL's peers, into lab_<preset>_onpolicy.*
    python benchmarks/bench_lab.py --preset tiny --seeds 3 --tag onpolicy --methods sft,trl-sft,trl-sft-text,\
        offpolicy-more,offpolicy-whitebox,onpolicy-posterior,onpolicy-k20,onpolicy-k0,onpolicy-whitebox,trl-gkd-fkl,\
        trl-gkd,trl-gkd-rkl
    # the same on tiny-sharp at tiny's recipe (no grid), without learning curves or teacher B
    python benchmarks/bench_lab.py --preset tiny-sharp --seeds 3 --tag onpolicy --set ce_weight=0 \
        --set whitebox_top_k=0 --set 'curve_epochs=[]' --set cross_tokenizer=false --methods ...

Runs `bayeskd.lab.run.run_lab` (the same job as `bayeskd lab run`), then writes into benchmarks/results/:
lab_<preset>.json (the report), lab_<preset>.md (its tables) and lab_<preset>.png (KL against corpus size, KL
against K, student KL(teacher‖student) per method with the spread over seeds).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import RESULTS, add_set_option, lab_settings, write_lab_results

from bayeskd.lab.build import PRESETS
from bayeskd.lab.run import run_lab


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["students"].get("gad_d_acc") or {}
    evidence = (report["estimation"].get("evidence") or {}).get("rows")
    learning = report["students"].get("curves")
    panels = 3 + bool(curves) + bool(evidence) + bool(learning)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    curve = report["corpus_curve"][1:]
    ax = axes[0]
    for key, style in (("prior", "o-"), ("posterior", "s-"), ("proxy", "--")):
        ax.plot([r["tokens"] for r in curve], [r[key] for r in curve], style, label=key)
    ax.set_xscale("log")
    ax.set_xlabel("teacher response tokens counted by the prior")
    ax.set_ylabel("KL(teacher ‖ estimate), nats/token")
    ax.set_title("held-out teacher text vs corpus size")
    ax.legend()
    ax = axes[1]
    kc = report["estimation"]["k_curve"]
    for key, style in (("prior", "o-"), ("proxy", "^-"), ("posterior", "s-")):
        ax.plot([r["k"] for r in kc], [r[key] for r in kc], style, label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (entries kept per position)")
    ax.set_title("training positions vs K")
    ax.legend()
    ax = axes[2]
    s = report["students"]["summary"]
    names = list(s)
    ax.bar(range(len(names)), [s[n]["kl_tf"]["mean"] for n in names], yerr=[s[n]["kl_tf"]["std"] for n in names],
           capsize=4, color="tab:blue", alpha=0.8, label="teacher-forced")
    if all("kl_own" in s[n] for n in names):
        ax.plot(range(len(names)), [s[n]["kl_own"]["mean"] for n in names], "kD", label="on own samples")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("KL(teacher ‖ student), nats/token")
    ax.set_title("students (held-out)")
    ax.legend()
    if curves:
        ax = axes[3]
        for seed, hist in curves.items():
            ax.plot(range(1, len(hist) + 1), [h["d_acc"] for h in hist], ".-", label=f"seed {seed}")
        warm = sum(1 for h in next(iter(curves.values())) if h["stage"] == "warmup")
        if warm:
            ax.axvline(warm + 0.5, color="gray", ls=":", label="warm-up | GAD")
        ax.set_xlabel("GAD step (warm-up: discriminator only)")
        ax.set_ylabel("D accuracy (teacher scored higher)")
        ax.set_ylim(0, 1.05)
        ax.set_title("GAD discriminator accuracy")
        ax.legend(fontsize=8)
    if evidence:
        ax = axes[-1]
        ks = [r["k"] for r in evidence]
        for key, style, label in (("text_only", "--", "text only (calibrated posterior)"),
                                  ("condition", "s-", "conditioned on the revealed top-k"),
                                  ("evidence_only", "o-", "top-k + uniform tail (TRL, DistillKit)")):
            ax.plot(ks, [r[key] for r in evidence], style, label=label)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (log-probabilities the teacher reveals per token)")
        ax.set_ylabel("KL(teacher ‖ estimate), nats/token")
        ax.set_title("training positions vs revealed k")
        ax.legend(fontsize=8)
    if learning:  # kl_tf (solid) and kl_own (dashed) against trained tokens, per method
        ax = axes[3 + bool(curves)]
        for i, m in enumerate(dict.fromkeys(r["method"] for r in learning["summary"])):
            rows = [r for r in learning["summary"] if r["method"] == m]
            ax.plot([r["tokens"] for r in rows], [r["kl_tf"]["mean"] for r in rows], "o-", color=f"C{i}", label=m)
            if "kl_own" in rows[0]:
                ax.plot([r["tokens"] for r in rows], [r["kl_own"]["mean"] for r in rows], "--", color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xlabel("trained tokens")
        ax.set_ylabel("KL(teacher ‖ student) (dashed: on own samples)")
        ax.set_title("learning curves (test prompts)")
        ax.legend(fontsize=8)
    fig.suptitle(f"bayeskd lab, preset {report['preset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--root", default="runs/lab")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma-separated (default: all)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--tag", default=None, help="results as lab_<preset>_<tag>.* (a study of some methods)")
    add_set_option(ap)
    args = ap.parse_args()
    settings = lab_settings(ap, args.set)
    report = run_lab(args.root, args.preset, seeds=args.seeds, force=args.force,
                     methods=args.methods.split(",") if args.methods else None, progress=False, **settings)
    write_lab_results(report, RESULTS / f"lab_{args.preset}{'_' + args.tag if args.tag else ''}", plot)
    if not args.tag:
        shutil.copy(Path(report["lab"]) / "lab.json", RESULTS / f"lab_{args.preset}_manifest.json")


if __name__ == "__main__":
    main()
