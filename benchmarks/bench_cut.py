"""lm_head + sparse KD without logits: the cut-logits kernel against the ways to get the same loss with logits.

For every (N, H, V, K), bf16 hidden [N, H] and lm_head [V, H], a prior-only sparse top-K target (distinct random
indices per row, tail mass 0.05-0.5) and forward KL: forward + backward time and peak *extra* memory of
  cut          bayeskd.losses.linear.fused_linear_posterior_kd(..., cut=True): no [N, V] logits ever,
  fused    (a) z = hidden @ weight.T, then bayeskd.kernels.sparse_kd.triton_fused_posterior_kd(z, ..., inplace=True),
  liger_kl / liger_jsd  (b) z = hidden @ weight.T, log_softmax, Liger-Kernel's LigerKLDIVLoss / LigerJSD on the
               dense fp32 posterior (built before the call: neither timed nor counted in its extra memory;
               its size is `posterior_mib`),
  cce      (c) cut-cross-entropy's linear_cross_entropy (plain CE on one token per row: the lower bound of this
               design; default gradient filtering), and cce_nofilter (filter_eps=None: every tile, as cut does).
  cut_ce / fused_ce  a training step's loss: CE on a token + KD, through fused_linear_kd_and_ce (one pass of the
               cut kernel) against logits + fp32 cross-entropy + our fused kernel (the trainer's plain path).
Extra memory = peak allocated during fwd+bwd - allocated before the call - the bytes of grad_hidden and
grad_weight (outputs every method must hold). Targets: at N=16384, V=151936 cut's extra memory is at most
1/10 of fused's; everywhere cut's time is within 1.2x of CCE's and no slower than fused.

    python benchmarks/bench_cut.py                  # the full grid on CUDA (~minutes on an H100/H200)
    python benchmarks/bench_cut.py --quick
    python benchmarks/bench_cut.py --sizes "16384,4096,151936,64"
    python benchmarks/bench_cut.py --device cpu     # smoke: one tiny case under the Triton interpreter (CI)
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, command, fmt, liger_losses, peak_cuda, print_table, time_cpu, time_cuda, write_json

DEFAULT_SIZES = [(n, h, v, k) for n in (4096, 8192, 16384) for h in (2048, 4096) for v in (32000, 151936)
                 for k in (16, 64)]
QUICK_SIZES = [(4096, 2048, 32000, 16), (8192, 4096, 151936, 64), (16384, 4096, 151936, 64)]
SMOKE_SIZES = [(64, 32, 257, 16)]
TARGET_SHAPE = (16384, 151936)  # (N, V) of the memory target
MEM_TARGET, CCE_TARGET, FUSED_TARGET = 0.1, 1.2, 1.0
SMOKE_TOL = 1e-4
BIG_MS = 25.0  # a call at least this long is timed as the median of --reps calls instead of triton's do_bench
KERNEL_MODULES = ("bayeskd.kernels.sparse_kd", "bayeskd.kernels.fused_linear_sparse_kd",
                  "bayeskd.kernels.cut_sparse_kd")
SMOKE_NOTE = ("CPU smoke under the Triton interpreter: checks that the cut loss and gradients equal logits + "
              "fused kernel; interpreter timings are meaningless (not a benchmark)")


def use_interpreter() -> None:
    """Run the Triton kernels in the interpreter (CPU): the variable must be set before they are decorated, so
    kernel modules imported earlier without it are reloaded."""
    os.environ["TRITON_INTERPRET"] = "1"
    for name in KERNEL_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and any(type(getattr(mod, a)).__name__ == "JITFunction" for a in dir(mod)):
            importlib.reload(mod)


# ---------------------------------------------------------------------------------------------------------------
# inputs
def make_case(n: int, h: int, v: int, k: int, device: str, dtype: torch.dtype, seed: int = 0):
    """hidden [N, H], lm_head weight [V, H] and a prior-only SparseDist (distinct indices, tail 0.05-0.5)."""
    from bayeskd.core.sparse import SparseDist

    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device, dtype=dtype).mul_(0.5)
    weight = torch.randn(v, h, generator=g, device=device, dtype=dtype).mul_(h ** -0.5)
    idx = torch.empty(n, k, dtype=torch.int32, device=device)
    step = max(1, 2**29 // v)  # top-k of random scores draws k distinct tokens; ~2 GiB of scores at a time
    for r in range(0, n, step):
        idx[r:r + step] = torch.rand(min(step, n - r), v, generator=g, device=device).topk(k, dim=1).indices
    tail = torch.rand(n, generator=g, device=device) * 0.45 + 0.05
    lp = torch.log_softmax(torch.randn(n, k, generator=g, device=device) * 2, 1) + torch.log1p(-tail)[:, None]
    return hidden, weight, SparseDist(idx, lp, tail, v)


def dense_posterior(prior) -> torch.Tensor:
    """The prior as a dense fp32 [N, V] distribution: the tail spread over the unlisted tokens."""
    n, k = prior.indices.shape
    p = (prior.tail / (prior.vocab_size - k))[:, None].expand(n, prior.vocab_size).contiguous()
    return p.scatter_(1, prior.indices.long(), prior.logprobs.exp())


# ---------------------------------------------------------------------------------------------------------------
# the methods: each call runs forward + backward from fresh leaves and returns (loss, grad_hidden, grad_weight)
def _leaves(hidden, weight):
    return hidden.detach().requires_grad_(), weight.detach().requires_grad_()


def cut_method(hidden, weight, prior, tokens=None):
    """The cut kernel; with `tokens`, a training step's loss as the trainer's cut_logits path runs it: KD and CE on
    `tokens` in one pass of the kernel (fused_linear_kd_and_ce)."""
    from bayeskd.losses.linear import fused_linear_kd_and_ce, fused_linear_posterior_kd

    def run():
        x, w = _leaves(hidden, weight)
        if tokens is None:
            kd = fused_linear_posterior_kd(x, w, prior, cut=True, backend="triton", divergence="forward_kl")
            kd.sum().backward()
        else:
            kd, ce = fused_linear_kd_and_ce(x, w, tokens, prior, cut=True, backend="triton", divergence="forward_kl")
            (kd.sum() + ce.sum()).backward()
        return kd.detach(), x.grad, w.grad
    return run


def fused_method(hidden, weight, prior, tokens=None):
    """Logits, then our fused kernel in place; with `tokens`, as the trainer's plain path: CE on them in fp32 first
    (its own fp32 copy of the logits, which the kernel then overwrites)."""
    from bayeskd.kernels.sparse_kd import triton_fused_posterior_kd

    def run():
        x, w = _leaves(hidden, weight)
        z = x @ w.t()
        ce = F.cross_entropy(z.float(), tokens, reduction="sum") if tokens is not None else 0.0
        kd = triton_fused_posterior_kd(z, prior.indices, prior.logprobs, prior.tail, mode="none",
                                       divergence="forward_kl", inplace=True)
        (kd.sum() + ce).backward()
        return kd.detach(), x.grad, w.grad
    return run


def liger_method(loss_fn, hidden, weight, target):
    """`target`: the dense posterior P (liger_kl) or its log (liger_jsd, LigerJSD(log_q, log_p))."""
    def run():
        x, w = _leaves(hidden, weight)
        logq = F.log_softmax((x @ w.t()).float(), dim=1)
        loss = loss_fn(logq, target)
        loss.backward()
        return loss.detach(), x.grad, w.grad
    return run


def cce_method(lce, hidden, weight, tokens, filter_eps):
    def run():
        x, w = _leaves(hidden, weight)
        loss = lce(x, w, tokens, reduction="sum", filter_eps=filter_eps)
        loss.backward()
        return loss.detach(), x.grad, w.grad
    return run


def cce_function():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:  # noqa: BLE001 - any import problem means "not installed" for this report
        return None
    return linear_cross_entropy


# ---------------------------------------------------------------------------------------------------------------
# measurement (CUDA)
def event_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    del out
    return start.elapsed_time(end)


def free_cuda() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(row: dict, name: str, fn, grads_mib: float, reps: int, catch_all: bool = False):
    """row[name_ms], row[name_extra_mib]: "OOM" (or the error, for third-party baselines) when the call fails.
    Returns the loss of the warm-up call (None on failure)."""
    loss = None
    try:
        out = fn()  # warm-up: compiles the kernels
        loss = out[0]
        del out
        first = event_ms(fn)
        if first >= BIG_MS:  # big shapes: a few reps, not do_bench's minimum of ~7 calls
            row[f"{name}_ms"] = statistics.median([first] + [event_ms(fn) for _ in range(max(0, reps - 1))])
        else:
            row[f"{name}_ms"] = time_cuda(fn)
        row[f"{name}_extra_mib"] = peak_cuda(fn) - grads_mib
    except torch.cuda.OutOfMemoryError:
        row[f"{name}_ms"] = row[f"{name}_extra_mib"] = "OOM"
    except Exception as e:  # noqa: BLE001 - a broken baseline must not stop the grid; our own errors propagate
        if not catch_all:
            raise
        row[f"{name}_ms"] = row[f"{name}_extra_mib"] = f"error: {type(e).__name__}: {str(e)[:160]}"
    free_cuda()
    return loss


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def bench_case(n, h, v, k, args, liger, lce) -> dict:
    dtype = torch.bfloat16
    row = {"N": n, "H": h, "V": v, "K": k, "dtype": "bfloat16", "logits_mib": n * v * 2 / 2**20,
           "grads_mib": (n + v) * h * 2 / 2**20, "posterior_mib": n * v * 4 / 2**20, "notes": []}
    hidden, weight, prior = make_case(n, h, v, k, "cuda", dtype)
    grads_mib = row["grads_mib"]
    cut, fused = cut_method(hidden, weight, prior), fused_method(hidden, weight, prior)
    a = measure(row, "cut", cut, grads_mib, args.reps)
    b = measure(row, "fused", fused, grads_mib, args.reps)
    if a is not None and b is not None:  # the same loss, up to the bf16 rounding of the materialized logits
        row["cut_vs_fused_loss_rel"] = rel_err(a, b)
    tokens = prior.indices[:, 0].long()  # a training step: CE on the teacher token + KD
    measure(row, "cut_ce", cut_method(hidden, weight, prior, tokens), grads_mib, args.reps)
    measure(row, "fused_ce", fused_method(hidden, weight, prior, tokens), grads_mib, args.reps)
    del tokens
    if lce is None:
        row["cce_ms"] = row["cce_nofilter_ms"] = "not installed"
    else:
        tokens = prior.indices[:, 0].long()
        measure(row, "cce", cce_method(lce, hidden, weight, tokens, "auto"), grads_mib, args.reps, True)
        measure(row, "cce_nofilter", cce_method(lce, hidden, weight, tokens, None), grads_mib, args.reps, True)
        del tokens
    if liger is None:
        row["liger_kl_ms"] = row["liger_jsd_ms"] = "not installed"
    elif row["posterior_mib"] * 2**20 > args.liger_max_gb * 1e9:
        row["liger_kl_ms"] = row["liger_jsd_ms"] = "skipped"
        row["notes"].append(f"liger skipped: the dense fp32 posterior ({row['posterior_mib'] * 2**20 / 1e9:.0f} GB) "
                            f"is over --liger-max-gb {args.liger_max_gb:g}")
    else:
        P = None
        try:
            P = dense_posterior(prior)
        except torch.cuda.OutOfMemoryError:
            row["liger_kl_ms"] = row["liger_jsd_ms"] = "OOM"
            row["notes"].append("liger: OOM building the dense posterior")
        if P is not None:
            measure(row, "liger_kl", liger_method(liger["liger_kl"], hidden, weight, P), grads_mib,
                    args.reps, True)
            P.clamp_(min=1e-30).log_()  # in place: log P for LigerJSD, no second [N, V] buffer
            measure(row, "liger_jsd", liger_method(liger["liger_jsd"], hidden, weight, P), grads_mib,
                    args.reps, True)
        del P
    del hidden, weight, prior, cut, fused, a, b
    free_cuda()
    ratios(row)
    return row


def ratios(row: dict) -> None:
    def num(key):
        x = row.get(key)
        return x if isinstance(x, float) else None

    c, f, e = num("cut_ms"), num("fused_ms"), num("cce_ms")
    if c and f:
        row["cut_over_fused"] = c / f
        row["meets_time_fused"] = c / f <= FUSED_TARGET
    if c and e:
        row["cut_over_cce"] = c / e
        row["meets_time_cce"] = c / e <= CCE_TARGET
    if c and num("cce_nofilter_ms"):
        row["cut_over_cce_nofilter"] = c / row["cce_nofilter_ms"]
    if num("cut_ce_ms") and num("fused_ce_ms"):
        row["cut_ce_over_fused_ce"] = row["cut_ce_ms"] / row["fused_ce_ms"]
    ce, fe = num("cut_extra_mib"), num("fused_extra_mib")
    if ce is not None and fe:
        row["cut_extra_over_fused_extra"] = ce / fe
        if (row["N"], row["V"]) == TARGET_SHAPE:
            row["meets_memory"] = ce / fe <= MEM_TARGET


def summary(rows: list[dict]) -> dict:
    out = {}
    for key, what in (("meets_memory", f"cut extra <= {MEM_TARGET:g} x fused extra at N,V={TARGET_SHAPE}"),
                      ("meets_time_cce", f"cut time <= {CCE_TARGET:g} x CCE"),
                      ("meets_time_fused", "cut time <= logits + fused kernel")):
        vals = [r[key] for r in rows if key in r]
        out[key] = {"target": what, "cases": len(vals), "met": sum(vals),
                    "all_met": bool(vals) and all(vals)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# CPU smoke (the Triton interpreter)
def smoke_case(n, h, v, k) -> dict:
    hidden, weight, prior = make_case(n, h, v, k, "cpu", torch.float32)
    row = {"N": n, "H": h, "V": v, "K": k, "dtype": "float32", "smoke": True}
    cut, fused = cut_method(hidden, weight, prior), fused_method(hidden, weight, prior)
    got, ref = cut(), fused()
    errs = {f"{nm}_rel_err": rel_err(a, b) for nm, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, ref)}
    tokens = prior.indices[:, 0].long()  # and the training-step pair (CE + KD) the CUDA run times
    got_ce = cut_method(hidden, weight, prior, tokens)()
    ref_ce = fused_method(hidden, weight, prior, tokens)()
    errs.update({f"ce_step_{nm}_rel_err": rel_err(a, b)
                 for nm, a, b in zip(("loss", "grad_hidden", "grad_weight"), got_ce, ref_ce)})
    ok = all(e <= SMOKE_TOL for e in errs.values()) and all(bool(torch.isfinite(t).all()) for t in got + got_ce)
    row["check"] = {"against": "logits + fused kernel (triton_fused_posterior_kd)", "tol": SMOKE_TOL, **errs,
                    "passed": ok}
    row["interpreter_ms"] = {"cut": time_cpu(cut, reps=1), "fused": time_cpu(fused, reps=1),
                             "note": "Triton interpreter: meaningless as a benchmark"}
    return row


# ---------------------------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[tuple[int, int, int, int]]:
    sizes = [tuple(int(x) for x in s.split(",")) for s in text.split(";") if s.strip()]
    if any(len(s) != 4 for s in sizes):
        raise SystemExit(f"--sizes: N,H,V,K quadruples separated by ';', got {text!r}")
    return sizes


def versions() -> dict:
    from importlib import metadata

    out = {"torch": torch.__version__}
    for key, dist in (("triton", "triton"), ("liger_kernel", "liger-kernel"), ("cut_cross_entropy",
                                                                               "cut-cross-entropy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "not installed"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda: the benchmark; cpu: the smoke check under the Triton interpreter")
    ap.add_argument("--sizes", default=None, help="N,H,V,K quadruples separated by ';' (default: N in {4096, 8192, "
                    "16384} x H in {2048, 4096} x V in {32000, 151936} x K in {16, 64}; on cpu: 64,32,257,16)")
    ap.add_argument("--quick", action="store_true", help="three cases, the memory target's shape included")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/cut_<device>.json)")
    ap.add_argument("--reps", type=int, default=3, help=f"timed calls for a method that takes >= {BIG_MS:g} ms")
    ap.add_argument("--liger-max-gb", type=float, default=40.0,
                    help="skip the Liger baselines when the dense fp32 posterior is larger than this")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no new case after this many seconds (the rest are recorded as skipped); 0: none")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if device == "cpu":
        use_interpreter()
    sizes = parse_sizes(args.sizes) if args.sizes else (
        SMOKE_SIZES if device == "cpu" else QUICK_SIZES if args.quick else DEFAULT_SIZES)
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    out = Path(args.out) if args.out else RESULTS / f"cut_{device}.json"
    result = {"device": name, **versions(), "dtype": "bfloat16" if device == "cuda" else "float32",
              "divergence": "forward_kl", "target": "prior only (mode none), random distinct top-K, tail 0.05-0.5",
              "command": command(),
              "args": sys.argv[1:] if argv is None else list(argv),
              "cases": []}
    if device == "cpu":
        result.update(smoke=True, note=SMOKE_NOTE)
        ok = True
        for n, h, v, k in sizes:
            with warnings.catch_warnings():  # numpy under the interpreter warns about the kernels' -inf arithmetic
                warnings.filterwarnings("ignore", ".*encountered in", RuntimeWarning)
                row = smoke_case(n, h, v, k)
            ok &= row["check"]["passed"]
            result["cases"].append(row)
            c = row["check"]
            print(f"smoke N={n} H={h} V={v} K={k}: cut vs logits+fused  loss {c['loss_rel_err']:.1e}  "
                  f"grad_hidden {c['grad_hidden_rel_err']:.1e}  grad_weight {c['grad_weight_rel_err']:.1e}  "
                  f"(tol {SMOKE_TOL:g})  {'PASS' if c['passed'] else 'FAIL'}")
            print(f"  interpreter ms (meaningless): cut {fmt(row['interpreter_ms']['cut'])}  "
                  f"fused {fmt(row['interpreter_ms']['fused'])}")
        result["passed"] = ok
        write_json(out, result)
        print(f"wrote {out}")
        return 0 if ok else 1

    liger, lce = liger_losses(), cce_function()
    print(f"device: {name}  liger: {'installed' if liger else 'not installed'}  "
          f"cut-cross-entropy: {'installed' if lce else 'not installed'}")
    # the memory target's shapes first, so that a time budget never drops them
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0], sizes[i][2]) != TARGET_SHAPE)
    rows: dict[int, dict] = {}
    t0 = time.perf_counter()
    for i in order:
        n, h, v, k = sizes[i]
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            rows[i] = {"N": n, "H": h, "V": v, "K": k, "skipped": f"time budget (--budget-s {args.budget_s:g})"}
            continue
        t = time.perf_counter()
        rows[i] = bench_case(n, h, v, k, args, liger, lce)
        rows[i]["case_s"] = time.perf_counter() - t
        print(json.dumps(rows[i]), flush=True)
        result["cases"] = [rows[j] for j in sorted(rows)]
        result["summary"] = summary(result["cases"])
        write_json(out, result)  # after every case: a killed run keeps its results
    result["cases"] = [rows[j] for j in sorted(rows)]
    result["summary"] = summary(result["cases"])
    result["total_s"] = time.perf_counter() - t0
    write_json(out, result)
    cols = ["N", "H", "V", "K", "cut_ms", "fused_ms", "liger_kl_ms", "liger_jsd_ms", "cce_ms", "cce_nofilter_ms",
            "cut_over_fused", "cut_over_cce", "cut_extra_mib", "fused_extra_mib", "liger_kl_extra_mib",
            "cce_extra_mib", "cut_extra_over_fused_extra", "cut_ce_ms", "fused_ce_ms", "cut_ce_over_fused_ce",
            "logits_mib"]
    short = lambda x: "error" if isinstance(x, str) and x.startswith("error") else x  # noqa: E731 (JSON: all)
    print_table([{c: short(x) for c, x in r.items()} for r in result["cases"]], cols)
    for key, s in result["summary"].items():
        print(f"{s['target']}: {s['met']}/{s['cases']} cases" + ("  MET" if s["all_met"] else ""))
    print(f"total {result['total_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
