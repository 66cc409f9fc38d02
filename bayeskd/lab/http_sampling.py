"""Sampling a lab teacher the way a user samples an API teacher: `serve-teacher` on loopback, `generate` over HTTP;
and the run's training records file that every stage reads (JSONL as sampled, or its Parquet copy)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from bayeskd.data import PARQUET_SUFFIXES
from bayeskd.lab.build import LabError
from bayeskd.integrity import atomic_write_bytes


def sample_teacher(teacher_dir: str, jobs: Sequence[tuple[Sequence[str], Path, int, int, int]], cfg,
                   progress: bool, name: str = "lab-teacher") -> list[dict[str, Any]]:
    """Sample the lab teacher as a user samples an API teacher: `serve-teacher` on loopback (a free port, stopped
    at the end, also on error) and `generate` over HTTP: text, and the top log-probabilities an API reveals. Per
    job (prompts, output, seed, samples per prompt, top log-probabilities): the teacher records, in prompt order.
    Finished outputs are reused; generate's own files (resumable) live in run/sampling/<name>/. The server batches
    up to `cfg.sample_max_batch` waiting samples, `cfg.sample_concurrency` requests in flight."""
    from bayeskd.teachers.generate import generate
    from bayeskd.teachers.server import running_server

    out: list[dict[str, Any] | None] = [None] * len(jobs)
    for i, (_, path, _, _, _) in enumerate(jobs):
        if path.exists():
            out[i] = {"written": sum(1 for _ in path.open()), "reused": 1}
    if all(o is not None for o in out):
        return out  # type: ignore[return-value]
    # the pipeline never sees its weights
    with running_server(teacher_dir, name=name, max_batch=cfg.sample_max_batch) as url:
        for i, (prompts, path, seed, samples, top_logprobs) in enumerate(jobs):
            if out[i] is not None:
                continue
            stage = path.parent / "sampling" / path.stem
            stage.mkdir(parents=True, exist_ok=True)
            unique = list(dict.fromkeys(prompts))  # one request per distinct prompt, `samples` answers each
            atomic_write_bytes(stage / "prompts.jsonl",
                               "".join(json.dumps({"prompt": p}) + "\n" for p in unique).encode())
            s = generate(str(stage / "prompts.jsonl"), str(stage / "records.jsonl"), model=name,
                         base_url=url, endpoint="completions", n=samples, temperature=cfg.temperature,
                         max_tokens=cfg.max_new_tokens, seed=seed, ordered=True, concurrency=cfg.sample_concurrency,
                         progress=progress,
                         top_logprobs=top_logprobs, keep_empty=cfg.keep_empty)
            if not s["complete"]:
                raise LabError(f"sampling the lab teacher failed for {s['requests_failed']} prompts "
                               f"(see {stage / 'records.failed.jsonl'}); rerun to resume")
            atomic_write_bytes(path, (stage / "records.jsonl").read_bytes())
            out[i] = {"written": s["records_total"], "empty": s["empty"], "empty_kept": s["empty_kept"],
                      "requests": s["requests"], "retries": s["retries"], "seconds": s["seconds"]}
    return out  # type: ignore[return-value]


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
