"""Issue 15 item 3: a job whose writes fail for lack of space (a small tmpfs in a private mount namespace, else
RLIMIT_FSIZE with SIGXFSZ ignored: both real kernel write failures, never a mock) stops with a one-line message
saying how to resume, publishes no temporary or partial file, releases its lock, and once space is freed the same
command resumes to outputs equal to an undisturbed run. Never skipped: if neither way works here, the test fails.
"""
import errno
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "drill"))  # the fault drill's harness (drill/)
from drill_faults import can_unshare, disk_full_drill  # noqa: E402

from bayeskd.integrity import disk_full_message  # noqa: E402
from conftest import save_tiny_llama  # noqa: E402

WORDS = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]
MODE = "tmpfs" if can_unshare() else "rlimit"


def _data(path: Path, n: int, seed: int) -> str:
    print(f"records seed {seed}")
    r = np.random.default_rng(seed)
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: what does it return?",
                                        "response": " ".join(r.choice(WORDS, size=int(r.integers(4, 12))))}) + "\n"
                            for i in range(n)))
    return str(path)


def _check(result: dict) -> None:
    assert result["failed"], result
    assert result["clear_message"], result["message"]
    assert not result["leftovers"], result["leftovers"]
    assert result["resumed"], result["resume_message"]
    assert result["differs"] == [], result["differs"]


def test_disk_full_message_names_errno_and_library_wordings():
    assert "no space left on device while writing /x/y" in disk_full_message(OSError(errno.ENOSPC, "full", "/x/y"))
    assert "file size limit exceeded" in disk_full_message(OSError(errno.EFBIG, "too large", "/x/y"))
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "rerun the same command" in disk_full_message(wrapped, "out/")
    assert disk_full_message(ValueError("bad record")) is None
    assert disk_full_message(OSError(errno.EACCES, "denied")) is None


@pytest.mark.e2e  # a real job starved of space, then resumed and compared with an undisturbed run
@pytest.mark.parametrize("mode", sorted({MODE, "rlimit"}))
def test_estimate_prior_on_a_full_disk(tmp_path, tiny_tokenizer_dir, mode):
    data = _data(tmp_path / "teacher.jsonl", 300, seed=1)

    def argv(out: Path) -> list[str]:
        return ["estimate-prior", "--data", data, "--tokenizer", tiny_tokenizer_dir, "--order", "3",
                "--top-k", "32", "--write-topk", "--out", str(out)]

    _check(disk_full_drill(argv, tmp_path / "drill", mode=mode, seed=1))


@pytest.mark.e2e
def test_distill_on_a_full_disk(tmp_path, tiny_tokenizer):
    data = _data(tmp_path / "teacher.jsonl", 8, seed=2)
    student = save_tiny_llama(tmp_path / "student", tiny_tokenizer, seed=0)

    def argv(out: Path) -> list[str]:
        return ["distill", "--data", data, "--student", student, "--out", str(out), "--max-steps", "2",
                "--per-device-train-batch-size", "4", "--seed", "0"]

    # room for the tokenizer and configs, not for the weights: the failure is in the final save
    _check(disk_full_drill(argv, tmp_path / "drill", mode=MODE, seed=2))
