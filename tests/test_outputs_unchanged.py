"""Every job's outputs are what they were when the checksum table was written: bit for bit on a platform the table
knows, within a tolerance everywhere.

The table (`tests/golden_outputs.json`) holds the outputs of every job: prior model and top-K shards, posterior
shards in every mode (calibrated and proxy-only included), the weights of distill runs in every mode (sparse
targets, SFT, white-box, online posterior, Proxy-KD), a GAD run, a proxy alignment, the evaluate reports and the
numbers of a micro lab run. Two views of each:

- `platforms`: sha256 of each file, per numeric platform (CPU model, torch's CPU kernels, torch version). The
  low bits of a matmul or a softmax depend on the CPU's vector kernels (AVX2 and AVX-512 give different bits),
  so checksums hold on the platform that wrote them only; there they must match exactly.
- `fingerprints`: a few float64 statistics of each output (per weight tensor its mean and RMS; per shard the mean
  tail mass, entropy and top-1 log-probability of its rows, read through the shard reader; the reports' numbers),
  compared on any platform with a tolerance well above the spread between CPU kernels (measured by running the
  table under ATEN_CPU_CAPABILITY=default, avx2 and avx512) and far below what a change of the math moves.

A change that alters any number fails here. One that does so on purpose rewrites the table with

    BAYESKD_WRITE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_outputs_unchanged.py

and says why in its commit. `BAYESKD_WRITE_GOLDEN=platform` adds this platform's checksums only, after the
fingerprints have matched. Everything runs on one intra-op thread (the sums inside a matmul depend on the thread
count) from fixed seeds.
"""
import hashlib
import json
import os
import platform
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


def platform_key() -> str:
    """What decides the low bits of CPU arithmetic: the CPU, the vector kernels torch picks for it, torch itself."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def _fingerprints(root: Path) -> dict[str, float]:
    """Statistics of every output under `root` that move with its numbers, not with their low bits: per weight
    tensor its mean and RMS; per shard directory (read through ShardReader, so the compact codec's bit-packing
    does not matter) the mean tail, entropy of the listed entries and top-1 log-probability of its rows."""
    from safetensors.torch import load_file

    from bayeskd.core.sparse import ShardReader

    out: dict[str, float] = {}
    manifests = sorted(root.rglob("manifest.json"))
    shard_dirs = {m.parent for m in manifests}
    for d in shard_dirs:
        tails, ents, top1 = [], [], []
        for dist, _ in ShardReader(d):
            lp = dist.logprobs.double()
            tails.append(dist.tail.double())
            ents.append(-(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1))
            top1.append(lp.max(-1).values)
        key = str(d.relative_to(root))
        for name, rows in (("tail", tails), ("entropy", ents), ("top1", top1)):
            out[f"{key}:{name}"] = float(torch.cat(rows).mean())
    for p in sorted(root.rglob("*.safetensors")):
        if p.parent in shard_dirs:
            continue
        for name, t in sorted(load_file(str(p)).items()):
            if "score_head" in str(p) and name.endswith("bias"):
                continue  # the Bradley-Terry loss is blind to the discriminator's bias: its gradient is float noise,
                #           which Adam turns into a +-lr step of either sign
            t = t.double()
            key = f"{p.relative_to(root)}:{name}"
            out[f"{key}:mean"], out[f"{key}:rms"] = float(t.mean()), float(t.pow(2).mean().sqrt())
    return out


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


def _run_everything(d: Path, tok_dir: str) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, float]]]:
    """(checksums, fingerprints) of every job's outputs, by job."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    data = d / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(24, seed=0)))
    held = d / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in _records(6, seed=1)))
    proxy = save_tiny_llama(d / "proxy", tok, seed=1, layers=2)
    student = save_tiny_llama(d / "student", tok, seed=0)
    sums: dict[str, dict[str, str]] = {}
    prints: dict[str, dict[str, float]] = {}

    def record(job: str, root: Path) -> None:
        sums[job], prints[job] = _safetensors_sums(root), _fingerprints(root)

    def record_report(job: str, report: dict) -> None:
        numbers = _numbers(report)
        sums[job] = {"report": hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()}
        prints[job] = numbers

    _invoke(["estimate-prior", "--data", data, "--tokenizer", tok_dir, "--order", "3", "--top-k", "8",
             "--write-topk", "--out", d / "prior"])
    record("estimate-prior", d / "prior")
    post = ["estimate-posterior", "--data", data, "--prior", d / "prior", "--proxy", proxy, "--top-k", "8",
            "--batch-size", "4", "--shard-records", "10"]
    # (calibration became the default: the fixed log-linear product needs --no-calibrate now)
    variants = {"log_linear": ["--no-calibrate", "--evidence", "1"], "dirichlet": ["--mode", "dirichlet", "--c", "2"],
                "mixture": ["--mode", "mixture", "--w", "0.3"], "calibrated": ["--calibrate"]}
    for name, extra in variants.items():
        _invoke(post + extra + ["--out", d / f"post_{name}"])
        record(f"estimate-posterior {name}", d / f"post_{name}")
    _invoke(["estimate-posterior", "--data", data, "--prior", "none", "--proxy", proxy, "--top-k", "8",
             "--out", d / "post_proxy_only"])
    record("estimate-posterior proxy-only", d / "post_proxy_only")

    train = ["distill", "--data", data, "--student", student, "--max-steps", "3", "--learning-rate", "5e-3",
             "--per-device-train-batch-size", "4", "--seed", "3"]
    runs = {"posterior": ["--targets", d / "post_log_linear"], "sft": [], "white-box": ["--teacher", proxy],
            "online": ["--targets", d / "prior" / "topk", "--proxy", proxy, "--posterior-mode", "mixture",
                       "--posterior-w", "0.3"],
            "proxy-kd": ["--targets", d / "post_proxy_only", "--method", "proxy-kd"],
            "reverse-kl": ["--targets", d / "post_mixture", "--divergence", "reverse_kl", "--max-length", "20"]}
    for name, extra in runs.items():
        _invoke(train + extra + ["--out", d / f"distill_{name}"])
        record(f"distill {name}", d / f"distill_{name}")

    _invoke(["gad", "--data", data, "--student", student, "--warmup-steps", "1", "--steps", "2",
             "--group-size", "2", "--batch-prompts", "2", "--max-new-tokens", "8", "--lr", "1e-3",
             "--d-lr", "1e-3", "--seed", "5", "--out", d / "gad"])
    record("gad", d / "gad")
    _invoke(["align-proxy", "--data", data, "--proxy", proxy, "--rounds", "1", "--max-new-tokens", "8",
             "--holdout-records", "0", "--batch-size", "8", "--learning-rate", "1e-4", "--diagnostic-records", "8", "--out", d / "aligned"])
    record("align-proxy", d / "aligned" / "final")

    _invoke(["evaluate", "--teacher", proxy, "--data", data, "--targets", f"posterior={d / 'post_log_linear'}",
             "--targets", f"prior={d / 'prior' / 'topk'}", "--max-records", "12", "--out", d / "eval.json"])
    _invoke(["evaluate", "--teacher", proxy, "--data", held, "--student", f"posterior={d / 'distill_posterior'}",
             "--student", f"sft={d / 'distill_sft'}", "--out", d / "eval_students.json"])
    for name in ("eval.json", "eval_students.json"):
        record_report(f"evaluate {name}", json.loads((d / name).read_text()))
    _invoke(["lab", "run", "--preset", "micro", "--root", d / "lab", "--quiet"])
    record_report("lab run micro", json.loads((d / "lab" / "micro" / "run" / "report.json").read_text()))
    return sums, prints


# Fingerprints agree within this on any platform. The spread between CPU kernels (default / AVX2 / AVX-512 on one
# Xeon) was at most 6.7e-5 relative (a lab report's gap-closed ratio) and 1.2e-8 absolute (a weight tensor's mean
# near 0); a change of the math (a loss term, a weight, a step) moves them by far more.
RTOL, ATOL = 1e-3, 1e-6


def _fingerprint_changes(now: dict[str, dict[str, float]], golden: dict[str, dict[str, float]]) -> dict[str, list]:
    changes: dict[str, list] = {}
    for job in golden.keys() | now.keys():
        g, n = golden.get(job, {}), now.get(job, {})
        bad = [f"{k}: {g.get(k)} -> {n.get(k)}" for k in sorted(g.keys() | n.keys())
               if k not in g or k not in n or abs(n[k] - g[k]) > ATOL + RTOL * abs(g[k])]
        if bad:
            changes[job] = bad[:5] + ([f"... {len(bad) - 5} more"] if len(bad) > 5 else [])
    return changes


def test_outputs_match_the_checksum_table(tmp_path, tiny_tokenizer_dir, one_thread):
    sums, prints = _run_everything(tmp_path, tiny_tokenizer_dir)
    here = platform_key()
    table = json.loads(GOLDEN.read_text())
    write = os.environ.get("BAYESKD_WRITE_GOLDEN")
    if write and write != "platform":
        GOLDEN.write_text(json.dumps({"fingerprints": prints, "platforms": {here: sums}}, indent=1, sort_keys=True)
                          + "\n")
        pytest.skip(f"wrote {GOLDEN} (every other platform's checksums dropped)")
    changes = _fingerprint_changes(prints, table["fingerprints"])
    assert not changes, f"outputs that differ from the table beyond float noise (job: values): {changes}"
    if write == "platform":
        table["platforms"][here] = sums
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"added the checksums of {here!r} to {GOLDEN}")
    golden = table["platforms"].get(here)
    if golden is None:
        print(f"no checksums for platform {here!r} (known: {sorted(table['platforms'])}): compared within "
              f"rtol {RTOL} only; BAYESKD_WRITE_GOLDEN=platform adds them")
        return
    changed = {job: [f for f in golden[job] if sums[job].get(f) != golden[job][f]] for job in golden}
    changed = {job: files for job, files in changed.items() if files or sums[job].keys() != golden[job].keys()}
    assert not changed, f"outputs that differ bit for bit from this platform's checksums (job: files): {changed}"
