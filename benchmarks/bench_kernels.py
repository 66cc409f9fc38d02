"""Speed and memory of the fused sparse-KD loss against the dense loss a user writes today.

For every (N, V, K): forward + backward time and peak extra memory of
  sparse      bayeskd.losses.fused_posterior_kd(..., inplace=True): the Triton kernel on CUDA, the chunked
              PyTorch path on CPU (the kernel directly if the dispatcher is missing on CUDA),
  dense       the posterior materialized as [N, V] from the same sparse targets, then
              F.kl_div(F.log_softmax(logits / T), P) with autograd,
  dense_P     the same with P already built (the divergence alone),
  liger_kl / liger_jsd   Liger-Kernel's LigerKLDIVLoss / LigerJSD on the dense equivalent (CUDA, if installed),
and the memory-bandwidth floor: one read of the logits + one write of the gradient (+ the sparse targets) at
the device-to-device copy bandwidth measured here. Also the fused-linear variant (lm_head + loss) against
logits-then-loss.

    python benchmarks/bench_kernels.py --device cuda --plot
    python benchmarks/bench_kernels.py --device cpu --quick

lm_head + loss without logits (the cut-logits kernel) has its own benchmark: benchmarks/bench_cut.py.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, command, liger_losses, peak_cuda, print_table, pyplot, time_cpu, time_cuda, write_json

DEFAULT_SIZES = [(n, v, k) for n in (1024, 4096, 16384) for v in (32000, 151936) for k in (16, 64, 128)]
QUICK_SIZES = [(256, 32000, 16), (1024, 32000, 64), (1024, 151936, 128)]
CPU_MAX_BYTES = 8e9  # skip CPU cases whose dense baseline would need more than this


# ---------------------------------------------------------------------------------------------------------------
# inputs
def make_inputs(n: int, v: int, k: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Random (never zero) logits and two sparse top-K distributions (prior, proxy) as flat tensors."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)

    def sparse():
        # distinct indices per row: top-k of random scores is a cheap way to draw k distinct tokens
        idx = torch.rand(n, v, generator=g).topk(k, dim=1).indices.to(torch.int32) if n * v <= 2**27 else \
            torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]).to(torch.int32)
        tail = torch.rand(n, generator=g) * 0.5 + 0.05
        lp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, 1) + torch.log1p(-tail)[:, None]
        return idx.to(device), lp.to(device), tail.to(device)

    return logits, sparse(), sparse()


def dense_posterior(v: int, prior, proxy) -> torch.Tensor:
    """What a user writes today: scatter both sparse targets into [N, V] and combine (log-linear) densely."""
    def dense(idx, lp, tail):
        n, k = idx.shape
        d = (tail / (v - k))[:, None].expand(n, v).clone()
        d.scatter_(1, idx.long(), lp.exp())
        return d

    p = dense(*prior) * dense(*proxy)
    return p / p.sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# the paths
def sparse_path(backend_note: list):
    """A callable (logits, prior, proxy) -> per-row loss; the dispatcher of bayeskd.losses when it exists."""
    try:
        from bayeskd.losses import fused_posterior_kd
    except ImportError:
        fused_posterior_kd = None
    if fused_posterior_kd is not None:
        params = inspect.signature(fused_posterior_kd).parameters
        backend_note.append("bayeskd.losses.fused_posterior_kd")
        if "prior_idx" in params:  # flat tensors, like the kernel
            return lambda z, pr, px: fused_posterior_kd(z, *pr, *px, mode="log_linear", inplace=True)
        from bayeskd.core.sparse import SparseDist

        def call(z, pr, px):
            v = z.shape[1]
            return fused_posterior_kd(z, SparseDist(*pr, v), SparseDist(*px, v), mode="log_linear", inplace=True)
        return call
    if torch.cuda.is_available():
        from bayeskd.kernels.sparse_kd import triton_fused_posterior_kd
        backend_note.append("bayeskd.kernels.sparse_kd (dispatcher missing)")
        return lambda z, pr, px: triton_fused_posterior_kd(z, *pr, *px, mode="log_linear", inplace=True)
    return None


def run_sparse(fn, logits, prior, proxy):
    # the op overwrites the logits with their gradient; timing does not depend on the values, so repeated
    # calls simply run on the previous gradient (finite, never all zero)
    x = logits.requires_grad_() if not logits.requires_grad else logits
    loss = fn(x, prior, proxy)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


def run_dense(logits, prior, proxy, T=1.0):
    x = logits.detach().requires_grad_()
    P = dense_posterior(logits.shape[1], prior, proxy)
    loss = F.kl_div(F.log_softmax(x.float() / T, dim=1), P, reduction="sum")
    loss.backward()
    return x.grad


def run_dense_given(logits, P, T=1.0):
    x = logits.detach().requires_grad_()
    loss = F.kl_div(F.log_softmax(x.float() / T, dim=1), P, reduction="sum")
    loss.backward()
    return x.grad


def run_liger(loss_fn, name, logits, P):
    x = logits.detach().requires_grad_()
    logq = F.log_softmax(x.float(), dim=1)
    if name == "liger_kl":
        loss = loss_fn(logq, P)
    else:  # LigerJSD(log_q student, log_p teacher)
        loss = loss_fn(logq, P.clamp(min=1e-30).log())
    loss.backward()
    return x.grad


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) on a 1 GiB buffer."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def cpu_memory_case(path: str, n: int, v: int, k: int) -> float | None:
    """Peak RSS increase (MiB) of one fwd+bwd of `path`, measured in a fresh process (ru_maxrss is per process)."""
    cmd = [sys.executable, __file__, "--_mem-case", json.dumps([path, n, v, k])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("MEM "):
            return float(line.split()[1])
    return None


def _mem_case_main(spec: str) -> None:
    path, n, v, k = json.loads(spec)
    torch.set_num_threads(os.cpu_count() or 1)
    logits, prior, proxy = make_inputs(n, v, k, "cpu", torch.float32)
    fns = {"sparse": lambda: run_sparse(sparse_path([]), logits, prior, proxy),
           "dense": lambda: run_dense(logits, prior, proxy)}
    # Building the inputs has its own transient peak, so ru_maxrss may not move: reset the peak (VmHWM) via
    # /proc/self/clear_refs first and measure the rise over the RSS with the inputs allocated.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_mb("VmRSS")
        fns[path]()
        print(f"MEM {_proc_status_mb('VmHWM') - base:.1f}")
    except OSError:  # not Linux: fall back to ru_maxrss (may under-report)
        base = maxrss_mb()
        fns[path]()
        print(f"MEM {maxrss_mb() - base:.1f}")


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


# ---------------------------------------------------------------------------------------------------------------
def bench_case(n, v, k, device, dtype, liger, bw_gbs):
    logits, prior, proxy = make_inputs(n, v, k, device, dtype)
    row = {"N": n, "V": v, "K": k, "dtype": str(dtype).replace("torch.", "")}
    note: list[str] = []
    sp = sparse_path(note)
    row["sparse_impl"] = note[0] if note else "not available"
    timer = time_cuda if device == "cuda" else time_cpu
    cases = {}
    if sp is not None:
        work = logits.clone()
        cases["sparse"] = lambda: run_sparse(sp, work, prior, proxy)
    if device == "cuda":
        # the kernel alone, without the input checks (one host sync): what the bandwidth floor is compared to
        from bayeskd.kernels.sparse_kd import triton_fused_posterior_kd

        work2 = logits.clone()
        kernel = lambda z, pr, px: triton_fused_posterior_kd(  # noqa: E731
            z, *pr, *px, mode="log_linear", inplace=True, check_finite=False)
        cases["kernel"] = lambda: run_sparse(kernel, work2, prior, proxy)
    dense_bytes = n * v * 4 * 5  # fp32 logits copy, log-softmax, P, two dense build temporaries/grad
    if device == "cuda" or dense_bytes <= CPU_MAX_BYTES:
        cases["dense"] = lambda: run_dense(logits, prior, proxy)
        P = None
        try:
            P = dense_posterior(v, prior, proxy)
        except torch.cuda.OutOfMemoryError:
            pass
        if P is not None:
            cases["dense_P"] = lambda: run_dense_given(logits, P)
            for name, fn in (liger or {}).items():
                cases[name] = (lambda f=fn, nm=name: run_liger(f, nm, logits, P))
    for name, fn in cases.items():
        try:
            row[f"{name}_ms"] = timer(fn)
            if device == "cuda":
                row[f"{name}_peak_mib"] = peak_cuda(fn)
            elif name in ("sparse", "dense"):
                row[f"{name}_peak_mib"] = cpu_memory_case(name, n, v, k)
        except torch.cuda.OutOfMemoryError:
            row[f"{name}_ms"] = "OOM"
            torch.cuda.empty_cache()
    if device == "cuda":
        target_bytes = 2 * n * k * (4 + 4) + 2 * n * 4
        floor_bytes = 2 * n * v * logits.element_size() + target_bytes
        row["floor_ms"] = floor_bytes / (bw_gbs * 1e9) * 1e3
    for name in ("dense", "dense_P", "liger_kl", "liger_jsd"):
        a, b = row.get(f"{name}_ms"), row.get("sparse_ms")
        if isinstance(a, float) and isinstance(b, float):
            row[f"{name}_over_sparse"] = a / b  # > 1: the sparse path is that many times faster
    for name in ("sparse", "kernel"):
        if isinstance(row.get(f"{name}_ms"), float) and "floor_ms" in row:
            row[f"{name}_over_floor"] = row[f"{name}_ms"] / row["floor_ms"]  # 1 = at the bandwidth floor
    if not liger and device == "cuda":
        row["liger"] = "not installed"
    del cases
    logits = None  # (not `del`: the closures above read it) frees the inputs before empty_cache
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_fused_linear(device, quick):
    """Peak memory and time of lm_head + loss: fused (chunked, no full logits) vs logits-then-loss."""
    from bayeskd.kernels.fused_linear_sparse_kd import fused_linear_sparse_kd
    from bayeskd.kernels.sparse_kd import triton_fused_posterior_kd

    n, h, v, k = (8192, 4096, 151936, 64) if not quick else (1024, 1024, 32000, 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).to(device, dtype)
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]).to(torch.int32)
    tail = torch.rand(n, generator=g) * 0.5 + 0.05
    lp = torch.log_softmax(torch.randn(n, k, generator=g), 1) + torch.log1p(-tail)[:, None]
    prior = (idx.to(device), lp.to(device), tail.to(device))
    from bayeskd.losses.linear import torch_chunk_loss

    chunk_loss = None if device == "cuda" else torch_chunk_loss  # None: the Triton kernel

    def fused():
        x, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        fused_linear_sparse_kd(x, w, *prior, mode="none", chunk_loss=chunk_loss).sum().backward()
        return x.grad, w.grad

    def unfused():
        x, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        z = x @ w.t()
        if device == "cuda":
            loss = triton_fused_posterior_kd(z, *prior, mode="none", inplace=True)
        else:
            loss = run_dense_loss_only(z, prior, v)
        loss.sum().backward()
        return x.grad, w.grad

    row = {"N": n, "H": h, "V": v, "K": k, "dtype": str(dtype).replace("torch.", "")}
    for name, fn in (("fused_linear", fused), ("logits_then_loss", unfused)):
        try:
            if device == "cuda":
                row[f"{name}_ms"] = time_cuda(fn)
                row[f"{name}_peak_mib"] = peak_cuda(fn)
            else:
                row[f"{name}_ms"] = time_cpu(fn, reps=1)
        except torch.cuda.OutOfMemoryError:
            row[f"{name}_ms"] = "OOM"
    row["logits_mib"] = n * v * hidden.element_size() / 2**20
    # grad_hidden and grad_weight are outputs both variants must hold; what the fusion saves is everything else
    row["grads_mib"] = (n + v) * h * hidden.element_size() / 2**20
    fp, up = row.get("fused_linear_peak_mib"), row.get("logits_then_loss_peak_mib")
    if isinstance(fp, float) and isinstance(up, float):
        row["peak_ratio"] = fp / up
        row["peak_beyond_grads_ratio"] = (fp - row["grads_mib"]) / (up - row["grads_mib"])
    return row


def run_dense_loss_only(z, prior, v):
    idx, lp, tail = prior
    P = (tail / (v - idx.shape[1]))[:, None].expand(z.shape[0], v).clone()
    P.scatter_(1, idx.long(), lp.exp())
    return F.kl_div(F.log_softmax(z.float(), 1), P, reduction="none").sum(1)


# ---------------------------------------------------------------------------------------------------------------
def plot(rows, path: Path) -> None:
    plt = pyplot()
    labels = [f"N={r['N']}\nV={r['V']}\nK={r['K']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(rows) * 0.9), 4.5))
    for ax, key, title in ((axes[0], "ms", "fwd+bwd time (ms, log)"), (axes[1], "peak_mib", "peak extra memory (MiB, log)")):
        names = [nm for nm in ("sparse", "dense", "dense_P", "liger_kl", "liger_jsd", "floor")
                 if any(isinstance(r.get(f"{nm}_{key}"), float) for r in rows)]
        width = 0.8 / max(1, len(names))
        for j, nm in enumerate(names):
            vals = [r.get(f"{nm}_{key}") if isinstance(r.get(f"{nm}_{key}"), float) else 0 for r in rows]
            ax.bar([i + j * width for i in range(len(rows))], vals, width, label=nm)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=6)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None,
                    help="N,V,K triples separated by ';' (default: N∈{1k,4k,16k} × V∈{32000,151936} × K∈{16,64,128})")
    ap.add_argument("--quick", action="store_true", help="a few small cases (the CPU default)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/kernels_<device>.json)")
    ap.add_argument("--plot", action="store_true", help="also write a PNG next to the JSON")
    ap.add_argument("--no-fused-linear", action="store_true")
    ap.add_argument("--_mem-case", dest="mem_case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_case:
        _mem_case_main(args.mem_case)
        return 0
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if args.sizes:
        sizes = [tuple(int(x) for x in s.split(",")) for s in args.sizes.split(";") if s.strip()]
    elif args.quick or device == "cpu":
        sizes = QUICK_SIZES if device == "cuda" or args.quick else [s for s in QUICK_SIZES if s[0] * s[1] <= 2**25]
    else:
        sizes = DEFAULT_SIZES
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    liger = liger_losses() if device == "cuda" else None
    bw = copy_bandwidth_gbs() if device == "cuda" else None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {name}" + (f"  copy bandwidth {bw:.0f} GB/s" if bw else "")
          + ("" if device == "cpu" else f"  liger: {'installed' if liger else 'not installed'}"))
    rows = []
    for n, v, k in sizes:
        if device == "cpu" and n * v * 4 * 2 > CPU_MAX_BYTES:
            print(f"skip N={n} V={v} K={k} on CPU (over {CPU_MAX_BYTES / 1e9:.0f} GB)")
            continue
        row = bench_case(n, v, k, device, dtype, liger, bw)
        rows.append(row)
        print(json.dumps(row))
    cols = ["N", "V", "K", "sparse_ms", "kernel_ms", "dense_ms", "dense_P_ms", "liger_kl_ms", "liger_jsd_ms",
            "floor_ms", "dense_over_sparse", "liger_kl_over_sparse", "sparse_over_floor", "kernel_over_floor",
            "sparse_peak_mib", "dense_peak_mib"]
    print_table(rows, cols)
    result = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "copy_bandwidth_gbs": bw,
              "liger": "installed" if liger else "not installed", "cases": rows,
              "command": command()}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cpu" and sparse_path([]) is None:
        print("fused linear: skipped (bayeskd.losses.fused_posterior_kd, the CPU path, is not available)")
    elif not args.no_fused_linear:
        fl = bench_fused_linear(device, quick=args.quick or device == "cpu")
        result["fused_linear"] = fl
        print("fused linear:", json.dumps(fl))
    out = write_json(Path(args.out) if args.out else RESULTS / f"kernels_{device}.json", result)
    print(f"wrote {out}")
    if args.plot and rows:
        plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
