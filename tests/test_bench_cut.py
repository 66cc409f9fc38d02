"""benchmarks/bench_cut.py's CPU smoke (Triton interpreter): the cut loss and gradients equal logits + the fused
kernel, and the JSON says so (what CI runs of that benchmark)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_cut", ROOT / "benchmarks" / "bench_cut.py")
bc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bc)

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def test_cpu_smoke_matches_logits_plus_fused_kernel(tmp_path):
    out = tmp_path / "x.json"
    assert bc.main(["--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["passed"] is True
    assert "meaningless" in result["note"]
    (case,) = result["cases"]
    assert case["smoke"] is True and (case["N"], case["H"], case["V"], case["K"]) == bc.SMOKE_SIZES[0]
    check = case["check"]
    assert check["passed"] is True and check["tol"] == 1e-4
    for key in ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err"):
        assert 0 <= check[key] <= 1e-4, (key, check[key])
    assert "cut_ms" not in case  # no timings reported as results in the smoke
