"""The lab run's training records file, the one file every stage reads: run/teacher_train.jsonl as sampled, or its
columnar copy run/teacher_train.parquet (`records_format`), and the cuts of it the scale curve uses."""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

from bayeskd.data import PARQUET_SUFFIXES

TRAIN_FILES = {"jsonl": "teacher_train.jsonl", "parquet": "teacher_train.parquet"}  # records_format -> file


def train_records(run: Path, cfg) -> Path:
    """The training records of the lab run in `run`, the one file every stage reads: run/teacher_train.jsonl as
    sampled, or with `cfg.records_format` "parquet" its columnar copy run/teacher_train.parquet (`to_parquet`)."""
    return Path(run) / TRAIN_FILES[cfg.records_format]


def to_parquet(jsonl: Path, parquet: Path) -> dict[str, Any] | None:
    """Convert the sampled records `jsonl` to `parquet` with `bayeskd.records.convert_records` (every record checked
    as the stages check it; float32 log-probabilities stay float32: lossless), unless an earlier run did: the file
    is written under a temporary name and renamed, so one that exists is whole. Returns the converter's summary,
    None when reused. The JSONL stays: it is the sampled original (re-creatable only by sampling again, hours at
    1M tokens), what a resumed run finds and reuses, and 1.5 GB of disk at 1M tokens costs less than that."""
    from bayeskd.records import convert_records

    if parquet.exists():
        return None
    return convert_records(jsonl, parquet)


def count_records(path: Path) -> int:
    """Records in a training records file: JSONL lines, or Parquet rows (from the footer, nothing else read)."""
    if Path(path).suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        return pq.ParquetFile(str(path)).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def head_records(src: Path, dst: Path, n: int) -> None:
    """The first `n` records of `src` into `dst` (same format, written atomically): JSONL lines as they are, Parquet
    rows with the file's schema and metadata (`bayeskd.record_parquet.write_parquet_head`)."""
    from bayeskd.integrity import atomic_path

    with atomic_path(dst) as tmp:
        if Path(src).suffix.lower() in PARQUET_SUFFIXES:
            from bayeskd.record_parquet import write_parquet_head

            write_parquet_head(src, tmp, n)
            return
        with open(src, "rb") as f, open(tmp, "wb") as out:
            for i, line in enumerate(f):
                if i >= n:
                    break
                out.write(line)


def head_teacher_records(path: Path, n: int) -> list[dict[str, Any]]:
    """The first `n` records of a records file, checked as `load_teacher_records` checks them, the rest not read:
    what a stage needs from the raw records (the scored ones' log-probabilities) without parsing all of them."""
    from bayeskd.data import iter_teacher_records

    records, _ = iter_teacher_records(str(path))
    try:
        return list(islice(records, n))
    finally:
        records.close()
