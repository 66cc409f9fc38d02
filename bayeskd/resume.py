"""Resumable outputs: an output directory records the settings it was made with, so that a rerun with the same
settings resumes it and one with other settings is refused with an error naming every difference.

Used by align-proxy (out/align_config.json), GAD (the config inside each stage's state.json) and the lab run
(run/run.json, run/train.json). Settings are compared as they read back from JSON, and a key missing on one side
counts as None.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from bayeskd.core.sparse import CacheMismatchError
from bayeskd.integrity import atomic_write_json

# training arguments that do not change what is trained (how often to log or save, where, whether to resume or
# show progress): left out of the settings a resumed run must match
RUN_ONLY_ARGS = ("output_dir", "logging_steps", "save_steps", "save_strategy", "resume_from_checkpoint",
                  "logging_dir", "report_to", "disable_tqdm")


def as_json(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` as they read back from a JSON file (tuples as lists, other non-JSON values as their str)."""
    return json.loads(json.dumps(settings, default=str))


def settings_diff(have: Mapping[str, Any], want: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The sorted keys whose values differ between `have` and `want`, the keys in `ignore` left out."""
    have, want, skip = as_json(have), as_json(want), set(ignore)
    return sorted(k for k in set(have) | set(want) if k not in skip and have.get(k) != want.get(k))


def check_settings(have: Mapping[str, Any], want: Mapping[str, Any], *, where: str | Path, what: str, hint: str,
                   error_cls: type[Exception] = CacheMismatchError, ignore: Iterable[str] = ()) -> None:
    """Raise `error_cls` when `have` (the settings `where` was made with by `what`) and `want` differ outside
    `ignore`; the message names each differing key with both values, then `hint` (what to do instead)."""
    diff = settings_diff(have, want, ignore)
    if diff:
        have, want = as_json(have), as_json(want)
        detail = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff)
        raise error_cls(f"{where}: made by {what} with other settings ({detail}); {hint}")


def read_stamp(path: str | Path) -> dict[str, Any] | None:
    """The settings recorded in the JSON file `path`; None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a flipped byte can make it invalid UTF-8 too
        raise ValueError(f"{path}: not valid JSON ({e}); remove {path.parent} to start over") from e


def check_stamp(path: str | Path, settings: Mapping[str, Any], *, what: str, hint: str,
                error_cls: type[Exception] = CacheMismatchError, force: bool = False) -> bool:
    """Guard the output directory `path.parent` with the stamp file `path` (JSON) recording its `settings`.

    No stamp yet: create the directory, write the stamp (atomically) and return False (a fresh start). A stamp with
    the same settings: return True (resume). Other settings: raise `error_cls` naming the differences
    (`check_settings`); with `force`, remove the whole directory instead, start it again with the new stamp and
    return False.
    """
    path, settings = Path(path), as_json(settings)
    have = read_stamp(path)
    if have is not None:
        if not (force and settings_diff(have, settings)):
            check_settings(have, settings, where=path.parent, what=what, hint=hint, error_cls=error_cls)
            return True
        shutil.rmtree(path.parent)  # forced: what was made with the other settings cannot be reused
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)
    return False
