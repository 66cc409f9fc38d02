"""What identifies a teacher record (its prompt + response, or messages), independent of keys, log-probabilities and
tokenizers: a fingerprint of a record sequence, and a digest per record. Jobs write them beside their outputs so a
later job can check it is given the same records (cross-fitted calibration, leave-one-out); and `convert_records`,
JSONL <-> the columnar Parquet of records at scale (`bayeskd convert-records`)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


def _record_bytes(rec: dict[str, Any]) -> bytes:
    """What identifies a record, canonically: its chat messages, or its prompt and response (not keys, logprobs)."""
    content = ["messages", rec["messages"]] if "messages" in rec else ["prompt", rec.get("prompt", ""), rec["response"]]
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def records_fingerprint(records: Iterable[dict[str, Any]]) -> str:
    """sha256 (hex) over the records' prompt + response (or messages), in order: the same record set gives the same
    value in every process and Python version (unlike `hash()`), whatever the tokenizer."""
    h = hashlib.sha256()
    for rec in records:  # canonical JSON escapes newlines, so one newline per record separates them unambiguously
        h.update(_record_bytes(rec) + b"\n")
    return h.hexdigest()


def record_digests(records: Iterable[dict[str, Any]]) -> np.ndarray:
    """One uint64 per record (8 bytes of its sha256): which records a job used, so a later one can check that its
    records are among them, in any order (`records_fingerprint` checks the exact sequence)."""
    return np.array([int.from_bytes(hashlib.sha256(_record_bytes(r)).digest()[:8], "little") for r in records],
                    dtype=np.uint64)


def convert_records(src: str | os.PathLike, dst: str | os.PathLike, split: str = "train", skip_bad: bool = False,
                    float32: bool | None = None) -> dict[str, Any]:
    """Convert teacher records between JSONL (`.jsonl`, `.ndjson`, `.json`: one record per line, logprobs inline)
    and bayeskd's columnar Parquet (`.parquet`, `.pq`: `bayeskd.record_parquet`), by `dst`'s extension; `src` is
    anything `load_teacher_records` reads. Records are checked as every stage checks them (`skip_bad`: malformed
    ones are left out and counted) and copied as read, so JSONL -> Parquet -> JSONL gives equal records as parsed
    dicts. `float32`: see `write_parquet_records` (None: float32 only where that is exact). Returns a summary."""
    from bayeskd.data import JSONL_SUFFIXES, PARQUET_SUFFIXES, iter_teacher_records
    from bayeskd.integrity import atomic_path
    from bayeskd.record_checks import logprob_entries

    suffix = Path(dst).suffix.lower()
    if suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise ValueError(f"{dst}: unknown output type '{suffix}' (expected .jsonl, .ndjson, .json, .parquet or .pq)")
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError(f"{dst}: the output is the input")
    reports = []

    def records() -> Iterator[dict[str, Any]]:  # streamed, never all in memory (1 M tokens with top-20 is GBs)
        it, report = iter_teacher_records(src, split=split, skip_bad=skip_bad, as_read=True)
        reports.append(report)
        return it

    with atomic_path(dst) as tmp:
        if suffix in PARQUET_SUFFIXES:
            from bayeskd.record_parquet import write_parquet_records

            write_parquet_records(records, tmp, float32=float32)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in records():
                    f.write(json.dumps(rec, ensure_ascii=False, default=logprob_entries) + "\n")
    report = reports[-1]  # (of the pass that wrote the file)
    return {"input": str(src), "output": str(dst), "format": "parquet" if suffix in PARQUET_SUFFIXES else "jsonl",
            "records": report.kept, "skipped": report.skipped, "reasons": report.reasons,
            "input_bytes": os.path.getsize(src) if os.path.isfile(src) else None, "output_bytes": os.path.getsize(dst)}
