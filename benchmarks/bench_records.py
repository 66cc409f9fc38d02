"""Teacher records at scale: bytes on disk and read time of N teacher tokens with top-20 log-probabilities, as
JSONL (logprobs inline) and as bayeskd's columnar Parquet (`bayeskd convert-records`).

    .venv/bin/python benchmarks/bench_records.py [--tokens 1000000] [--top 20] [--workdir /tmp/bench_records]

Records are synthetic but shaped like `generate --top-logprobs 20` output of a same-tokenizer teacher: prompts
and responses are spans of the embedded corpus tokenized by the lab's BPE (vocab 1,024), every response token
carries its bytes, a float32 log-probability and 20 alternatives drawn from the vocabulary, plus the fields
generate writes (key, settings, usage, teacher_tokenizer). Read time = `load_teacher_records` +
`tokenize_records`, what estimate-prior does first (best of `--reps`). Writes benchmarks/results/records_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from bayeskd import load_teacher_records, load_tokenizer, tokenize_records, tokenizer_fingerprint
from bayeskd.corpus import embedded_corpus, train_bpe_tokenizer
from bayeskd.records import convert_records
from common import RESULTS, command, write_json

SETTINGS = {"backend": "hf", "endpoint": "completions", "max_tokens": 256, "n": 1, "seed": 0, "stop": None,
            "system": None, "temperature": 1.0, "top_logprobs": 20, "top_p": 1.0}


def synthesize(path: Path, tokenizer, n_tokens: int, top: int, seed: int = 0) -> dict:
    """Write JSONL records holding `n_tokens` response tokens with `top` alternatives each."""
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    piece = [tokenizer.decode([i]) for i in range(vocab)]
    piece_bytes = [p.encode("utf-8") for p in piece]
    fp = tokenizer_fingerprint(tokenizer)
    docs = embedded_corpus()
    doc_ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    doc_ids = [ids for ids in doc_ids if len(ids) >= 40]
    written = records = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_tokens:
            ids = doc_ids[records % len(doc_ids)]
            cut = int(rng.integers(8, 24))
            resp = [i for i in ids[cut:cut + min(256, n_tokens - written)] if "\ufffd" not in piece[i]]
            if not resp:
                records += 1
                continue
            logits = rng.normal(0, 3, size=(len(resp), vocab)).astype(np.float32)
            logits[np.arange(len(resp)), resp] += 6  # the sampled token is likely
            lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
                - logits.max(1, keepdims=True)
            lp = lp.astype(np.float32)
            topk = np.argsort(-lp, axis=1)[:, :top]
            entries = []
            for p, t in enumerate(resp):
                entries.append({"token": piece[t], "bytes": list(piece_bytes[t]), "logprob": float(lp[p, t]),
                                "top_logprobs": [{"token": piece[a], "bytes": list(piece_bytes[a]),
                                                  "logprob": float(lp[p, a])} for a in topk[p].tolist()]})
            rec = {"key": f"{records:08x}/0", "prompt": tokenizer.decode(ids[:cut]),
                   "response": "".join(piece[t] for t in resp), "finish_reason": "length", "model": "lab-teacher",
                   "prompt_index": records, "sample_index": 0, "settings": SETTINGS,
                   "usage": {"prompt_tokens": cut, "completion_tokens": len(resp)}, "teacher_tokenizer": fp,
                   "logprobs": entries}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            written += len(resp)
            records += 1
    return {"records": records, "tokens": written}


def read_time(path: Path, tokenizer, reps: int) -> dict:
    best, out = None, {}
    for _ in range(reps):
        t0 = time.perf_counter()
        records, _ = load_teacher_records(str(path))
        t1 = time.perf_counter()
        data = tokenize_records(records, tokenizer)
        t2 = time.perf_counter()
        if best is None or t2 - t0 < best:
            best = t2 - t0
            out = {"load_s": round(t1 - t0, 3), "tokenize_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
                   "teacher_token_records": data.report.teacher_tokens,
                   "response_tokens": data.report.response_tokens}
        del records, data
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="Where the files go (default: a temporary folder).")
    ap.add_argument("--out", default=str(RESULTS / "records_cpu.json"))
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_records."))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_bpe_tokenizer(embedded_corpus(), vocab_size=1024, out_dir=tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    jsonl, parquet = work / "records.jsonl", work / "records.parquet"
    t = time.perf_counter()
    made = synthesize(jsonl, tokenizer, args.tokens, args.top)
    synth_s = time.perf_counter() - t
    t = time.perf_counter()
    convert_records(jsonl, parquet)
    convert_s = time.perf_counter() - t
    rows = {}
    for name, path in (("jsonl", jsonl), ("parquet", parquet)):
        rows[name] = {"bytes": os.path.getsize(path), "mb": round(os.path.getsize(path) / 1e6, 1),
                      **read_time(path, tokenizer, args.reps)}
        print(name, rows[name], flush=True)
    result = {
        "command": command(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
        " (shared with other jobs: times are indicative)", "tokens": made["tokens"], "records": made["records"],
        "top_logprobs": args.top, "vocab_size": len(tokenizer), "synthesize_s": round(synth_s, 1),
        "convert_s": round(convert_s, 1), "formats": rows,
        "bytes_ratio": round(rows["jsonl"]["bytes"] / rows["parquet"]["bytes"], 1),
        "read_speedup": round(rows["jsonl"]["total_s"] / rows["parquet"]["total_s"], 1),
        "targets": {"parquet_bytes_le_150MB_per_1M_tokens":
                    rows["parquet"]["bytes"] * 1e6 / made["tokens"] <= 150e6,
                    "parquet_read_le_5s_per_1M_tokens": rows["parquet"]["total_s"] * 1e6 / made["tokens"] <= 5.0}}
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
