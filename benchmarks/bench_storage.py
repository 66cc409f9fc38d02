"""Bytes per target token and per entry: uncompressed shards (int32 id + float32 log-prob) against the compact codec
(bayeskd.codec), with the KL each costs and the decoding speed on one core, beside DistillKit's published figure.

    .venv/bin/python benchmarks/bench_storage.py [--targets runs/lab/tiny/run/posterior] [--rows 20000]

Rows: the lab's posterior targets when `--targets` exists (run `bayeskd lab run --preset tiny` first), and
synthetic rows at large vocabularies (top-K of softmax(N(0, σ²) logits), σ chosen so the mean entropy is about that
of an LLM's next token). Writes benchmarks/results/storage.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # one core, as the target says

import torch  # noqa: E402

from bayeskd.codec import decode, encode  # noqa: E402
from common import RESULTS, write_json  # noqa: E402

DISTILLKIT = {"bytes_per_token": 300, "k": 128, "bytes_per_entry": 300 / 128,
              "source": "DistillKit README (arcee-ai/DistillKit): top-128 logits in ~300 bytes per token"}
RAW_ENTRY, RAW_ROW = 8, 4  # int32 id + float32 log-prob per entry; float32 tail per row


def kl_per_position(lp: torch.Tensor, lp2: torch.Tensor) -> torch.Tensor:
    """KL(original || decoded) per row; the tail and unlisted tokens are identical in both (the tail is exact)."""
    listed = torch.isfinite(lp)
    p = torch.where(listed, lp.double().exp(), torch.zeros((), dtype=torch.float64))
    return torch.where(listed, p * (lp.double() - lp2.double()), torch.zeros((), dtype=torch.float64)).sum(1)


def measure(name: str, idx: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, vocab: int) -> dict:
    entries = int((idx >= 0).sum())
    encode(idx[:8], lp[:8], tail[:8], vocab)  # compile outside the timing
    t0 = time.perf_counter()
    tensors, params = encode(idx, lp, tail, vocab)
    t_enc = time.perf_counter() - t0
    decode(tensors, params)
    t_dec = min(_timed(decode, tensors, params) for _ in range(3))
    idx2, lp2, tail2 = decode(tensors, params)
    assert torch.equal(idx2, idx) and torch.equal(tail2, tail.float())
    kl = kl_per_position(lp, lp2)
    compact = sum(t.numel() * t.element_size() for t in tensors.values())
    rows, k = idx.shape
    return {
        "rows": name, "V": vocab, "K": k, "positions": rows, "entries": entries,
        "logprob_bits": params["logprob_bits"], "id_bits": params["id_bits"],
        "raw_bytes_per_token": (RAW_ENTRY * rows * k + RAW_ROW * rows) / rows,
        "compact_bytes_per_token": compact / rows, "compact_bytes_per_entry": compact / max(entries, 1),
        "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
        "encode_M_entries_per_s": entries / t_enc / 1e6, "decode_M_entries_per_s": entries / t_dec / 1e6,
    }


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def synthetic(rows: int, vocab: int, k: int, sigma: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx_all, lp_all, tail_all = [], [], []
    for lo in range(0, rows, 2048):  # [rows, V] at V = 262144 would not fit comfortably at once
        lp = torch.log_softmax(torch.randn(min(2048, rows - lo), vocab, generator=g) * sigma, -1)
        top, idx = lp.topk(k, 1)
        idx_all.append(idx.int())
        lp_all.append(top)
        tail_all.append((1 - top.double().exp().sum(1)).clamp(min=0).float())
    return torch.cat(idx_all), torch.cat(lp_all), torch.cat(tail_all)


def lab_rows(targets: Path, max_rows: int):
    from bayeskd.core.sparse import ShardReader

    reader = ShardReader(targets)
    parts, n = [], 0
    for dist, _ in reader:
        parts.append(dist)
        n += dist.num_rows
        if n >= max_rows:
            break
    from bayeskd.core.sparse import SparseDist

    d = SparseDist.cat(parts)[:max_rows]
    return d.indices, d.logprobs.float(), d.tail.float(), d.vocab_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="runs/lab/tiny/run/posterior", help="a target shard directory (lab)")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "storage.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"seed {args.seed}")
    results = []
    if Path(args.targets).exists():
        idx, lp, tail, vocab = lab_rows(Path(args.targets), args.rows)
        results.append(measure(f"lab {args.targets}", idx, lp, tail, vocab))
    for vocab in (32000, 151936, 262144):
        for k in (64, 128):
            idx, lp, tail = synthetic(args.rows // 4, vocab, k, sigma=2.5, seed=args.seed)
            results.append(measure("synthetic sigma=2.5", idx, lp, tail, vocab))
    head = (f"{'rows':<40} {'V':>7} {'K':>4} {'bits':>5} {'raw B/tok':>9} {'B/tok':>7} {'B/entry':>7} "
            f"{'KL mean':>9} {'KL p99':>9} {'KL max':>9} {'dec M/s':>8}")
    print(head)
    for r in results:
        print(f"{r['rows'][:40]:<40} {r['V']:>7} {r['K']:>4} {r['id_bits']}+{r['logprob_bits']:<3} "
              f"{r['raw_bytes_per_token']:>9.1f} {r['compact_bytes_per_token']:>7.1f} "
              f"{r['compact_bytes_per_entry']:>7.3f} {r['kl_mean']:>9.2e} {r['kl_p99']:>9.2e} {r['kl_max']:>9.2e} "
              f"{r['decode_M_entries_per_s']:>8.1f}")
    print(f"DistillKit (published): {DISTILLKIT['bytes_per_token']} bytes per token at K={DISTILLKIT['k']} "
          f"= {DISTILLKIT['bytes_per_entry']:.2f} bytes per entry")
    write_json(args.out, {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "command": "benchmarks/bench_storage.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "distillkit": DISTILLKIT, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
