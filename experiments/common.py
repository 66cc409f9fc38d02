"""What the experiments share: where results go, seeding, and the tuning / validation split of a lab's teacher
records. Experiments are scripts (`python experiments/<name>.py`: this folder is then first on sys.path) that import
this module and the library's public names, never each other."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"  # summaries and plots, kept in git
RAW = RESULTS / "raw"  # raw per-sample dumps behind the summaries: large, not in git (.gitignore)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_records(path: Path, val_frac: float, seed: int, out_dir: Path) -> tuple[Path, Path, int, int]:
    """Split teacher_train.jsonl by prompt into tune / val files (seeded): (tune path, val path, tuning prompts,
    validation prompts)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    recs = [json.loads(ln) for ln in lines]
    prompts = sorted({r["prompt"] for r in recs})
    rng = np.random.default_rng([seed, 17])
    val = set(rng.choice(len(prompts), size=max(2, int(round(val_frac * len(prompts)))), replace=False).tolist())
    val_prompts = {prompts[i] for i in val}
    out_dir.mkdir(parents=True, exist_ok=True)
    tune_p, val_p = out_dir / "tune.jsonl", out_dir / "val.jsonl"
    tune_p.write_text("".join(ln + "\n" for ln, r in zip(lines, recs) if r["prompt"] not in val_prompts))
    val_p.write_text("".join(ln + "\n" for ln, r in zip(lines, recs) if r["prompt"] in val_prompts))
    return tune_p, val_p, len(prompts) - len(val_prompts), len(val_prompts)
