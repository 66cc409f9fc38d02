"""Sampling a teacher into teacher records ({"prompt", "response"} JSONL), whatever the teacher is."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from bayeskd.integrity import atomic_write_bytes
from bayeskd.teachers.base import Teacher


def sample_records(teacher: Teacher, prompts: Sequence[str | dict], max_new_tokens: int = 64,
                   temperature: float = 1.0, seed: int = 0, batch_size: int = 16) -> tuple[list[dict], int]:
    """({"prompt", "response"} records, number of empty responses skipped): one sampled response per prompt.

    Prompts may be strings or records with a "prompt" key. Batch `b` is sampled with seed `seed + b`, so the
    output depends on (prompts, seed, batch_size). Empty (whitespace-only) responses are skipped and counted.
    """
    texts = [p["prompt"] if isinstance(p, dict) else str(p) for p in prompts]
    records: list[dict] = []
    empty = 0
    for b, start in enumerate(range(0, len(texts), batch_size)):
        chunk = texts[start:start + batch_size]
        for prompt, response in zip(chunk, teacher.generate(chunk, max_new_tokens, temperature, seed + b)):
            response = response.strip()
            if not response:
                empty += 1
                continue
            records.append({"prompt": prompt, "response": response})
    return records, empty


def sample_teacher_jsonl(teacher: Teacher, prompts: Sequence[str | dict], out_path: str | os.PathLike,
                         max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                         batch_size: int = 16) -> dict[str, int]:
    """`sample_records` written as {"prompt", "response"} JSONL atomically. Returns {"written", "empty"}."""
    records, empty = sample_records(teacher, prompts, max_new_tokens, temperature, seed, batch_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    return {"written": len(records), "empty": empty}
