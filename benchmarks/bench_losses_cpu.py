"""CPU: fused posterior + forward KL (bayeskd.losses.fused_posterior_kd, torch path) vs the dense baseline.

Dense baseline: the posterior materialised as [N, V] from the sparse prior and proxy, then
F.kl_div(F.log_softmax(z), P) with autograd. Each measurement runs in its own subprocess; peak extra memory
is the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS just before
the loss, with the inputs (and nothing else) already allocated. It includes the gradient buffer.

    python benchmarks/bench_losses_cpu.py [--n 4096 --v 32000 --k 64] [--out benchmarks/results/losses_cpu.json]
"""
import argparse
import json
import subprocess
import sys
import time


def _rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def run_one(variant: str, n: int, v: int, k: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from bayeskd.losses import fused_posterior_kd
    from bayeskd.core.sparse import SparseDist

    g = torch.Generator().manual_seed(0)

    def rand_dist():
        idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]).int()
        p = torch.softmax(torch.randn(n, k, generator=g), 1) * 0.7
        return SparseDist(idx, p.log(), torch.full((n,), 0.3), v)

    prior, proxy = rand_dist(), rand_dist()
    z0 = torch.randn(n, v, generator=g)

    def step(z):
        if variant == "dense":
            p = prior.to_dense() * proxy.to_dense()
            p /= p.sum(1, keepdim=True)
            loss = F.kl_div(F.log_softmax(z, 1), p, reduction="none").sum(1)
        else:
            loss = fused_posterior_kd(z, prior, proxy, inplace=variant == "fused_inplace", backend="torch")
        loss.sum().backward()

    times = []
    for _ in range(reps):
        z = z0.clone().requires_grad_(True)
        t = time.perf_counter()
        step(z)
        times.append(time.perf_counter() - t)
        del z
    z = z0.clone().requires_grad_(True)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS
    before = _rss_mb("VmRSS")
    step(z)
    return {"variant": variant, "time_s": min(times), "peak_extra_mb": _rss_mb("VmHWM") - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variant")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run_one(a.variant, a.n, a.v, a.k, a.reps)))
        return
    rows = []
    for variant in ("dense", "fused", "fused_inplace"):
        cmd = [sys.executable, __file__, "--variant", variant, "--n", str(a.n), "--v", str(a.v), "--k", str(a.k),
               "--reps", str(a.reps)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(rows[-1], flush=True)
    dense = rows[0]
    for r in rows[1:]:
        r["speedup_vs_dense"] = dense["time_s"] / r["time_s"]
        # below 1 MB the RSS cannot resolve it (small temporaries reuse freed heap): count it as 1 MB
        r["memory_ratio_vs_dense_at_least"] = dense["peak_extra_mb"] / max(r["peak_extra_mb"], 1.0)
    result = {"n": a.n, "v": a.v, "k": a.k, "mode": "log_linear", "divergence": "forward_kl", "results": rows}
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
