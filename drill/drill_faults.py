"""Fault drills (corruption and disk full), importable by drill/drill.py for its table.

- `corruption_drill(argv, out)`: after a job finished in `out`, damage one file of each kind in a copy (flip a byte,
  truncate, delete), run `bayeskd verify` on it and rerun the job on it; each case is an error naming the file, or
  a recovery whose outputs equal the undamaged ones — never a traceback, never a silently different output.
- `disk_full_drill(argv_builder, work, limit_bytes)`: run the job with too little space (a small tmpfs in a private
  mount namespace via `unshare -rm`; else RLIMIT_FSIZE with SIGXFSZ ignored: both are real kernel write failures),
  check the one-line message, that no temporary or partial file is published and the lock is released, then free
  the space, rerun and compare with an undisturbed reference run.

`argv` is what follows `bayeskd` on the command line (a leading `bayeskd` or python executable is accepted too).
Every random choice comes from `seed`, which is printed.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

HOWS = ("flip", "truncate", "delete")
PROBLEM_WORDS = re.compile(r"checksum|size|truncated|missing|damaged|not valid|unreadable|deleted", re.I)
TEMP = re.compile(r"(^\.saving|\.tmp$|^\.tmp|\.tmp/|/\.saving)")


def _cmd(argv: Sequence[str]) -> list[str]:
    argv = [str(a) for a in argv]
    if argv and (Path(argv[0]).name in ("bayeskd", "python", "python3") or argv[0] == sys.executable):
        return argv
    return [sys.executable, "-m", "bayeskd.cli", *argv]


def _run(argv: Sequence[str], timeout: float, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(argv), capture_output=True, text=True, timeout=timeout, preexec_fn=preexec,
                          env={**os.environ, "PYTHONWARNINGS": "default"})


def _last_line(p: subprocess.CompletedProcess) -> str:
    text = p.stderr + "\n" + p.stdout
    errors = re.findall(r"Error: [^\r\n]*", text)  # also after a progress bar the error interrupted mid-line
    lines = [ln for ln in text.splitlines() if ln.strip() and "%|" not in ln]
    return (errors or lines or [""])[-1]


def damage(path: Path, how: str, rng: np.random.Generator) -> None:
    """Flip one byte (XOR 0xFF at a random position), cut the file in half, or delete it."""
    if how == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[int(rng.integers(len(data)))] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


def file_kind(rel: Path) -> str | None:
    """The kind of output a file is (None: not an output a reader trusts, e.g. a lock or a log)."""
    parts, name = rel.parts, rel.name
    if name.endswith((".lock", ".tmp")) or name.startswith("."):
        return None
    if any(re.match(r"^checkpoint-\d+$", p) for p in parts):
        return "trainer checkpoint"
    if name == "manifest.json":
        return "manifest"
    if name == "state.json" or name == "optimizers.pt":
        return "GAD checkpoint"
    if "prior" in parts[:-1]:
        return "counted prior"
    if name == "counted_records.npy":
        return "counted records"
    if name.endswith("summary.json"):
        return "summary"
    if name.startswith("shard-") and name.endswith(".safetensors"):
        return "shard"
    if name.endswith(".safetensors"):
        return "model weights"
    return None


def _outputs_equal(a: Path, b: Path) -> list[str]:
    """Relative paths of shards, manifests and weights that differ between two outputs (or exist in one only)."""
    def wanted(root: Path) -> dict[str, Path]:
        return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and
                (p.suffix == ".safetensors" or p.name == "manifest.json") and
                not any(q.startswith(("checkpoint-", ".")) for q in p.relative_to(root).parts)}
    wa, wb = wanted(a), wanted(b)
    return sorted(k for k in set(wa) | set(wb)
                  if k not in wa or k not in wb or wa[k].read_bytes() != wb[k].read_bytes())


def corruption_drill(argv: Sequence[str], out: Path, *, seed: int = 0, hows: Sequence[str] = HOWS,
                     kinds: Sequence[str] | None = None, timeout: float = 600, log: Callable[[str], None] = print
                     ) -> list[dict[str, Any]]:
    """For each kind of file in the finished output `out` (one file per kind, chosen by `seed`) and each damage:
    damage a copy, run `bayeskd verify` on it, rerun the job (argv with `out` replaced by the copy), classify.
    outcome: "named" (error naming the file and its problem), "recovered" (rerun succeeded, outputs equal the
    undamaged ones, verify clean), or a failure: "traceback", "unclear error", "silently different"."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    log(f"corruption drill on {out}: seed {seed}")
    root = out.parent if out.is_file() else out
    by_kind: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and (k := file_kind(p.relative_to(root))) and (kinds is None or k in kinds):
            by_kind.setdefault(k, []).append(p.relative_to(root))
    results = []
    for kind, files in sorted(by_kind.items()):
        rel = files[int(rng.integers(len(files)))]
        for how in hows:
            work = root.parent / f".drill-{root.name}-{kind.replace(' ', '_')}-{how}"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(root, work, symlinks=True)
            damage(work / rel, how, rng)
            ver = _run(["verify", str(work)], timeout)
            flagged = ver.returncode == 1 and any(rel.name in ln and ln.startswith("BAD")
                                                   for ln in ver.stdout.splitlines())
            new_argv = [str(a).replace(str(root), str(work)) for a in argv]
            p = _run(new_argv, timeout)
            msg = _last_line(p)
            if "Traceback" in p.stderr:
                outcome = "traceback"
            elif p.returncode != 0:
                outcome = "named" if rel.name in msg and PROBLEM_WORDS.search(msg) else "unclear error"
            else:
                diff = _outputs_equal(root, work)
                ver = _run(["verify", str(work)], timeout)
                # clean, or the one damaged file the job did not need (an older checkpoint) is still reported
                clean = ver.returncode == 0 or (flagged and sum(ln.startswith("BAD") for ln in ver.stdout.splitlines())
                                                 == sum(rel.name in ln and ln.startswith("BAD")
                                                        for ln in ver.stdout.splitlines()))
                outcome = "recovered" if not diff and clean else "silently different"
                msg = msg if outcome == "recovered" else f"differs: {diff[:3]}, verify clean: {clean}"
            results.append({"kind": kind, "file": str(rel), "how": how, "seed": seed, "verify_flagged": flagged,
                            "rerun_rc": p.returncode, "outcome": outcome, "message": msg[:300]})
            log(f"  {kind:18s} {how:8s} {str(rel):40s} -> {outcome} (verify flagged: {flagged}) {msg[:120]}")
            shutil.rmtree(work, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------------------------------- disk full

def can_unshare() -> bool:
    """Whether a private mount namespace with a tmpfs can be made here (CI machines may refuse)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def _limit_fsize(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _leftovers(root: Path) -> list[str]:
    """Temporaries, locks and unreadable (partial) files a failed job left published below `root`."""
    from bayeskd.verify import verify_dir

    if not root.exists():
        return []
    bad = [str(p.relative_to(root)) for p in root.rglob("*") if TEMP.search(str(p.relative_to(root)))
           or p.name.endswith(".lock")]
    bad += [f"{os.path.relpath(f.path, root)} ({f.detail})" for f in verify_dir(root)
            if not f.ok and f.kind not in ("temporary", "lock")]
    return sorted(set(bad))


def disk_full_drill(argv_builder: Callable[[Path], Sequence[str]], work: Path, limit_bytes: int | None = None, *,
                    mode: str = "auto", seed: int = 0, timeout: float = 600, reference: Path | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the job built by `argv_builder(out)` with `limit_bytes` of space (default: half of what the reference
    run wrote; with RLIMIT_FSIZE: half of its largest file), then with space again; compare with a reference.
    mode: "tmpfs", "rlimit" or "auto" (tmpfs when unshare works). Raises RuntimeError when neither works."""
    from bayeskd.core.sparse import dir_bytes

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    log(f"disk-full drill in {work}: seed {seed}, mode {mode}")
    if reference is None:
        reference = work / "reference"
        shutil.rmtree(reference, ignore_errors=True)
        ref = _run(argv_builder(reference), timeout)
        if ref.returncode != 0:
            raise RuntimeError(f"the reference run failed: {_last_line(ref)}")
    if mode == "auto":
        mode = "tmpfs" if can_unshare() else "rlimit"
    sizes = [p.stat().st_size for p in Path(reference).rglob("*") if p.is_file()]
    if limit_bytes is None:
        limit_bytes = dir_bytes(reference) // 2 if mode == "tmpfs" else max(sizes) // 2
    result: dict[str, Any] = {"mode": mode, "limit_bytes": int(limit_bytes), "seed": seed}
    if mode == "tmpfs":
        mnt, keep = work / "mnt", work / "after"
        for d in (mnt, keep):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        out = mnt / "out"
        cmd = shlex.join(_cmd(argv_builder(out)))
        # one namespace for fail, inspect, free and rerun: the tmpfs disappears with it
        script = (f"mount -t tmpfs -o size={max(4096, int(limit_bytes))} tmpfs {mnt} || exit 99; "
                  f"{cmd} >{work}/fail.out 2>{work}/fail.err; echo $? >{work}/fail.rc; "
                  f"cp -a {mnt}/. {keep}/ 2>/dev/null; "
                  f"mount -o remount,size=4g {mnt}; {cmd} >{work}/again.out 2>{work}/again.err; "
                  f"echo $? >{work}/again.rc; rm -rf {work}/final; cp -a {out} {work}/final")
        ns = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                            timeout=3 * timeout)
        if ns.returncode == 99:
            raise RuntimeError(f"cannot mount a tmpfs: {ns.stderr.strip()}")
        read = lambda n: (work / n).read_text() if (work / n).exists() else ""  # noqa: E731
        fail = subprocess.CompletedProcess([], int(read("fail.rc") or -1), read("fail.out"), read("fail.err"))
        again = subprocess.CompletedProcess([], int(read("again.rc") or -1), read("again.out"), read("again.err"))
        failed_out, final = keep / "out", work / "final"
    else:
        failed_out = final = work / "out"
        shutil.rmtree(final, ignore_errors=True)
        fail = _run(argv_builder(final), timeout, preexec=_limit_fsize(int(limit_bytes)))
        leftovers = _leftovers(failed_out)
        again = _run(argv_builder(final), timeout)
    msg = _last_line(fail)
    result.update(
        failed=fail.returncode != 0, message=msg,
        clear_message=bool(re.search(r"(no space left on device|file size limit exceeded) while writing .*rerun the "
                                     r"same command", msg)) and "Traceback" not in fail.stderr,
        leftovers=_leftovers(failed_out) if mode == "tmpfs" else leftovers,
        resumed=again.returncode == 0, resume_message=_last_line(again) if again.returncode else "",
        differs=_outputs_equal(Path(reference), final) if again.returncode == 0 else None)
    result["ok"] = bool(result["failed"] and result["clear_message"] and not result["leftovers"]
                        and result["resumed"] and not result["differs"])
    log(json.dumps(result, indent=1))
    return result
