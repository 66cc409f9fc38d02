"""Benchmark the posterior pass and the distillation step against their bare baselines, in one run.

Models: tiny-but-not-trivial Llamas built from a config (default hidden 256, 4 layers, V = 4096: the BPE tokenizer
trained on the embedded corpus, `bayeskd.priors.estimate.embedded_defaults()`); data: the embedded teacher records.

(a) posterior pass: `ProxyPosterior.estimate` over the records (prior = `NGramPrior` fitted on the responses,
    top-K with leave-one-out, combine, shard writing) vs a bare proxy forward (full logits) over the same batches.
    Each repeat times a bare pass and a posterior pass back to back; the ratio is the median over repeats of
    those per-repeat ratios. Variants: `computed` (the prior top-K computed in the pass), `read` (read from
    prior top-K shards as `estimate-prior --write-topk` writes them; their writing is timed separately),
    `serial` (computed, no background worker), `proxy_only` (no prior: the proxy's own top-K rows and the
    teacher-token log-probability).
(b) distill step: `BayesKDTrainer.compute_loss` + backward + AdamW step with the sparse targets written in (a) vs
    plain SFT (CE only) at the same batches; per-step medians after warm-up, variants interleaved step by step so
    machine noise hits both alike. The online-posterior step (proxy forward inside the step) is timed too.
(c) target storage: bytes per response token of the shards written in (a) vs the bound 8·K + 8.

    .venv/bin/python benchmarks/bench_posterior.py --records 300 --steps 20
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, write_json


def _machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _llama(tok, hidden, layers, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 // 64 * 64),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg)


def _bare_proxy_pass(model, tokenized, batch_size, device, shard_records) -> float:
    """A plain full-logits forward over the batches `ProxyPosterior.estimate` forms: whole-record shards of
    `shard_records`, longest record first within each shard."""
    from bayeskd.posterior.shards import record_shard_bounds

    order = [lo + i for lo, hi in record_shard_bounds(len(tokenized), shard_records)
             for i in sorted(range(hi - lo), key=lambda q: -len(tokenized.input_ids[lo + q]))]
    bounds = [(lo + s, min(lo + s + batch_size, hi)) for lo, hi in record_shard_bounds(len(tokenized), shard_records)
              for s in range(0, hi - lo, batch_size)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo, hi in bounds:
            batch = order[lo:hi]
            lens = [len(tokenized.input_ids[i]) for i in batch]
            ids = torch.zeros((len(batch), max(lens)), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(batch):
                ids[j, :lens[j]] = torch.from_numpy(tokenized.input_ids[i].astype(np.int64))
                mask[j, :lens[j]] = 1
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.sum()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--order", type=int, default=3, help="n-gram order of the prior")
    ap.add_argument("--k", type=int, default=64, help="top-K of the targets")
    ap.add_argument("--proxy-batch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="distill batch size")
    ap.add_argument("--steps", type=int, default=20, help="timed distill steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="bare-forward + posterior passes per variant (median)")
    ap.add_argument("--variants", default="computed,read,serial,proxy_only",
                    help="posterior-pass variants to time (comma-separated); the first is the headline ratio")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-online", action="store_true", help="skip timing the online-posterior step")
    ap.add_argument("--out", default=str(RESULTS / "posterior.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from bayeskd.corpus import embedded_teacher_records
    from bayeskd.data import tokenize_records
    from bayeskd.priors.estimate import embedded_defaults
    from bayeskd.posterior.proxy import ProxyPosterior
    from bayeskd.priors.ngram import NGramPrior
    from bayeskd import BayesKDCollator, BayesKDConfig, BayesKDTrainer, TeacherTargetsDataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, tok_dir = embedded_defaults()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    records = embedded_teacher_records(args.records, seed=0)
    tokenized = tokenize_records(records, tok, max_length=args.max_length)
    V = tokenized.vocab_size
    rows = int(sum(len(s) for s in tokenized.response_sequences()))
    tokens = int(sum(len(x) for x in tokenized.input_ids))
    print(f"{len(tokenized)} records, {tokens} tokens, {rows} response tokens, V={V}, device={device}, "
          f"threads={torch.get_num_threads()}")

    proxy = _llama(tok, args.hidden, args.layers, seed=1).to(device).eval()
    student = _llama(tok, args.hidden, args.layers, seed=0).to(device)
    n_params = sum(p.numel() for p in student.parameters())
    t = time.perf_counter()
    prior = NGramPrior(order=args.order, vocab_size=V).fit(tokenized.response_sequences())
    prior_fit_s = time.perf_counter() - t

    work = Path(tempfile.mkdtemp(prefix="bench_posterior_"))
    post = ProxyPosterior(proxy, device=device, batch_size=args.proxy_batch, top_k=args.k)

    # ---------------------------------------------------------------- (a) posterior pass vs bare proxy forward
    from bayeskd.core.sparse import ShardWriter

    prior_dir = work / "prior_topk"  # prior top-K shards, as `estimate-prior --write-topk` writes them
    t = time.perf_counter()
    seqs = tokenized.response_sequences()
    ShardWriter(prior_dir, V, args.k, tokenized.fingerprint,
                {**prior.config(), "top_k": args.k, "leave_one_out": True}).write(
        "shard-00000", prior.topk(seqs, args.k, leave_one_out=True),
        extra={"record_index": torch.arange(len(seqs)), "lengths": torch.tensor([len(s) for s in seqs])})
    prior_topk_write_s = time.perf_counter() - t
    settings = {"computed": ({}, prior), "read": ({"prior_topk": prior_dir}, prior),
                "serial": ({"overlap": False}, prior), "proxy_only": ({}, None)}
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(settings))
    if unknown:
        ap.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(settings)}")
    shard_records = max(1, len(tokenized) // 4)
    _bare_proxy_pass(proxy, tokenized, args.proxy_batch, device, shard_records)  # warm-up
    runs = {n: {"bare": [], "posterior": [], "ratio": []} for n in names}
    summaries = {}
    for r in range(args.repeats):
        for n in (names if r % 2 == 0 else names[::-1]):  # alternate the order of the variants
            kwargs, pr = settings[n]
            bare_s = _bare_proxy_pass(proxy, tokenized, args.proxy_batch, device, shard_records)
            t = time.perf_counter()
            summaries[n] = post.estimate(tokenized, pr, work / f"post_{n}{r}", progress=False,
                                         shard_records=shard_records, **kwargs)
            full_s = time.perf_counter() - t
            runs[n]["bare"].append(bare_s)
            runs[n]["posterior"].append(full_s)
            runs[n]["ratio"].append(full_s / bare_s)
    parts = ("prior_topk_seconds", "proxy_forward_seconds", "proxy_topk_seconds", "combine_seconds", "write_seconds")
    variants = {n: {"ratio": statistics.median(v["ratio"]), "posterior_seconds_median": statistics.median(v["posterior"]),
                    "bare_seconds_median": statistics.median(v["bare"]), "ratios_all": v["ratio"],
                    "posterior_seconds_all": v["posterior"], "bare_seconds_all": v["bare"],
                    "last_run_parts_seconds": {k: summaries[n][k] for k in parts}}
                for n, v in runs.items()}
    head = names[0]
    a = {"ratio": variants[head]["ratio"], "variant": head, "target": 1.10, "variants": variants,
         "prior_topk_write_seconds": prior_topk_write_s, "prior_fit_seconds": prior_fit_s}
    a["passes"] = a["ratio"] <= a["target"]
    with_prior = [n for n in names if n != "proxy_only"]
    if not with_prior:
        ap.error("--variants needs at least one variant with a prior (its shards feed the distill step)")
    targets_dir = str(work / f"post_{with_prior[0]}0")

    # ---------------------------------------------------------------- (b) distill step: sparse targets vs SFT
    ds_t = TeacherTargetsDataset(tokenized, targets_dir)
    ds_s = TeacherTargetsDataset(tokenized)
    pad = tok.pad_token_id
    coll = BayesKDCollator(pad)
    rng = np.random.default_rng(0)
    n_batches = args.warmup + args.steps
    batches = [rng.choice(len(tokenized), size=args.batch, replace=False).tolist() for _ in range(n_batches)]

    step_variants = {"sft": ds_s, "sparse_targets": ds_t}
    if not args.no_online:
        step_variants["online_posterior"] = TeacherTargetsDataset(tokenized, str(prior_dir))
    runners = {}
    for name, ds in step_variants.items():
        m = copy.deepcopy(student).train()
        cfg = BayesKDConfig(output_dir=str(work / f"o_{name}"), learning_rate=1e-4, fused_backend="auto",
                            use_cpu=device.type == "cpu")
        tr = BayesKDTrainer(model=m, args=cfg, data_collator=coll, train_dataset=ds,
                            proxy_model=copy.deepcopy(proxy) if name == "online_posterior" else None)
        runners[name] = (m, tr, torch.optim.AdamW(m.parameters(), lr=1e-4), ds)

    def step(name, idx):
        m, tr, opt, ds = runners[name]
        batch = {k: v.to(device) for k, v in coll([ds[i] for i in idx]).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = tr.compute_loss(m, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = {n: [] for n in runners}
    names = list(runners)
    for i, idx in enumerate(batches):
        for n in (names if i % 2 == 0 else names[::-1]):  # alternate the order: no variant always goes first
            dt = step(n, idx)
            if i >= args.warmup:
                times[n].append(dt)
    med = {n: statistics.median(v) for n, v in times.items()}
    b = {"batch_size": args.batch, "steps": args.steps, "warmup": args.warmup,
         "median_step_seconds": med, "step_seconds_all": times,
         # batches differ in length, so compare each batch with itself, then take the median of those ratios
         "ratio": statistics.median(s / f for s, f in zip(times["sparse_targets"], times["sft"])),
         "ratio_of_medians": med["sparse_targets"] / med["sft"], "target": 1.10}
    b["passes"] = b["ratio"] <= b["target"]
    if "online_posterior" in med:
        b["online_over_sft"] = statistics.median(o / f for o, f in zip(times["online_posterior"], times["sft"]))

    # ---------------------------------------------------------------- (c) storage
    shard_bytes = sum(f.stat().st_size for f in Path(targets_dir).glob("*.safetensors"))
    dir_bytes = sum(f.stat().st_size for f in Path(targets_dir).rglob("*") if f.is_file())
    bound = 8 * args.k + 8
    c = {"k": args.k, "rows": rows, "shard_bytes_per_token": shard_bytes / rows,
         "dir_bytes_per_token": dir_bytes / rows, "bound_bytes_per_token": bound,
         "passes": dir_bytes / rows <= bound}

    result = {"benchmark": "bench_posterior", "machine": _machine(), "device": str(device),
              "config": {**vars(args), "vocab_size": V, "records": len(tokenized), "tokens": tokens,
                         "response_tokens": rows, "params_per_model": n_params},
              "posterior_pass": a, "distill_step": b, "storage": c}

    print()
    print(f"{'measure':<44}{'value':>14}{'target':>12}  ok")
    for n, v in variants.items():
        print(f"{'(a) posterior/bare, median of %d: ' % args.repeats + n:<44}{v['ratio']:>14.3f}"
              f"{'<= 1.10' if n == head else '':>12}  {('yes' if a['passes'] else 'NO') if n == head else ''}")
        print(f"{'      posterior s / bare s (medians)':<44}{v['posterior_seconds_median']:>8.3f} /"
              f"{v['bare_seconds_median']:>6.3f}")
    print(f"{'    prior top-K shards written in (s)':<44}{prior_topk_write_s:>14.3f}")
    for n, v in med.items():
        print(f"{'(b) median step s: ' + n:<44}{v:>14.4f}")
    print(f"{'    per-batch ratio sparse_targets / sft':<44}{b['ratio']:>14.3f}{'<= 1.10':>12}  {'yes' if b['passes'] else 'NO'}")
    if "online_over_sft" in b:
        print(f"{'    ratio online_posterior / sft':<44}{b['online_over_sft']:>14.3f}")
    print(f"{'(c) bytes/token (shards)':<44}{c['shard_bytes_per_token']:>14.1f}")
    print(f"{'    bytes/token (dir incl. manifest)':<44}{c['dir_bytes_per_token']:>14.1f}"
          f"{'<= %d' % bound:>12}  {'yes' if c['passes'] else 'NO'}")
    out = write_json(args.out, result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
