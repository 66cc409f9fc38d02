#!/usr/bin/env bash
# One call on a lent GPU: what only a GPU can show for the cut-logits kernel, most valuable first, each
# step bounded so that the whole fits one 10-minute device call. Everything lands in $OUT (the device tool fetches
# it back); copy the JSON into benchmarks/results/ with the device named, and quote it in docs/results.md.
#
# At no device time, before the call (optional baselines; the machine has no registry):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# The call (tool `run`): command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 600.
#
# The machine's python3 has torch and triton but not this package's other dependencies, so the package is put on
# PYTHONPATH as it is (importing bayeskd needs only torch, numpy, safetensors and tqdm).
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"; } | tee "$OUT/device.txt"

# 1. compiled correctness of every kernel against float64 (the cut cases included), ~1-2 min
timeout 180 "$PY" benchmarks/gpu_check.py --quick > "$OUT/gpu_check.log" 2>&1
echo "gpu_check rc=$?"
# 2. the cut kernel against logits + fused kernel, Liger and CCE at the target shapes, ~5 min
timeout 330 "$PY" benchmarks/bench_cut.py --quick --budget-s 280 --out "$OUT/cut_cuda.json" > "$OUT/bench_cut.log" 2>&1
echo "bench_cut rc=$?"
tail -n 3 "$OUT/gpu_check.log"
tail -n 20 "$OUT/bench_cut.log"
