"""One writer per output: a job holds a lock on its output directory (or file) while it writes.

The lock is a file created atomically (`O_CREAT | O_EXCL`) holding the holder's pid, host and job. A second job
on the same output is refused with the holder named; a lock left by a process that is gone (same host, pid not
alive) is taken over with a warning, so a killed job never blocks its own resume. Under torchrun only rank 0
locks: the other ranks are the same job.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

LOCK_NAME = ".bayeskd.lock"


class OutputLockedError(RuntimeError):
    """Another live job holds the output."""


def _lock_path(out: str | os.PathLike, file: bool) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".lock") if file else p / LOCK_NAME  # beside a file output, inside a directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def output_lock(out: str | os.PathLike, job: str, file: bool = False) -> Iterator[Path]:
    """Hold the lock of `out` (a directory, or with `file` a file) for the duration of the block."""
    path = _lock_path(out, file)
    if int(os.environ.get("RANK", "0")) != 0:
        yield path
        return
    made = not path.parent.exists()  # made only for the lock: removed again if the job leaves it empty
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "job": job, "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if pid == me["pid"] and host == me["host"]:
                raise OutputLockedError(f"{out}: this process already writes it ({holder.get('job')})") from None
            if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                warnings.warn(f"{out}: taking over the lock of {holder.get('job')} (pid {pid}), which is gone",
                              stacklevel=3)
                path.unlink(missing_ok=True)
                continue
            raise OutputLockedError(
                f"{out} is being written by {holder.get('job', 'another job')} (pid {pid} on {host}); wait for it "
                f"to finish or stop it, or write elsewhere (if that process is gone on another host, remove "
                f"{path})") from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except BaseException:  # e.g. a full disk: an empty lock would block every later run as "another job"
            path.unlink(missing_ok=True)
            raise
        break
    try:
        yield path
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
            if made and not any(path.parent.iterdir()):
                path.parent.rmdir()
        except (OSError, json.JSONDecodeError):
            pass


def locks_output(param: str = "out", file: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a job function: it runs holding the lock of its `param` argument (its output directory, or with
    `file` its output file)."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            out = sig.bind_partial(*args, **kwargs).arguments.get(param)
            if out is None:
                return fn(*args, **kwargs)
            with output_lock(out, fn.__name__, file):
                return fn(*args, **kwargs)
        return run
    return wrap
