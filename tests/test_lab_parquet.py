"""The lab run with `records_format` "parquet": the training records converted once after sampling, every stage
reading the Parquet copy, and the same numbers as the JSONL run (the conversion is lossless)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

METHODS = "sft,posterior-kd"


def _run(root, *extra):
    """One `bayeskd lab run` in its own process: two lab runs in one process do not give the same bits (the
    aligned proxy's SFT weights differ in the last bits in the second), and this test compares bits."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "bayeskd.cli", "lab", "run", "--preset", "micro", "--root", str(root),
                          "--methods", METHODS, "--no-cross-tokenizer", "--quiet", *extra], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((root / "micro" / "run" / "report.json").read_text())


def _numbers(report):
    """What the run estimated and trained, without its timings (students' seconds per token are wall time)."""
    students = {m: {k: v for k, v in s.items() if k.startswith(("kl", "nll", "top1", "ce"))}
                for m, s in report["students"]["summary"].items()}
    return {"estimation": report["estimation"], "corpus_curve": report["corpus_curve"], "bayes": report["bayes"],
            "calibration": report["calibration"], "data": report["data"], "students": students}


@pytest.mark.e2e  # three micro lab runs, each in its own process (~40 s each on one thread)
def test_parquet_records_give_the_jsonl_run_numbers(tmp_path):
    a, b = tmp_path / "jsonl", tmp_path / "parquet"
    jsonl = _run(a)
    # the same lab models (no second build), a fresh run directory
    shutil.copytree(a / "micro", b / "micro", ignore=lambda d, names: [n for n in names if n.startswith("run")])
    parquet = _run(b, "--records-format", "parquet")
    run = b / "micro" / "run"
    assert (run / "teacher_train.parquet").exists() and (run / "teacher_train.jsonl").exists()  # the JSONL kept
    assert not (a / "micro" / "run" / "teacher_train.parquet").exists()
    assert "convert the training records to Parquet" in parquet["timings"]
    assert parquet["config"]["records_format"] == "parquet" and jsonl["config"]["records_format"] == "jsonl"
    assert json.loads((run / "train.json").read_text())["records_format"] == "parquet"
    # the stages read the Parquet copy (their summaries name their data)
    for summary in ("prior/summary.json", "posterior_calibrated/summary.json", "students/posterior-kd-s0/summary.json"):
        assert json.loads((run / summary).read_text())["data"].endswith("teacher_train.parquet"), summary
    assert set(jsonl["students"]["summary"]) >= set(METHODS.split(","))
    assert _numbers(parquet) == _numbers(jsonl)
    # a rerun resumes: the Parquet copy reused, the same numbers
    again = _run(b, "--records-format", "parquet")
    assert "convert the training records to Parquet" not in again["timings"]
    assert _numbers(again) == _numbers(parquet)
