"""One writer per output (issue 15 item 4): a live holder refuses a second job, a dead one's lock is taken over."""
import json
import os
import socket
import subprocess
import sys

import pytest

from bayeskd.locks import LOCK_NAME, OutputLockedError, locks_output, output_lock


def _write_lock(d, pid, host=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "job": "estimate_prior"}))


def test_a_live_holder_refuses_a_second_job(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(tmp_path / "out", holder.pid)
        with pytest.raises(OutputLockedError, match=f"being written by estimate_prior \\(pid {holder.pid} on "):
            with output_lock(tmp_path / "out", "distill"):
                pass
        assert (tmp_path / "out" / LOCK_NAME).exists()  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_warning_and_released(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(tmp_path / "out", gone.pid)
    with pytest.warns(UserWarning, match=f"taking over the lock of estimate_prior \\(pid {gone.pid}\\)"):
        with output_lock(tmp_path / "out", "distill") as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    # a lock on another host cannot be checked: refused, with the way out named
    _write_lock(tmp_path / "out", gone.pid, host="elsewhere")
    with pytest.raises(OutputLockedError, match="remove"):
        with output_lock(tmp_path / "out", "distill"):
            pass


def test_the_decorated_job_holds_its_output_and_leaves_nothing(tmp_path):
    seen = []

    @locks_output()
    def job(data, out):
        seen.append((tmp_path / "o" / LOCK_NAME).exists())
        with pytest.raises(OutputLockedError, match="this process already writes it"):
            job(data, out)  # the same output twice at once, even from one process
        return "done"

    assert job("x", str(tmp_path / "o")) == "done" and seen == [True]
    assert not (tmp_path / "o").exists()  # made only for the lock, left empty: removed

    @locks_output(file=True)
    def gen(prompts, out):
        seen.append(os.path.exists(out + ".lock"))
        with open(out, "w") as f:
            f.write("{}\n")

    gen("p", str(tmp_path / "t.jsonl"))
    assert seen[-1] and not (tmp_path / "t.jsonl.lock").exists() and (tmp_path / "t.jsonl").exists()
    os.environ["RANK"] = "1"  # torchrun's other ranks are the same job: they do not lock
    try:
        _write_lock(tmp_path / "r", os.getpid() + 1)
        with output_lock(tmp_path / "r", "distill"):
            pass
    finally:
        del os.environ["RANK"]
