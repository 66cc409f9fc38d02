"""Issue 15 item 2: a flipped byte, a truncated file and a deleted file in each kind of output (target shards and
their manifest, a saved prior, estimate-prior's output, trainer checkpoints, GAD and align-proxy checkpoints,
summaries) are detected on the next read or resume with an error naming the file and what is wrong — or, where
the output can be rebuilt, a warning naming it and a correct recovery. Never a traceback from safetensors/numpy,
never a silently wrong result.

A flip XORs one byte with 0xFF at a seeded position (the seed is printed); "digit" changes one digit of a JSON
file by one, which still parses: only a recorded sha256 catches it.
"""
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bayeskd.cli import main
from bayeskd.integrity import CorruptOutputError, read_json
from bayeskd.priors.base import load_prior
from bayeskd.priors.ngram import NGramPrior
from bayeskd.core.sparse import ShardReader, ShardWriter, SparseDist
from bayeskd.verify import verify_dir
from conftest import save_tiny_llama

WORDS = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]
HOWS = ("flip", "truncate", "delete")
# what each damage must be called in the error
PROBLEM = {"flip": r"checksum mismatch|not valid UTF-8|not valid JSON|damaged", "truncate": r"size is|truncated",
           "delete": r"missing", "digit": r"checksum mismatch"}


def damage(path: Path, how: str, rng: np.random.Generator) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[int(rng.integers(len(data)))] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "digit":
        digits = [i for i, b in enumerate(data) if chr(b).isdigit()]
        i = digits[int(rng.integers(len(digits)))]
        data[i] = ord(str((int(chr(data[i])) + 1) % 10))
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(data))


def raises_named(path: Path, how: str):
    """pytest.raises for an error naming `path` (its folder and name) and the problem `how` causes."""
    return pytest.raises((CorruptOutputError, FileNotFoundError),
                         match=rf"{re.escape(path.parent.name)}/{re.escape(path.name)}.*({PROBLEM[how]})")


def _dist(rng, n=7, v=50, k=4) -> SparseDist:
    idx = torch.from_numpy(np.stack([rng.choice(v, k, replace=False) for _ in range(n)]).astype(np.int32))
    lp = torch.log(torch.full((n, k), 0.2))
    return SparseDist(idx, lp, torch.full((n,), 0.2), v)


def _records(n: int, seed: int = 0) -> list[dict]:
    r = np.random.default_rng(seed)
    return [{"prompt": f"Question {i}: what does it return?",
             "response": " ".join(r.choice(WORDS, size=int(r.integers(3, 9))))} for i in range(n)]


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_tokenizer_dir, tiny_tokenizer):
    """One run of each job whose output is damaged below (copied before each damage)."""
    from bayeskd.distillation.gad import gad
    from bayeskd.distillation.trainer import distill
    from bayeskd.priors.estimate import estimate_prior

    d = tmp_path_factory.mktemp("made")
    data = d / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(8)))
    student = save_tiny_llama(d / "student", tiny_tokenizer, seed=0)
    estimate_prior(str(data), tiny_tokenizer_dir, out=str(d / "prior"), order=2, top_k=8, write_topk=True)
    # 3 steps: checkpoints 1 and 2 (none at the last step)
    common = dict(max_steps=3, per_device_train_batch_size=4, save_strategy="steps", save_steps=1, seed=0,
                  logging_steps=1, learning_rate=1e-3)
    distill(str(data), student, str(d / "distill"), **common)
    gad(str(data), student, str(d / "gad"), steps=1, progress=False, group_size=2, batch_prompts=2,
        max_new_tokens=4, max_prompt_tokens=16, seed=0, save_every=1)
    return {"dir": d, "data": str(data), "student": student, "tok": tiny_tokenizer_dir, "common": common}


def _copy(made, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made["dir"] / name, tmp_path / name, symlinks=True))


# ---------------------------------------------------------------------------------------------------- shards

@pytest.mark.parametrize("how", HOWS)
def test_damaged_shard_is_named_on_read_and_rewritten_on_resume(tmp_path, rng, how):
    w = ShardWriter(tmp_path, 50, 4, "fp")
    first = _dist(rng)
    w.write("s0", first)
    w.write("s1", _dist(rng))
    shard = tmp_path / "s0.safetensors"
    damage(shard, how, rng)
    with raises_named(shard, how):
        ShardReader(tmp_path).read("s0.safetensors")
    ShardReader(tmp_path).read("s1.safetensors")  # the others still read
    with warnings.catch_warnings(record=True) as caught:  # a resume re-verifies the shards it would skip
        warnings.simplefilter("always")
        again = ShardWriter(tmp_path, 50, 4, "fp")
    assert not again.has_shard("s0") and again.has_shard("s1")
    if how != "delete":
        assert any("s0.safetensors" in str(c.message) and "written again" in str(c.message) for c in caught)
    again.write("s0", first)
    got, _ = ShardReader(tmp_path).read("s0.safetensors")
    assert torch.equal(got.indices, first.indices)


@pytest.mark.parametrize("how", HOWS + ("digit",))
def test_damaged_manifest_is_named(tmp_path, rng, how):
    w = ShardWriter(tmp_path, 50, 4, "fp")
    w.write("s0", _dist(rng))
    manifest = tmp_path / "manifest.json"
    damage(manifest, how, rng)
    with pytest.raises((CorruptOutputError, FileNotFoundError), match=rf"manifest.*({PROBLEM[how]})"):
        ShardReader(tmp_path)
    assert not [f for f in verify_dir(tmp_path) if f.ok and f.kind == "shard manifest"]


# ---------------------------------------------------------------------------------------------------- priors

@pytest.mark.parametrize("name", ["tables.safetensors", "config.json", "checksums.json"])
@pytest.mark.parametrize("how", HOWS)
def test_damaged_prior_is_named_on_load(tmp_path, rng, name, how):
    prior = NGramPrior(order=2, vocab_size=20).fit([rng.integers(0, 20, 40).tolist() for _ in range(5)])
    prior.save(tmp_path / "p")
    damage(tmp_path / "p" / name, how, rng)
    with raises_named(tmp_path / "p" / name, how):
        load_prior(tmp_path / "p")


def test_damaged_suffix_prior_is_named_on_load(tmp_path, rng):
    from bayeskd.priors.suffix import SuffixPrior

    seqs = [rng.integers(0, 20, 30).tolist() for _ in range(4)]
    prior = SuffixPrior(order=2, vocab_size=20).fit(seqs, [[1, 2]] * 4)
    prior.save(tmp_path / "s")
    intact = (tmp_path / "s" / "suffix.safetensors").read_bytes()
    damage(tmp_path / "s" / "suffix.safetensors", "flip", rng)
    with raises_named(tmp_path / "s" / "suffix.safetensors", "flip"):
        load_prior(tmp_path / "s")
    (tmp_path / "s" / "suffix.safetensors").write_bytes(intact)
    damage(tmp_path / "s" / "ngram" / "tables.safetensors", "truncate", rng)
    with raises_named(tmp_path / "s" / "ngram" / "tables.safetensors", "truncate"):
        SuffixPrior.load(tmp_path / "s")


@pytest.mark.parametrize("name", ["counted_records.npy", "summary.json", "prior_config.json",
                                  "prior/tables.safetensors", "topk/manifest.json"])
@pytest.mark.parametrize("how", HOWS)
def test_damaged_estimate_prior_output_is_named_by_the_next_job(made, tmp_path, rng, name, how):
    from bayeskd.posterior.estimate import estimate_posterior

    out = _copy(made, "prior", tmp_path)
    damage(out / name, how, rng)
    if name.startswith("topk/"):  # read by distill/estimate-posterior through ShardReader
        with pytest.raises((CorruptOutputError, FileNotFoundError), match=rf"manifest.*({PROBLEM[how]})"):
            ShardReader(out / "topk")
        return
    with raises_named(out / name, how):  # before the proxy is ever loaded
        estimate_posterior(prior_dir=str(out), proxy="never-loaded", out=str(tmp_path / "post"))
    res = CliRunner().invoke(main, ["estimate-posterior", "--prior", str(out), "--proxy", "never-loaded",
                                    "--out", str(tmp_path / "post2")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("Error: ") and Path(name).name in res.output and len(res.output.splitlines()) == 1


def test_estimate_prior_resume_names_a_damaged_model(made, tmp_path, rng):
    from bayeskd.priors.estimate import estimate_prior

    out = _copy(made, "prior", tmp_path)
    damage(out / "prior" / "tables.safetensors", "flip", rng)
    with raises_named(out / "prior" / "tables.safetensors", "flip"):
        estimate_prior(made["data"], made["tok"], out=str(out), order=2, top_k=8, write_topk=True)


def test_read_json_and_npy_name_the_file(tmp_path, rng):
    from bayeskd.integrity import load_npy

    p = tmp_path / "summary.json"
    p.write_text(json.dumps({"records": 12, "tokens": 345}))
    damage(p, "truncate", rng)
    with raises_named(p, "truncate"):
        read_json(p)
    a = tmp_path / "a.npy"
    np.save(a, np.arange(100))
    damage(a, "truncate", rng)
    with pytest.raises(CorruptOutputError, match=r"a\.npy: not a readable \.npy array.*truncated"):
        load_npy(a)


# ---------------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json", "checksums.json"])
@pytest.mark.parametrize("how", HOWS)
def test_damaged_trainer_checkpoint_falls_back_to_the_previous_one(made, tmp_path, rng, name, how):
    from bayeskd.distillation.checkpoints import latest_intact_checkpoint, resume_point

    out = _copy(made, "distill", tmp_path)
    assert (out / "checkpoint-2" / "checksums.json").exists() and (out / "checkpoint-1" / "checksums.json").exists()
    damage(out / "checkpoint-2" / name, how, rng)
    with pytest.warns(UserWarning, match=rf"checkpoint-2.*{re.escape(name)}.*previous intact checkpoint"):
        assert latest_intact_checkpoint(out) == str(out / "checkpoint-1")
    with raises_named(out / "checkpoint-2" / name, how):  # asked for by name: an error, no fallback
        resume_point(str(out / "checkpoint-2"), out)
    bad = [f for f in verify_dir(out) if not f.ok]
    assert bad and all("checkpoint-2" in f.path for f in bad) and any(name in f.path for f in bad)


def test_distill_resumes_past_a_damaged_checkpoint_to_the_same_weights(made, tmp_path, rng):
    from safetensors.torch import load_file

    from bayeskd.distillation.trainer import distill

    out = _copy(made, "distill", tmp_path)
    damage(out / "checkpoint-2" / "model.safetensors", "flip", rng)
    with pytest.warns(UserWarning, match="checkpoint-2.*damaged"):
        distill(made["data"], made["student"], str(out), resume_from_checkpoint="latest", **made["common"])
    want = load_file(str(made["dir"] / "distill" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)  # from checkpoint-1: steps 2-3 redone


@pytest.mark.parametrize("name", ["student/model.safetensors", "discriminator/model.safetensors", "optimizers.pt",
                                  "state.json"])
@pytest.mark.parametrize("how", HOWS)
def test_damaged_gad_checkpoint_is_named_on_resume(made, tmp_path, rng, name, how):
    from bayeskd.distillation.gad import gad

    out = _copy(made, "gad", tmp_path)
    damage(out / name, how, rng)
    kw = dict(steps=1, progress=False, group_size=2, batch_prompts=2, max_new_tokens=4, max_prompt_tokens=16,
              seed=0, save_every=1)
    if name == "state.json" and how == "delete":  # no state: the stage is redone (same seeds, same result)
        gad(made["data"], made["student"], str(out), **kw)
        assert (out / "state.json").exists()
        return
    with pytest.raises((CorruptOutputError, FileNotFoundError, ValueError),
                       match=rf"{re.escape(Path(name).name)}.*({PROBLEM[how]}|not valid JSON)"):
        gad(made["data"], made["student"], str(out), **kw)
    assert any(not f.ok for f in verify_dir(out))


@pytest.mark.parametrize("how", HOWS + ("digit",))
def test_damaged_align_proxy_stage_is_named_and_final_rebuilt(tmp_path, rng, how):
    from bayeskd.distillation.checkpoints import final_is_current, read_stage, record_stage

    stage = tmp_path / "round_1"
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(bytes(rng.integers(0, 256, 4096, dtype=np.uint8)))
    (stage / "summary.json").write_text(json.dumps({"stage": "round_1", "steps": 12, "train_loss": 1.25}))
    final = tmp_path / "final"
    shutil.copytree(stage, final)
    (final / "source.json").write_text(json.dumps({"stage": "round_1"}))
    record_stage(stage)
    record_stage(final)
    assert read_stage(stage)["steps"] == 12 and final_is_current(final, "round_1")
    target = stage / ("summary.json" if how == "digit" else "model.safetensors")
    damage(target, how, rng)
    with raises_named(target, how):
        read_stage(stage)
    damage(final / "model.safetensors", "flip" if how == "digit" else how, rng)
    with pytest.warns(UserWarning, match="final/model.safetensors.*rebuilding"):
        assert not final_is_current(final, "round_1")
