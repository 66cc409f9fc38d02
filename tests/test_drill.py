"""The kill/restart drill (drill/drill.py) in the small configuration CI affords: every long job killed once
(SIGKILL to its process group at a seeded random moment) and restarted to the end; SIGTERM and a concurrent
second run on a few jobs. Outputs must equal an undisturbed run's, nothing may be left behind or lost.
The seed is printed; replay with DRILL_SEED=<seed>."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_drill():
    spec = importlib.util.spec_from_file_location("drill", ROOT / "drill" / "drill.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["drill"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


drill = _load_drill()


def test_compare_outputs_tells_differences(tmp_path):
    """The comparison itself can fail: a changed shard byte, a changed weight, a lost record and a leftover
    temporary are each reported; time-like summary fields are not."""
    import torch
    from safetensors.torch import save_file

    ref, out = tmp_path / "ref", tmp_path / "out"
    for d in (ref, out):
        d.mkdir()
        save_file({"w": torch.ones(3)}, str(d / "model.safetensors"))
        (d / "summary.json").write_text('{"records": 2, "seconds": %d}' % (d == ref))
        (d / "teacher.jsonl").write_text('{"key": "a/0", "x": 1}\n{"key": "b/0", "x": 2}\n')
        (d / "shard-00000.safetensors").write_bytes(b"same")
    assert drill.compare_outputs(ref, out)["identical"]
    save_file({"w": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}, str(out / "model.safetensors"))
    (out / "shard-00000.safetensors").write_bytes(b"diff")
    (out / "teacher.jsonl").write_text('{"key": "b/0", "x": 2}\n')
    (out / ".summary.json.abc.tmp").write_text("")
    r = drill.compare_outputs(ref, out)
    assert not r["identical"]
    assert set(r["mismatches"]) == {"model.safetensors", "shard-00000.safetensors", "teacher.jsonl"}
    assert r["data_lost"] == 1 and r["temporaries_left"] == [".summary.json.abc.tmp"]
    assert "seconds" in r["ignored_fields_seen"]


def test_sigterm_inside_a_finalizer_still_stops_the_job():
    """A SIGTERM whose handler runs inside a __del__ (an exception raised there is printed and dropped) is
    delivered again a moment later, so the job still stops with the resume hint (the drill saw a lab run go on)."""
    import signal
    import time

    from bayeskd import cli

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside __del__
            sum(range(1000))

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        with cli._stop_cleanly():
            Finalized()  # dropped at once: its __del__ runs
            for _ in range(100):  # the job going on; the signal must stop it within this
                time.sleep(0.02)
    assert stop.value.code == 130
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


@pytest.mark.drill
@pytest.mark.e2e  # minutes: every long job run, killed and resumed
def test_drill_small(tmp_path):
    seed = int(os.environ.get("DRILL_SEED", 15))  # fixed (the benchmark's); DRILL_SEED=N draws other moments
    print(f"drill seed {seed} (replay: DRILL_SEED={seed})")
    report = drill.run_drill(tmp_path / "work", kills=1, sigterm=["estimate-posterior", "gad"],
                             concurrent=["align-proxy"], seed=seed, corrupt=["estimate-posterior"],
                             disk_full=["gad"], bad_input=["align-proxy"])
    print(drill.table(report))
    assert set(report["jobs"]) == set(drill.job_registry(tmp_path))
    for name, r in report["jobs"].items():
        where = f"{name} (seed {seed})"
        assert r["survived"], where
        assert r["outputs_identical"], (where, {k: r[k].get("mismatches") for k in ("kills", "sigterm", "concurrent")
                                                if k in r})
        assert r["temporaries_left"] == [], where
        assert r["data_lost"] == 0, where
        st = r.get("sigterm")
        if st is not None and st["tested"]:
            assert st["stopped"] and st["exit"] != 0 and st["message_ok"], (where, st)
            assert st["lock_released"] and not st["temporaries_after_stop"], (where, st)
            assert not st["unreadable_published"], (where, st)
        cc = r.get("concurrent")
        if cc is not None:
            assert cc["tested"], (where, cc)
            assert cc["refused"] and cc["names_holder"] and cc["one_line_error"], (where, cc)
            assert cc["first_exit"] == 0, (where, cc)
    co = report["jobs"]["estimate-posterior"]["corruption"]
    assert co["cases"] >= 6 and not co["failed"], co  # shards, manifest, summary x flip, truncate, delete
    df = report["jobs"]["gad"]["disk_full"]
    assert df["ok"] and "rerun the same command" in df["message"], df
    bi = report["jobs"]["align-proxy"]["bad_input"]
    assert bi["tested"] and bi["handled"] == bi["cases"] >= 5, bi
    # at least one SIGTERM really landed mid-run (the moments are drawn within the first 60% of the work)
    assert any(r["sigterm"]["tested"] for r in report["jobs"].values() if "sigterm" in r)
