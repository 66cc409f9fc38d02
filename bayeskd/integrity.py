"""Damaged outputs and full disks: one error type for a damaged file, checksum records, careful readers, and the
one-line message a job ends with when its writes fail for lack of space.

A directory whose files a later job trusts (a saved prior, a trainer checkpoint, a GAD stage, an align-proxy stage)
gets a checksum record (`checksums.json`: size and sha256 of each file, plus a sha256 of the record itself) written
after its files. Readers compare before loading, so a flipped byte, a truncated or a deleted file is named with
what is wrong instead of surfacing as a traceback from safetensors, numpy or torch — or not at all.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

RECORD = "checksums.json"
_FORMAT = "bayeskd.checksums"


class CorruptOutputError(ValueError):
    """A file an output directory should hold is missing, truncated, damaged or unreadable."""

    def __init__(self, path: str | os.PathLike, problem: str, hint: str = ""):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


class MissingOutputError(CorruptOutputError, FileNotFoundError):
    """A file an output directory should hold is gone (both error types, so either kind of handler names it)."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON: a record's checksum of itself (a flipped digit still parses)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    return {"bytes": p.stat().st_size, "sha256": file_sha256(p)}


def file_problem(path: str | os.PathLike, entry: dict[str, Any], *, checksum: bool = True) -> str | None:
    """What is wrong with `path` against its recorded entry ({"bytes", "sha256"}), or None when it is intact."""
    p = Path(path)
    if not p.is_file():
        return "missing (deleted?)"
    size = p.stat().st_size
    if entry.get("bytes") is not None and size != int(entry["bytes"]):
        return f"size is {size} bytes, {entry['bytes']} when written (truncated or damaged)"
    if checksum and entry.get("sha256") is not None and file_sha256(p) != entry["sha256"]:
        return "checksum mismatch (sha256 differs from when it was written: damaged)"
    return None


def _listed(directory: Path, record: str) -> list[str]:
    skip = {record}
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name not in skip and not p.name.endswith((".tmp", ".lock"))
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def write_checksums(directory: str | os.PathLike, names: list[str] | None = None, record: str = RECORD) -> dict:
    """Record size and sha256 of `names` (default: every file below `directory`) in `directory/record`; write it
    after the files, so a directory cut short has no record and is not trusted."""
    d = Path(directory)
    files = {n: file_entry(d / n) for n in (names if names is not None else _listed(d, record))}
    obj = {"format": _FORMAT, "files": files, "self_sha256": json_sha256(files)}
    atomic_write_json(d / record, obj)
    return obj


def read_checksums(directory: str | os.PathLike, record: str = RECORD, hint: str = "") -> dict[str, Any]:
    """The files recorded in `directory/record`; CorruptOutputError when the record is missing or damaged."""
    path = Path(directory) / record
    obj = read_json(path, hint=hint)
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT or not isinstance(obj.get("files"), dict):
        raise CorruptOutputError(path, "not a checksum record (damaged)", hint)
    if obj.get("self_sha256") != json_sha256(obj["files"]):
        raise CorruptOutputError(path, "checksum mismatch (the record's own sha256 differs: damaged)", hint)
    return obj["files"]


def verify_checksums(directory: str | os.PathLike, record: str = RECORD, hint: str = "") -> dict[str, Any]:
    """Raise CorruptOutputError naming the first file of `directory` that is missing, resized or changed since
    its record was written (the record itself included); returns the record's files."""
    d = Path(directory)
    files = read_checksums(d, record, hint)
    for name, entry in sorted(files.items()):
        problem = file_problem(d / name, entry)
        if problem is not None:
            raise (MissingOutputError if problem.startswith("missing") else CorruptOutputError)(d / name, problem, hint)
    return files


def checksum_findings(directory: str | os.PathLike, record: str = RECORD) -> list[tuple[Path, str | None]]:
    """(path, problem or None) for the record and every file it lists: what `bayeskd verify` reports."""
    d = Path(directory)
    try:
        files = read_checksums(d, record)
    except CorruptOutputError as e:
        return [(e.path, e.problem)]
    return [(d / record, None)] + [(d / n, file_problem(d / n, e)) for n, e in sorted(files.items())]


# ---------------------------------------------------------------------------------------------------- readers

def read_json(path: str | os.PathLike, hint: str = "") -> Any:
    """JSON from `path`, or CorruptOutputError naming it (missing, unreadable, not UTF-8, not JSON)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
        return json.loads(text)
    except FileNotFoundError:
        raise MissingOutputError(p, "missing (deleted?)", hint) from None
    except UnicodeDecodeError as e:
        raise CorruptOutputError(p, f"not valid UTF-8 at byte {e.start} (damaged)", hint) from None
    except json.JSONDecodeError as e:
        raise CorruptOutputError(p, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): truncated "
                                 "or damaged", hint) from None


def load_npy(path: str | os.PathLike, hint: str = "") -> np.ndarray:
    """A .npy array, or CorruptOutputError naming the file (numpy's own errors say neither file nor cause)."""
    p = Path(path)
    if not p.is_file():
        raise MissingOutputError(p, "missing (deleted?)", hint)
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorruptOutputError(p, f"not a readable .npy array ({e}): truncated or damaged", hint) from None


def load_safetensors_bytes(data: bytes, path: str | os.PathLike, hint: str = "") -> dict[str, Any]:
    """Tensors (and the "__metadata__" dict under that key) of a safetensors file already read into `data`."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own error type, and torch/json theirs: all mean damaged
        raise CorruptOutputError(path, f"not a readable safetensors file ({type(e).__name__}: {e})"[:300]
                                 + ": truncated or damaged", hint) from None
    return {**tensors, "__metadata__": meta}


# ---------------------------------------------------------------------------------------------------- disk full

_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
# libraries that write through their own I/O lose the errno; these are their words for the same failure
_FULL_TEXT = ("no space left on device", "file too large", "disk quota exceeded", "os error 28", "os error 27",
              "storagefull", "filetoolarge", "unexpected pos", "file write failed", "iostream error")


def disk_full_cause(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain that says a write failed for lack of space (ENOSPC, EFBIG, EDQUOT, or a
    library's wording of it); None when it is something else."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return e
        if not isinstance(e, OSError) and any(t in str(e).lower() for t in _FULL_TEXT):
            return e
        e = e.__cause__ or e.__context__
    return None


def disk_full_message(exc: BaseException, where: str | os.PathLike | None = None) -> str | None:
    """The one-line message a job ends with when `exc` is a failed write for lack of space; None otherwise."""
    cause = disk_full_cause(exc)
    if cause is None:
        return None
    path = getattr(cause, "filename", None) or where or "the output"
    what = ("file size limit exceeded" if isinstance(cause, OSError) and cause.errno == errno.EFBIG
            else "no space left on device")
    return (f"{what} while writing {path}; nothing partial was published. Free space and rerun the same command "
            "to resume")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` for a library to write to; renamed to `path` when the block ends, removed
    when it fails (so a full disk publishes no partial file)."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same directory, then rename: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, Any], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@contextmanager
def staged_dir(final: str | os.PathLike, name: str = ".saving", main: bool = True) -> Iterator[Path]:
    """A hidden folder inside `final` to save into; on success its files move into `final` (each by rename), on
    failure it is removed, so a failed save (e.g. a full disk) publishes no partial file. `main`: this process
    moves and cleans (the others of a distributed job only write into it)."""
    final = Path(final)
    tmp = final / name
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                dst = final / p.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, dst)
        shutil.rmtree(tmp, ignore_errors=True)


def warn_damaged(path: str | os.PathLike, problem: str, action: str) -> None:
    warnings.warn(f"{path}: {problem}; {action}", stacklevel=3)
