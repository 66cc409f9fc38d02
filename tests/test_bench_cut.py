"""The GPU session's scripts (benchmarks/gpu_session.sh) still run, as scripts in a subprocess (never imported):
bench_cut.py's CPU smoke (Triton interpreter), where the cut loss and gradients equal logits + the fused kernel and
the JSON says so without reporting timings, and gpu_check.py's CPU smoke, where every kernel case passes against
the library's float64 reference. The kernels themselves are tested in test_kernels.py and test_cut_kernel.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # the scripts set it themselves for --device cpu
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_bench_cut_cpu_smoke_matches_logits_plus_fused_kernel(tmp_path):
    out = tmp_path / "x.json"
    proc = _script("bench_cut.py", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["passed"] is True
    assert "meaningless" in result["note"]
    (case,) = result["cases"]
    assert case["smoke"] is True and (case["N"], case["H"], case["V"], case["K"]) == (64, 32, 257, 16)
    check = case["check"]
    assert check["passed"] is True and check["tol"] == 1e-4
    for key in ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err", "ce_step_loss_rel_err",
                "ce_step_grad_hidden_rel_err", "ce_step_grad_weight_rel_err"):
        assert 0 <= check[key] <= 1e-4, (key, check[key])
    assert "cut_ms" not in case  # no timings reported as results in the smoke


def test_gpu_check_cpu_smoke_passes():
    proc = _script("gpu_check.py", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    cases = [ln for ln in lines if ln.startswith(("PASS", "FAIL"))]
    assert len(cases) >= 15 and all(ln.startswith("PASS") for ln in cases), "\n".join(cases)
    assert any("cut N=" in ln for ln in cases) and any("fused_linear N=" in ln for ln in cases)
    assert lines[-1] == "ALL PASS"
