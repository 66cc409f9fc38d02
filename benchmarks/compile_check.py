"""Compile the Triton kernels for a GPU without one: register use and spills at the launchers' tiles.

Triton compiles ahead of time for a target (here sm_90, an H100/H200) on any machine: Python -> TTIR -> TTGIR ->
LLVM IR -> PTX -> cubin, with the ptxas and cuobjdump its wheel carries. That catches what the interpreter cannot
(code that does not compile for a real GPU) and shows whether a tile configuration spills registers to local
memory, which would make it slow. It measures no speed. For each kernel of bayeskd/kernels/cut_sparse_kd.py (and the
fused kernel of bayeskd/kernels/sparse_kd.py in four flag sets), each input dtype and the tiles the launchers pick (`pick_blocks`, `row_blocks`), prints registers per thread and the stack
(spill) bytes, shared memory, tensor-core dots and pipelined loads, writes JSON, and exits 1 if a kernel fails to
compile, spills or needs more shared memory than an sm_90 block has. Pointers, the hidden size and the
row strides are taken as multiples of 16, as the JIT specialises them for real models.

    python benchmarks/compile_check.py [--arch 90] [--out benchmarks/results/compile_sm90.json]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import bayeskd.kernels.cut_sparse_kd as cut  # noqa: E402
import bayeskd.kernels.sparse_kd as fused  # noqa: E402
from common import RESULTS, command, write_json  # noqa: E402

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
INT_PTRS = {"idx_ptr": "*i32", "bad_ptr": "*i32", "i0_ptr": "*i32", "iq_ptr": "*i32", "y_ptr": "*i32",
            "mask_ptr": "*i8"}
# the input dtype: the hidden states, the lm_head and its bias (cut); the logits and their gradient (fused)
INPUT_PTRS = ("h_ptr", "w_ptr", "b_ptr", "z_ptr", "g_ptr")
FLOAT_SCALARS = ("inv_t", "a", "b", "evidence", "beta")
# The JIT specialises pointers and integers that are multiples of 16 (tt.divisibility), which enables vectorised,
# pipelined (cp.async) loads; real hidden sizes and row strides are, so the check compiles with those hints
ALIGNED_INTS = ("H", "stride_h", "stride_w", "z_stride", "g_stride")
SHARED_LIMIT = 227 * 1024  # shared memory per block on sm_90


def signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in INPUT_PTRS else INT_PTRS.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack bytes (spills) of a cubin, from the cuobjdump Triton ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))}


def cases():
    """(kernel, dtype, constexprs, num_warps, aligned): every flag set the launchers use, at the launchers' tiles;
    the matmul kernels also unaligned (a hidden size that is not a multiple of 16), with the tiles picked for it."""
    for dtype, name in DTYPES.items():
        dot32 = dtype == torch.float32
        for aligned in (True, False):
            tiles = dict(cut.pick_blocks(dtype, aligned))
            warps = tiles.pop("num_warps")
            for two in (False, True):  # TWO: a CE at temperature 1 beside a KD at T != 1 (its own tiles)
                lse_tiles = dict(cut.pick_blocks(dtype, aligned, two=two))
                lse_warps = lse_tiles.pop("num_warps")
                yield (cut.lse_kernel, name, dict(HAS_BIAS=True, DOT_FP32=dot32, CHECK=True, TWO=two, **lse_tiles),
                       lse_warps, aligned)
            yield (cut.dense_bwd_kernel, name, dict(HAS_BIAS=True, DO_H=True, DO_W=True, DO_B=True, TWO=True,
                                                     DOT_FP32=dot32, **tiles), warps, aligned)
            yield (cut.dense_bwd_kernel, name, dict(HAS_BIAS=False, DO_H=True, DO_W=False, DO_B=False, TWO=False,
                                                     DOT_FP32=dot32, **tiles), warps, aligned)
        for j in (2, 33, 129):  # |U| (+ the CE column) for K = 1, 16, 64 with a sparse proxy
            for aligned in (True, False):
                rb = dict(cut.row_blocks(j, aligned))
                rwarps = rb.pop("num_warps")
                yield cut.gather_kernel, name, dict(HAS_BIAS=True, **rb), rwarps, aligned
                yield cut.sparse_bwd_kernel, name, dict(DO_B=True, DO_H=True, DO_W=True, **rb), rwarps, aligned
    # the fused sparse-KD kernel (logits in), at its launcher's blocks for a large and a small vocabulary
    mode, div = fused.MODE_CODES, fused.DIVERGENCE_CODES
    base = dict(MODE=mode["log_linear"], ONLINE=False, DIV=div["forward_kl"], BUCKET=True,
                HAS_Y=False, HAS_MASK=False, TEMPERED=False, COMPUTE_GRAD=True, CHECK=True, K0P=64, KQP=64)
    variants = [("bf16", 16384, 16, {}), ("bf16", 4096, 8, dict(ONLINE=True, DIV=div["jsd"],
                                                                   TEMPERED=True, HAS_Y=True, HAS_MASK=True)),
                ("fp16", 4096, 8, dict(MODE=mode["mixture"], DIV=div["tvd"], BUCKET=False)),
                ("fp32", 16384, 16, dict(DIV=div["reverse_kl"], K0P=16, KQP=16))]
    for name, block_v, warps, extra in variants:
        yield fused.sparse_kd_kernel, name, dict(base, BLOCK_V=block_v, **extra), warps, True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (90: H100/H200)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/compile_sm<arch>.json)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    rows, failed = [], 0
    for fn, dtype, constexprs, warps, aligned in cases():
        row = {"kernel": fn.__name__, "dtype": dtype, "num_warps": warps, "aligned": aligned,
               "config": {k: v for k, v in constexprs.items()
                          if k.startswith(("BLOCK", "JP", "DO_", "HAS_", "MODE", "DIV", "ONLINE", "BUCKET", "TWO"))}}
        t = time.perf_counter()
        try:
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                     if aligned and (a.endswith("_ptr") or a in ALIGNED_INTS)}
            src = ASTSource(fn=fn, signature=signature(fn, dtype, constexprs), constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=target, options={"num_warps": warps})
            row.update(resources(compiled.asm["cubin"]))
            ptx = compiled.asm["ptx"]
            # tensor-core dots (Hopper wgmma) and pipelined loads (cp.async) are what make the tiles fast
            row.update(shared_bytes=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                       cp_async=ptx.count("cp.async"))
            row["ok"] = row["stack_bytes"] == 0 and row["shared_bytes"] <= SHARED_LIMIT
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        row["compile_s"] = round(time.perf_counter() - t, 2)
        failed += not row["ok"]
        rows.append(row)
        cfg = " ".join(f"{k}={v}" for k, v in row["config"].items())
        print(f"{row['kernel']:<20} {dtype:<5} {'aligned' if aligned else 'unaligned':<9} warps={warps:<2} {cfg:<70} "
              + (f"regs={row['registers']:<3} stack={row['stack_bytes']:<5} smem={row['shared_bytes']:<6} "
                 f"wgmma={row['wgmma']:<3} cp.async={row['cp_async']}" if "shared_bytes" in row
                 else row.get("error", "")) + ("" if row["ok"] else "  FAIL"), flush=True)
    out = write_json(Path(args.out) if args.out else RESULTS / f"compile_sm{args.arch}.json",
                     {"target": f"cuda sm_{args.arch}", "triton": triton.__version__, "cases": rows,
                      "command": command()})
    print(f"{'ALL COMPILED, NO SPILLS' if not failed else f'{failed} FAILED'}; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
