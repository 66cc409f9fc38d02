"""`bayeskd verify DIR`: check any output directory and say what is intact.

Every file is checked by what it is: shard directories against their manifest (each shard present, its sha256 as
written), safetensors files (a readable header, every tensor readable: a truncated or damaged file fails), JSON
files (they parse), a prior (it loads), `counted_records.npy` (it loads). Folders with a checksum record
(`checksums.json`: priors, trainer `checkpoint-N` folders, align-proxy stages, an estimate-prior output) have every
file checked against it (present, size, sha256); a `checkpoint-N` without one is reported as incomplete; a GAD
stage's state.json is checked with the files it records. Lock files and temporaries are reported as such. Nothing
is modified.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bayeskd.locks import LOCK_NAME
from bayeskd.integrity import RECORD, CorruptOutputError, checksum_findings, file_problem
from bayeskd.core.sparse import MANIFEST, read_manifest

_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


@dataclass
class Finding:
    path: str
    kind: str
    ok: bool
    detail: str = ""


def _safetensors(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            f.get_tensor(key)
    return ""


def _shard_dir(d: Path, seen: set[Path]) -> list[Finding]:
    out = []
    try:
        manifest = read_manifest(d)  # its own sha256 too: a flipped digit that still parses is caught
        shards = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Finding(str(d / MANIFEST), "shard manifest", False, f"unreadable ({e})")]
    seen.add(d / MANIFEST)
    out.append(Finding(str(d / MANIFEST), "shard manifest", True, f"{len(shards)} shards"))
    for name, info in sorted(shards.items()):
        p = d / name
        seen.add(p)
        problem = file_problem(p, info) if p.exists() else "missing"
        if problem == "missing":
            out.append(Finding(str(p), "shard", False, "missing (listed in the manifest)"))
        elif problem is not None:
            out.append(Finding(str(p), "shard", False, problem.replace("checksum mismatch", "checksum mismatch "
                                                                       f"({p.stat().st_size} bytes)")))
        else:
            out.append(Finding(str(p), "shard", True, f"{info.get('rows')} rows, sha256 as written"))
    return out


def _kind(folder: Path) -> str:
    return "checkpoint" if _CHECKPOINT.match(folder.name) else "prior" if (folder / "config.json").exists() and \
        "_prior" in (folder / "config.json").read_text(errors="replace") else "recorded"


def _recorded(folder: Path, seen: set[Path]) -> list[Finding]:
    """Every file of a folder with a checksum record (a prior, a trainer checkpoint, an align-proxy stage, an
    estimate-prior output) against its record."""
    kind = _kind(folder)
    found = checksum_findings(folder)
    seen.update(p for p, _ in found)
    return [Finding(str(p), kind, problem is None, problem or ("record intact" if p.name == RECORD else
                                                               "size and sha256 as written")) for p, problem in found]


def _gad_state(path: Path, seen: set[Path]) -> list[Finding]:
    """A GAD stage: state.json records its checkpoint's files (and a sha256 of itself)."""
    from bayeskd.distillation.checkpoints import verify_file_record

    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:
        return []  # reported as unreadable JSON below
    if not isinstance(state, dict) or "files" not in state:
        return []
    seen.add(path)
    seen.update(path.parent / n for n in state["files"])
    try:
        verify_file_record(path.parent, state, path.name)
    except CorruptOutputError as e:
        return [Finding(str(e.path), "GAD checkpoint", False, e.problem)]
    return [Finding(str(path.parent), "GAD checkpoint", True, f"step {state.get('step')}, "
                    f"{len(state['files'])} files as written")]


def verify_dir(root: str | os.PathLike) -> list[Finding]:
    """A finding per file under `root` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    findings: list[Finding] = []
    seen: set[Path] = set()
    for m in sorted(root.rglob(MANIFEST)):
        findings += _shard_dir(m.parent, seen)
    for rec in sorted(root.rglob(RECORD)):
        findings += _recorded(rec.parent, seen)
    for state in sorted(root.rglob("state.json")):
        findings += _gad_state(state, seen)
    for ckpt in sorted(p for p in root.rglob("checkpoint-*") if p.is_dir() and _CHECKPOINT.match(p.name)):
        if not (ckpt / RECORD).exists():  # a save cut short (or made before records): resume skips it
            findings.append(Finding(str(ckpt / RECORD), "checkpoint", False, "missing: no checksum record, the "
                                    "checkpoint is incomplete or unverifiable; a resume falls back to the previous "
                                    "intact checkpoint"))
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p in seen:
            continue
        if p.name == LOCK_NAME or p.name.endswith(".lock"):
            findings.append(Finding(str(p), "lock", True, "a job holds (or held) this output"))
        elif p.name.startswith(".tmp") or p.suffix == ".tmp":
            findings.append(Finding(str(p), "temporary", False, "left by an interrupted write"))
        elif p.suffix in (".safetensors", ".json", ".npy"):
            kind = {".safetensors": "safetensors", ".json": "json", ".npy": "array"}[p.suffix]
            try:
                if kind == "safetensors":
                    _safetensors(p)
                elif kind == "json":
                    json.loads(p.read_text())
                else:
                    np.load(p)
                findings.append(Finding(str(p), kind, True))
            except Exception as e:  # every reader's failure is the finding, whatever its type
                findings.append(Finding(str(p), kind, False, f"unreadable: {type(e).__name__}: {e}"[:200]))
    for cfg in sorted(root.rglob("config.json")):  # saved priors load as a whole
        try:
            fmt = json.loads(cfg.read_text()).get("format", "")
        except ValueError:
            continue
        if isinstance(fmt, str) and fmt.endswith("_prior"):
            from bayeskd.priors.base import load_prior
            try:
                load_prior(cfg.parent)
                findings.append(Finding(str(cfg.parent), "prior", True, fmt))
            except Exception as e:
                findings.append(Finding(str(cfg.parent), "prior", False, f"does not load: {e}"[:200]))
    return findings


def format_findings(findings: list[Finding], root: str | os.PathLike) -> str:
    bad = [f for f in findings if not f.ok]
    lines = [f"{'ok ' if f.ok else 'BAD'} {f.kind:15s} {os.path.relpath(f.path, root)}  {f.detail}".rstrip()
             for f in findings]
    lines.append(f"{len(findings) - len(bad)} intact, {len(bad)} damaged or missing")
    return "\n".join(lines)
