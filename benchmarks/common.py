"""What the benchmarks share: where results go and how they are written (JSON, plots, the command line), the lab
benchmarks' `--set SETTING=JSON` option, timing on CUDA and CPU, peak CUDA memory, Liger-Kernel's losses when
installed, and the printed table.

Every benchmark is a leaf script: it imports this module and the library's public names, never another benchmark
(run them as scripts, `python benchmarks/<name>.py`: the script's folder is then first on sys.path). torch and
matplotlib are imported where used, so that a benchmark that needs neither does not pay for them.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"  # summaries and plots, kept in git


# ------------------------------------------------------------------------------------------------ results

def write_lab_results(report: dict, stem: Path, plot) -> None:
    """A lab report (`bayeskd.lab.run.run_lab`) with the machine, as stem.json, its tables as stem.md and
    `plot(report, path)` as stem.png."""
    import platform

    from bayeskd.lab.run import format_report

    report["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "cpu_count": os.cpu_count()}
    write_json(stem.with_suffix(".json"), report)
    stem.with_suffix(".md").write_text(format_report(report))
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png")


def add_set_option(ap) -> None:
    """The lab benchmarks' `--set SETTING=JSON` (repeatable) on the argparse parser `ap`: read by `lab_settings`."""
    ap.add_argument("--set", action="append", default=[], metavar="SETTING=JSON",
                    help="a lab run setting (a LabRunConfig field, `bayeskd lab run --help`), its value in JSON, "
                         "e.g. ce_weight=0 or 'curve_epochs=[]' (repeatable)")


def lab_settings(ap, items: list[str]) -> dict[str, Any]:
    """The `--set` items as {setting: value} for `run_lab`; a malformed one stops with the parser's error."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: want SETTING=JSON")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError as e:
            ap.error(f"--set {item!r}: the value is not JSON ({e})")
    return settings


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write `obj` as JSON (numbers numpy or torch may hand over written as floats), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, default=float) + "\n")
    return path


def command() -> str:
    """The command line that ran this benchmark (the interpreter's name, the script and its arguments)."""
    return " ".join([os.path.basename(sys.executable)] + sys.argv)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ timing

def liger_losses():
    """Liger-Kernel's KL and JSD losses (sum reduction), or None when it is not installed."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except Exception:  # noqa: BLE001 - any import problem means "not installed" for this report
        return None
    return {"liger_kl": LigerKLDIVLoss(reduction="sum"), "liger_jsd": LigerJSD(beta=0.5)}


def time_cuda(fn) -> float:
    """Median milliseconds of `fn` on CUDA (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))


def time_cpu(fn, reps: int = 3) -> float:
    """Median milliseconds of `reps` calls of `fn` after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_cuda(fn) -> float:
    """Peak CUDA memory (MiB) allocated during one call of `fn`, over what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------------------ tables

def fmt(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x if x is not None else "-")


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{fmt(r.get(c)):>14}" for c in cols))
