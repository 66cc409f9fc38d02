"""What identifies a teacher record (its prompt + response, or messages), independent of keys, log-probabilities and
tokenizers: a fingerprint of a record sequence, and a digest per record. Jobs write them beside their outputs so a
later job can check it is given the same records (cross-fitted calibration, leave-one-out)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

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
