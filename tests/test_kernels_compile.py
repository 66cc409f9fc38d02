"""The Triton kernels compile for a real GPU (sm_90) at the launchers' tiles without register spills.

The interpreter runs the kernels' Python; it cannot say whether they compile for a GPU. Triton compiles ahead of
time on any machine (its wheel carries ptxas and cuobjdump), so benchmarks/compile_check.py does that here, in a
subprocess without TRITON_INTERPRET (other test modules set it in this process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh compile, not a cached cubin
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cases = json.loads(out.read_text())["cases"]
    kernels = {(c["kernel"], c["dtype"]) for c in cases}
    assert kernels == {(k, d) for k in ("lse_kernel", "dense_bwd_kernel", "gather_kernel", "sparse_bwd_kernel",
                                        "sparse_kd_kernel") for d in ("bf16", "fp16", "fp32")}
    assert all(c["ok"] and c["stack_bytes"] == 0 and 0 < c["registers"] <= 255 for c in cases)
    for c in cases:  # the half-precision tiles run on tensor cores with pipelined loads
        if c["kernel"] in ("lse_kernel", "dense_bwd_kernel") and c["dtype"] != "fp32" and c["aligned"]:
            assert c["wgmma"] > 0 and c["cp_async"] > 0, c
