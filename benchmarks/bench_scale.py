"""The lab at scale: >= 1M teacher response tokens, the corpus curve to all of them with what estimation costs.

    python benchmarks/bench_scale.py --preset tiny-1m          # CPU: hours (2 cores: about 2 h)
    python benchmarks/bench_scale.py --preset tiny-sharp-1m    # the sharp teacher, its own aligned proxy
    # every sample with its top-20, read as Parquet: other samples than the preset's (another --root, or --force)
    python benchmarks/bench_scale.py --preset tiny-sharp-1m --set records_format='"parquet"' --set evidence_prompts=null \
        --name lab_tiny-sharp-1m-top20

Runs `bayeskd.lab.run.run_lab` on a scale preset (`SCALE_PRESETS`: the same job as `bayeskd lab run --preset
tiny-1m`; it reuses the tiny / tiny-sharp lab under --root, building it if missing, and runs in
ROOT/<lab>/run-<preset>/), then writes into benchmarks/results/: lab_<preset>.json (the report), lab_<preset>.md
(its tables; the scale targets under "targets") and lab_<preset>.png (KL against corpus size: n-gram prior, suffix
prior, proxy, recalibrated posteriors; and estimate-prior / estimate-posterior seconds per 1k tokens and peak RSS).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS, add_set_option, lab_settings, write_lab_results

from bayeskd.lab.run import SCALE_PRESETS, run_lab


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [r for r in report["corpus_curve"][1:] if "suffix prior" in r]
    if not curve:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    for key, style in (("prior", "o-"), ("suffix prior", "^-"), ("proxy", "--"),
                       ("n-gram posterior (recalibrated)", "s-"), ("suffix posterior (recalibrated)", "D-")):
        pts = [r for r in curve if key in r]  # (a point without calibration records has no posteriors)
        if pts:
            ax.plot([r["tokens"] for r in pts], [r[key] for r in pts], style, label=key)
    ax.set_xscale("log")
    ax.set_xlabel("teacher response tokens")
    ax.set_ylabel("KL(teacher ‖ estimate), nats/token")
    ax.set_title("held-out teacher text vs corpus size")
    ax.legend(fontsize=8)
    costed = [r for r in curve if "costs" in r]
    for ax, (field, label) in zip(axes[1:], (("seconds_per_1k_tokens", "seconds per 1k tokens"),
                                             ("peak_rss_mb", "peak RSS (MiB)"))):
        for job, style in (("estimate-prior", "o-"), ("estimate-posterior", "s-")):
            ax.plot([r["tokens"] for r in costed], [r["costs"][job][field] for r in costed], style, label=job)
        ax.set_xscale("log")
        ax.set_xlabel("teacher response tokens")
        ax.set_ylabel(label)
        ax.set_title(f"estimation cost: {label}")
        ax.legend(fontsize=8)
    fig.suptitle(f"bayeskd lab at scale, preset {report['preset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-1m", choices=sorted(SCALE_PRESETS))
    ap.add_argument("--root", default="runs/lab")
    ap.add_argument("--seeds", type=int, default=None, help="students per method (default: the preset's, 2)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--name", default=None,
                    help="results file stem in benchmarks/results/ (default lab_<preset>); a run with other --set "
                         "settings than the preset's should not overwrite the preset's results")
    add_set_option(ap)
    args = ap.parse_args()
    report = run_lab(args.root, args.preset, seeds=args.seeds, force=args.force, progress=False,
                     **lab_settings(ap, args.set))
    write_lab_results(report, RESULTS / (args.name or f"lab_{args.preset}"), plot)


if __name__ == "__main__":
    main()
