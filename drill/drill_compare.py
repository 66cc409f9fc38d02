"""Comparing a job's output tree with a reference run's (drill/drill.py and the fault drills).

Each kind of file is compared as exactly as it allows: SparseDist shards and manifests byte for byte; model files
and torch pickles as exactly equal tensors (no tolerance: jobs run single-threaded on CPU, so reruns compute the
same floats); JSON after dropping the keys in `IGNORED` (and a job's own invocation fields); JSONL as records by key
(order may differ when a resumed run appends the rest later); any other file byte for byte. Temporaries and
locks are listed apart (none may be left); so are logs (`*.log`: what each invocation printed, appended on resume,
with timings), which are never compared.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

# JSON keys left out of every comparison, with why (reported in drill.json). Anything else must be equal.
IGNORED = {
    r"(seconds|per_second|_per_1k_tokens|_runtime|timestamp|elapsed|started)$|^time$":
        "wall-clock durations and rates (seconds, train_seconds, count_seconds, *_per_second, seconds_per_1k_tokens, "
        "HF's train_runtime)",
    r"^logging_dir$": "HF TrainingArguments' log folder, named after the start time",
    r"^(state|self)_sha256$": "a record's checksum of itself; the record holds timings (its loader checks it)",
}
TIME_KEY = re.compile("|".join(f"(?:{k})" for k in IGNORED))
# Names our atomic writes and checkpoints use while writing (sparse.atomic_write_*: .NAME.*.tmp; gad: .saving-N;
# align-proxy: .sft.tmp, .round_i.tmp, .final.tmp, .NAME.old) and the output locks (.bayeskd.lock, FILE.lock).
TEMP_NAME = re.compile(r"(\.tmp$|^\.tmp|^\.saving-|^\..+\.old$|\.lock$)")
LOG_NAME = re.compile(r"\.log$")  # e.g. the lab's run.log: listed, not compared (see the module docstring)
SHARD_OR_MANIFEST = re.compile(r"^(shard-\d+\.safetensors|manifest\.json)$")  # SparseDist outputs: byte-identical


def temporaries(root: Path) -> list[str]:
    """Paths under `root` (and the lock beside a file output) named like a temporary or a lock."""
    found = [p for p in root.rglob("*") if TEMP_NAME.search(p.name)] if root.exists() else []
    return sorted(str(p.relative_to(root)) for p in found)


def _strip(obj: Any, ignore: set[str], seen: set[str]) -> Any:
    if isinstance(obj, dict):
        keep = {}
        for k, v in obj.items():
            if TIME_KEY.search(k) or k in ignore:
                seen.add(k)
            else:
                keep[k] = _strip(v, ignore, seen)
        return keep
    if isinstance(obj, list):
        return [_strip(v, ignore, seen) for v in obj]
    return obj


def _json_diff(a: Any, b: Any, at: str = "") -> list[str]:
    """The paths (a.b[2].c) where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _json_diff(a.get(k), b.get(k), f"{at}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _json_diff(x, y, f"{at}[{i}]")]
    return [] if a == b else [at or "."]


def _tensors_equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def _compare_file(a: Path, b: Path, ignore: set[str], seen: set[str]) -> tuple[str, str | None, int]:
    """(how it was compared, why it differs or None, records of `a` missing from `b`)."""
    if a.read_bytes() == b.read_bytes():
        return "bytes", None, 0
    if SHARD_OR_MANIFEST.search(a.name):
        return "bytes", "shard/manifest not byte-identical", 0
    suffix = a.suffix
    if suffix == ".json":
        ja, jb = (json.loads(p.read_text()) for p in (a, b))
        if a.name == "checksums.json" and ja.get("format") == "bayeskd.checksums":
            # checksums of files that differ by their timings differ too: check them against their own tree
            ok = ja["files"].keys() == jb["files"].keys() and all(
                hashlib.sha256((b.parent / f).read_bytes()).hexdigest() == e["sha256"] for f, e in jb["files"].items())
            return "checksums (against own files)", None if ok else "checksums.json does not match its files", 0
        diff = _json_diff(*(_strip(j, ignore, seen) for j in (ja, jb)))
        return "json", f"JSON differs at {', '.join(diff[:5])}" if diff else None, 0
    if suffix == ".jsonl":
        # records by key (or whole) as multisets: order may differ when a resumed run appends the rest later
        def recs(p: Path) -> dict[str, list[str]]:
            by: dict[str, list[str]] = {}
            for line in p.read_text().splitlines():
                r = _strip(json.loads(line), ignore, seen)
                text = json.dumps(r, sort_keys=True)
                by.setdefault(str(r["key"]) if isinstance(r, dict) and "key" in r else text, []).append(text)
            return by
        ra, rb = recs(a), recs(b)
        lost = sum(1 for k in ra if k not in rb)
        if ra == rb:
            return "records (by key, order ignored)", None, 0
        dup = sum(len(v) - 1 for v in rb.values())
        return "records", f"records differ: {lost} missing, {len(set(rb) - set(ra))} extra, {dup} duplicated", lost
    if suffix == ".safetensors":
        # shards must match byte for byte; a model file only as tensors (same names, dtypes, values)
        from safetensors.torch import load_file
        same = _tensors_equal(load_file(str(a)), load_file(str(b)))
        return "tensors", None if same else "tensors differ", 0
    if suffix in (".pt", ".bin"):
        import torch
        ta, tb = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
        if hasattr(ta, "to_dict") and hasattr(tb, "to_dict"):  # TrainingArguments (training_args.bin)
            ta, tb = (_strip(json.loads(json.dumps(t.to_dict(), default=str)), ignore, seen) for t in (ta, tb))
        return "torch.load", None if _tensors_equal(ta, tb) else "tensors/values differ", 0
    return "bytes", "bytes differ", 0


def compare_outputs(ref: Path, out: Path, ignore: set[str] = frozenset()) -> dict[str, Any]:
    """Compare the output tree `out` with the reference tree `ref`: the same files, each equal as its kind allows
    (manifests, shards and other files byte for byte; JSON and JSONL after dropping time-like and `ignore`d keys;
    model files and torch pickles as exactly equal tensors); temporaries and locks listed apart."""
    seen: set[str] = set()
    fa, fb = ({str(p.relative_to(r)) for p in r.rglob("*") if p.is_file() and not TEMP_NAME.search(p.name)
               and not LOG_NAME.search(p.name)} for r in (ref, out))
    mism, how, lost = {}, {}, 0
    for rel in sorted(fa & fb):
        kind, why, n = _compare_file(ref / rel, out / rel, set(ignore), seen)
        how[kind] = how.get(kind, 0) + 1
        lost += n
        if why:
            mism[rel] = why
    missing, extra = sorted(fa - fb), sorted(fb - fa)
    temps = temporaries(out)
    return {"identical": not mism and not missing and not extra, "files_compared": len(fa & fb),
            "compared_as": how, "mismatches": mism, "missing": missing, "extra": extra,
            "temporaries_left": temps, "data_lost": lost + len(missing), "ignored_fields_seen": sorted(seen),
            "logs_not_compared": sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                        if p.is_file() and LOG_NAME.search(p.name))}


def published_ok(root: Path) -> list[str]:
    """Files under `root` a reader would take as finished that do not read back (a half-written publish)."""
    from safetensors import safe_open

    bad = []
    for p in [p for p in root.rglob("*") if p.is_file() and not TEMP_NAME.search(p.name)] if root.exists() else []:
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                [json.loads(line) for line in p.read_text().splitlines()]
            elif p.suffix == ".safetensors":
                with safe_open(str(p), "pt") as f:
                    [f.get_tensor(k) for k in f.keys()]
        except Exception as e:  # noqa: BLE001 - any failure to read back is the finding
            bad.append(f"{p.relative_to(root)}: {type(e).__name__}: {e}"[:300])
    return bad
