"""`bayeskd verify DIR`: check any output directory and say what is intact.

Every file is checked by what it is: shard directories against their manifest (each shard present, its sha256 as
written), safetensors files (a readable header, every tensor readable: a truncated or damaged file fails), JSON
files (they parse), a prior (it loads), `counted_records.npy` (it loads). Lock files and temporaries are reported
as such. Nothing is modified.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bayeskd.locks import LOCK_NAME
from bayeskd.sparse import MANIFEST, file_sha256


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
        manifest = json.loads((d / MANIFEST).read_text())
        shards = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Finding(str(d / MANIFEST), "shard manifest", False, f"unreadable ({e})")]
    seen.add(d / MANIFEST)
    out.append(Finding(str(d / MANIFEST), "shard manifest", True, f"{len(shards)} shards"))
    for name, info in sorted(shards.items()):
        p = d / name
        seen.add(p)
        if not p.exists():
            out.append(Finding(str(p), "shard", False, "missing (listed in the manifest)"))
        elif file_sha256(p) != info.get("sha256"):
            out.append(Finding(str(p), "shard", False, f"checksum mismatch ({p.stat().st_size} bytes): damaged"))
        else:
            out.append(Finding(str(p), "shard", True, f"{info.get('rows')} rows, sha256 as written"))
    return out


def verify_dir(root: str | os.PathLike) -> list[Finding]:
    """A finding per file under `root` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    findings: list[Finding] = []
    seen: set[Path] = set()
    for m in sorted(root.rglob(MANIFEST)):
        findings += _shard_dir(m.parent, seen)
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
