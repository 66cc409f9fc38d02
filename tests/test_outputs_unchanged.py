"""Every job's outputs are bit-for-bit what they were when the checksum table was written.

The table (`tests/golden_outputs.json`) was written by the code before the stage-folders reshaping (a move
that must change no number): prior model and top-K shards, posterior shards in every mode (calibrated and
proxy-only included), the weights of distill runs in every mode (sparse targets, SFT, white-box, online
posterior, Proxy-KD), a GAD run, a proxy alignment, the evaluate reports and the numbers of a micro lab run.
A change that alters any number fails here; one that does so on purpose rewrites the table with

    BAYESKD_WRITE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_outputs_unchanged.py

and says why in its commit. Everything runs on one intra-op thread (the sums inside a matmul depend on the
thread count) from fixed seeds.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bayeskd.cli import main
from conftest import save_tiny_llama

GOLDEN = Path(__file__).with_name("golden_outputs.json")
WORDS = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object",
         "file", "path", "value", "error", "is", "raised", "if", "not", "found", "."]


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        start = int(rng.integers(0, len(WORDS)))  # partly cyclic responses: the prior has something to learn
        resp = [WORDS[(start + j) % len(WORDS)] if rng.random() < 0.7 else str(rng.choice(WORDS))
                for j in range(int(rng.integers(4, 14)))]
        recs.append({"prompt": prompt, "response": " ".join(resp)})
    return recs


def _safetensors_sums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}


def _numbers(obj, path: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON report by their key path (paths and timings left out)."""
    if isinstance(obj, dict):
        kept = {key: val for key, val in obj.items() if "second" not in key and key != "timings"}
        return {k: v for key, val in kept.items() for k, v in _numbers(val, f"{path}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _numbers(val, f"{path}/{i}").items()}
    return {path: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def _invoke(args: list[str]) -> None:
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_everything(d: Path, tok_dir: str) -> dict[str, dict[str, str]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    data = d / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(24, seed=0)))
    held = d / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in _records(6, seed=1)))
    proxy = save_tiny_llama(d / "proxy", tok, seed=1, layers=2)
    student = save_tiny_llama(d / "student", tok, seed=0)
    sums: dict[str, dict[str, str]] = {}

    _invoke(["estimate-prior", "--data", data, "--tokenizer", tok_dir, "--order", "3", "--top-k", "8",
             "--write-topk", "--out", d / "prior"])
    sums["estimate-prior"] = _safetensors_sums(d / "prior")
    post = ["estimate-posterior", "--data", data, "--prior", d / "prior", "--proxy", proxy, "--top-k", "8",
            "--batch-size", "4", "--shard-records", "10"]
    # (calibration became the default: the fixed log-linear product needs --no-calibrate now)
    variants = {"log_linear": ["--no-calibrate", "--evidence", "1"], "dirichlet": ["--mode", "dirichlet", "--c", "2"],
                "mixture": ["--mode", "mixture", "--w", "0.3"], "calibrated": ["--calibrate"]}
    for name, extra in variants.items():
        _invoke(post + extra + ["--out", d / f"post_{name}"])
        sums[f"estimate-posterior {name}"] = _safetensors_sums(d / f"post_{name}")
    _invoke(["estimate-posterior", "--data", data, "--prior", "none", "--proxy", proxy, "--top-k", "8",
             "--out", d / "post_proxy_only"])
    sums["estimate-posterior proxy-only"] = _safetensors_sums(d / "post_proxy_only")

    train = ["distill", "--data", data, "--student", student, "--max-steps", "3", "--learning-rate", "5e-3",
             "--per-device-train-batch-size", "4", "--seed", "3"]
    runs = {"posterior": ["--targets", d / "post_log_linear"], "sft": [], "white-box": ["--teacher", proxy],
            "online": ["--targets", d / "prior" / "topk", "--proxy", proxy, "--posterior-mode", "mixture",
                       "--posterior-w", "0.3"],
            "proxy-kd": ["--targets", d / "post_proxy_only", "--method", "proxy-kd"],
            "reverse-kl": ["--targets", d / "post_mixture", "--divergence", "reverse_kl", "--max-length", "20"]}
    for name, extra in runs.items():
        _invoke(train + extra + ["--out", d / f"distill_{name}"])
        sums[f"distill {name}"] = _safetensors_sums(d / f"distill_{name}")

    _invoke(["gad", "--data", data, "--student", student, "--warmup-steps", "1", "--steps", "2",
             "--group-size", "2", "--batch-prompts", "2", "--max-new-tokens", "8", "--lr", "1e-3",
             "--d-lr", "1e-3", "--seed", "5", "--out", d / "gad"])
    sums["gad"] = {k: v for k, v in _safetensors_sums(d / "gad").items()}
    _invoke(["align-proxy", "--data", data, "--proxy", proxy, "--rounds", "1", "--max-new-tokens", "8",
             "--holdout-records", "0", "--batch-size", "8", "--learning-rate", "1e-4", "--diagnostic-records", "8", "--out", d / "aligned"])
    sums["align-proxy"] = _safetensors_sums(d / "aligned" / "final")

    _invoke(["evaluate", "--teacher", proxy, "--data", data, "--targets", f"posterior={d / 'post_log_linear'}",
             "--targets", f"prior={d / 'prior' / 'topk'}", "--max-records", "12", "--out", d / "eval.json"])
    _invoke(["evaluate", "--teacher", proxy, "--data", held, "--student", f"posterior={d / 'distill_posterior'}",
             "--student", f"sft={d / 'distill_sft'}", "--out", d / "eval_students.json"])
    for name in ("eval.json", "eval_students.json"):
        report = json.loads((d / name).read_text())
        numbers = json.dumps(_numbers(report), sort_keys=True)
        sums[f"evaluate {name}"] = {"report": hashlib.sha256(numbers.encode()).hexdigest()}
    _invoke(["lab", "run", "--preset", "micro", "--root", d / "lab", "--quiet"])
    report = json.loads((d / "lab" / "micro" / "run" / "report.json").read_text())
    numbers = json.dumps(_numbers(report), sort_keys=True)
    sums["lab run micro"] = {"report": hashlib.sha256(numbers.encode()).hexdigest()}
    return sums


def test_outputs_match_the_checksum_table(tmp_path, tiny_tokenizer_dir, one_thread):
    sums = _run_everything(tmp_path, tiny_tokenizer_dir)
    if os.environ.get("BAYESKD_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(sums) == sorted(golden)
    for job in golden:
        assert sums[job].keys() == golden[job].keys(), job
        changed = [f for f in golden[job] if sums[job][f] != golden[job][f]]
        assert not changed, f"{job}: {changed} differ from the checksum table"
