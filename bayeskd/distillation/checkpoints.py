"""Hugging Face Trainer checkpoints (`checkpoint-N/`) that are checked before a run resumes from them.

`ChecksumCallback` writes a checksum record (`bayeskd.integrity`: size and sha256 of every file) into each
checkpoint right after the Trainer saved it; `latest_intact_checkpoint` picks the newest checkpoint whose files
all match their record.

A damaged latest checkpoint (a flipped byte, a truncated or deleted file, or no record: a save cut short) is NOT
an error: the run falls back to the previous intact checkpoint (or the start) with a warning naming the damaged
file. Training from a checkpoint is deterministic (seeded data order, restored RNG states), so the result is the
one an undisturbed run gives; only the steps since that checkpoint are repeated.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from transformers import TrainerCallback

from bayeskd.integrity import (RECORD, CorruptOutputError, MissingOutputError, file_entry, file_problem, json_sha256,
                               read_json, verify_checksums, write_checksums)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class ChecksumCallback(TrainerCallback):
    """After each save, record the checkpoint's files (on the main process, which writes the checkpoint)."""

    def on_step_end(self, args, state, control, **kwargs):
        # No checkpoint at the last step: the final model is saved anyway, and the Trainer resumed from a checkpoint
        # at max_steps trains one step more (the drill saw checkpoint-31 of a 30-step run).
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_checksums(folder)
        return control


def remove_unrecorded(out: str | os.PathLike, before: list[Path]) -> None:
    """Remove the checkpoints a failed run (e.g. a full disk) began and never recorded: not in `before`, no record."""
    import shutil

    for folder in checkpoints(out):
        if folder not in before and not (folder / RECORD).exists():
            shutil.rmtree(folder, ignore_errors=True)


def checkpoints(out: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `out`, newest (largest N) first."""
    d = Path(out)
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))] \
        if d.is_dir() else []
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_problem(folder: str | os.PathLike) -> CorruptOutputError | None:
    """What is wrong with a checkpoint (the first damaged, resized or missing file, or a missing record)."""
    try:
        verify_checksums(folder)
    except CorruptOutputError as e:
        if e.path.name == RECORD and e.problem.startswith("missing"):
            return CorruptOutputError(e.path, "missing: no checksum record, the save was cut short (or made "
                                      "before records existed)")
        return e
    return None


def latest_intact_checkpoint(out: str | os.PathLike) -> str | None:
    """The newest intact checkpoint of `out` to resume from, None when there is none (train from the start).
    Each damaged newer one is named in a warning, then skipped (see the module docstring for why)."""
    for folder in checkpoints(out):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        warnings.warn(f"checkpoint {folder} is damaged ({problem}); resuming from the previous intact checkpoint "
                      "instead (or from the start if there is none)", stacklevel=2)
    return None


def resume_point(asked: str | bool | None, out: str | os.PathLike) -> str | None:
    """The checkpoint a run resumes from. `asked` (TrainingArguments.resume_from_checkpoint): None/False: none;
    True or "latest": the newest intact one in `out` (damaged ones skipped with a warning); a path: that
    checkpoint, and an error naming its damaged file if it is not intact (it was asked for by name)."""
    if asked in (None, False, "", "no", "false"):
        return None
    if asked is True or str(asked).lower() in ("latest", "true", "auto"):
        return latest_intact_checkpoint(out)
    problem = checkpoint_problem(asked)
    if problem is not None:
        raise CorruptOutputError(problem.path, problem.problem, "the checkpoint asked for is damaged; pass "
                                 "resume_from_checkpoint='latest' to resume from the newest intact one")
    return str(asked)


# ---------------------------------------------------------------------------------------------------- GAD stages
# A GAD stage keeps one checkpoint (state.json beside the models), so there is nothing older to fall back to: a
# damaged one is an error naming the file (remove the stage folder to redo the stage).

def with_file_record(folder: str | os.PathLike, state: dict) -> dict:
    """`state` plus the size and sha256 of every file below `folder` and a sha256 of itself (a flipped digit in
    state.json still parses)."""
    d = Path(folder)
    files = {str(p.relative_to(d)): file_entry(p) for p in sorted(d.rglob("*")) if p.is_file()}
    body = {**state, "files": files}
    return {**body, "state_sha256": json_sha256(body)}


def verify_file_record(folder: str | os.PathLike, state: dict, state_name: str) -> None:
    """Raise CorruptOutputError naming the damaged state file or the first damaged, resized or missing file of
    the checkpoint in `folder` (states written before records existed carry none and are trusted)."""
    d = Path(folder)
    hint = f"the GAD checkpoint in {d} is damaged; remove {d} to redo this stage"
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    if "state_sha256" in state and state["state_sha256"] != json_sha256(body):
        raise CorruptOutputError(d / state_name, "checksum mismatch (its content differs from its recorded sha256: "
                                 "damaged)", hint)
    for name, entry in sorted(state.get("files", {}).items()):
        problem = file_problem(d / name, entry)
        if problem is not None:
            raise (MissingOutputError if problem.startswith("missing") else CorruptOutputError)(d / name, problem,
                                                                                              hint)


# ---------------------------------------------------------------------------------------------------- align-proxy
# Its stages (sft/, round_i/) are finished models a rerun skips: a damaged one is an error naming the file (remove
# the stage to redo it); final/ is a copy of the last stage, so a damaged final/ is rebuilt with a warning.

def record_stage(folder: str | os.PathLike) -> None:
    """Record every file of a finished stage folder before it is published."""
    write_checksums(folder)


def read_stage(stage: str | os.PathLike) -> dict:
    """A finished stage's summary.json, after checking its files against their record (stages published before
    records existed carry none and are trusted)."""
    stage = Path(stage)
    hint = f"the align-proxy stage {stage} is damaged; remove {stage} and rerun to redo it"
    if (stage / RECORD).exists():
        verify_checksums(stage, hint=hint)
    return read_json(stage / "summary.json", hint=hint)


def final_is_current(final: str | os.PathLike, stage_name: str) -> bool:
    """Whether final/ is an intact copy of `stage_name`; a damaged one is named in a warning (it is rebuilt)."""
    final = Path(final)
    try:
        if (final / RECORD).exists():
            verify_checksums(final)
        return read_json(final / "source.json").get("stage") == stage_name
    except CorruptOutputError as e:
        if (final / "source.json").exists() or (final / RECORD).exists():
            warnings.warn(f"{e}; rebuilding {final} from {stage_name}", stacklevel=2)
        return False
