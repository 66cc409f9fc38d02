"""bayeskd.resume: an output directory's settings stamp resumes the same settings and refuses others."""
import json

import pytest

from bayeskd.resume import check_settings, check_stamp, read_stamp, settings_diff
from bayeskd.core.sparse import CacheMismatchError


class OtherError(RuntimeError):
    pass


def test_stamp_resumes_the_same_settings_and_refuses_others(tmp_path):
    out = tmp_path / "out"
    stamp = out / "config.json"
    settings = {"beta": 0.1, "ks": (1, 2), "data": "x.jsonl"}
    assert check_stamp(stamp, settings, what="a job", hint="use another --out") is False  # fresh: written
    assert json.loads(stamp.read_text()) == {"beta": 0.1, "ks": [1, 2], "data": "x.jsonl"}
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # written atomically: no temporary file left
    written = stamp.read_bytes()

    assert check_stamp(stamp, dict(settings), what="a job", hint="use another --out") is True  # same: resume
    with pytest.raises(CacheMismatchError, match=r"beta: 0\.1 there, 0\.2 now; seed: None there, 3 now\); use "):
        check_stamp(stamp, {**settings, "beta": 0.2, "seed": 3}, what="a job", hint="use another --out")
    with pytest.raises(OtherError, match=f"{out}: made by a job with other settings"):
        check_stamp(stamp, {**settings, "beta": 0.2}, what="a job", hint="-", error_cls=OtherError)
    assert stamp.read_bytes() == written  # a refused rerun leaves the stamp as it was
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_forced_stamp_starts_the_directory_again(tmp_path):
    out = tmp_path / "out"
    check_stamp(out / "run.json", {"top_k": 16}, what="a lab run", hint="-")
    (out / "made_with_16.txt").write_text("old")
    assert check_stamp(out / "run.json", {"top_k": 16}, what="a lab run", hint="-", force=True) is True
    assert (out / "made_with_16.txt").exists()  # same settings: force changes nothing
    assert check_stamp(out / "run.json", {"top_k": 8}, what="a lab run", hint="-", force=True) is False
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    assert read_stamp(out / "run.json") == {"top_k": 8}


def test_diff_ignores_keys_and_counts_a_missing_key_as_none(tmp_path):
    assert settings_diff({"a": 1, "b": None}, {"a": 1}) == []
    assert settings_diff({"a": 1, "steps": 2}, {"a": 2, "steps": 3}, ignore=("steps",)) == ["a"]
    check_settings({"steps": 2}, {"steps": 3}, where="d", what="w", hint="h", ignore=("steps",))
    assert read_stamp(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_stamp(tmp_path / "bad.json")
