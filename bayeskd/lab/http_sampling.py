"""Sampling a lab teacher the way a user samples an API teacher: `serve-teacher` on loopback, `generate` over HTTP."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

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
