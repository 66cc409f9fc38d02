"""What the kernel benchmarks share: timing on CUDA and CPU, peak CUDA memory, Liger-Kernel's losses when installed,
and the printed table. A leaf module: `bench_kernels.py` and `bench_cut.py` both import it (and not each other's
helpers), so the benchmarks import no circle."""
from __future__ import annotations

import statistics
import time

import torch


def liger_losses():
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except Exception:  # noqa: BLE001 - any import problem means "not installed" for this report
        return None
    return {"liger_kl": LigerKLDIVLoss(reduction="sum"), "liger_jsd": LigerJSD(beta=0.5)}


def time_cuda(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))


def time_cpu(fn, reps: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_cuda(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fmt(x):
    return f"{x:.2f}" if isinstance(x, float) else str(x if x is not None else "-")


def print_table(rows, cols):
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{fmt(r.get(c)):>14}" for c in cols))
