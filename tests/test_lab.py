"""The lab: the micro preset builds in seconds, is cached, and its teacher is reachable as text only."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from bayeskd.data import load_teacher_records
from bayeskd.lab.build import PRESETS, LabError, build_lab, load_lab_prompts, read_manifest, split_corpus
from bayeskd.teachers.local import BlackBoxTeacher, WhiteBoxTeacher
from bayeskd.teachers.sampling import sample_teacher_jsonl


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    return build_lab(root, "micro", progress=False)


@pytest.fixture(scope="module")
def black_box(lab):
    return BlackBoxTeacher(lab["teacher"])


def _weights(model_dir):
    files = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    assert files, os.listdir(model_dir)
    return os.path.join(model_dir, sorted(files)[0])


def test_micro_builds_all_parts(lab):
    for key in ("tokenizer", "teacher", "proxy", "student"):
        assert os.path.isdir(lab[key]), key
    for key in ("teacher", "proxy", "student"):
        assert os.path.exists(os.path.join(lab[key], "config.json"))
        assert os.path.exists(os.path.join(lab[key], "tokenizer.json"))  # saved with its tokenizer
    m = read_manifest(lab["root"])
    assert m["preset"] == PRESETS["micro"].to_dict() == {k: v for k, v in dataclasses.asdict(PRESETS["micro"]).items()
                                                         if k != "tokenizer"}  # the default tokenizer is left out
    assert m["stats"]["student"]["params"] < m["stats"]["teacher"]["params"]
    prompts = load_lab_prompts(lab["root"])
    assert len(prompts) == PRESETS["micro"].n_prompts
    assert all(p["prompt"] and p["response"] for p in prompts)


def test_teacher_and_proxy_losses_drop(lab):
    stats = read_manifest(lab["manifest"])["stats"]
    for role in ("teacher", "proxy"):
        assert stats[role]["steps"] == PRESETS["micro"].steps
        assert stats[role]["last_loss"] < stats[role]["first_loss"] - 0.3, stats[role]


def test_second_build_is_reused(lab):
    weights = _weights(lab["teacher"])
    before = os.stat(weights).st_mtime_ns
    again = build_lab(os.path.dirname(lab["root"]), "micro", progress=False)
    assert again == lab
    assert os.stat(weights).st_mtime_ns == before


def test_other_config_without_force_raises(lab):
    other = dataclasses.replace(PRESETS["micro"], steps=PRESETS["micro"].steps + 1)
    with pytest.raises(LabError, match="another config"):
        build_lab(os.path.dirname(lab["root"]), other, progress=False)
    with pytest.raises(LabError, match="unknown lab preset"):
        build_lab(os.path.dirname(lab["root"]), "nope")


def test_a_lab_built_by_an_older_version_is_rebuilt(tmp_path):
    """The same preset built by an older bayeskd (another corpus split) is a stale cache: rebuilt without force."""
    from bayeskd.lab.build import LAB_VERSION

    cfg = dataclasses.replace(PRESETS["micro"], steps=3, n_prompts=2, warmup_steps=1)
    paths = build_lab(tmp_path, cfg, progress=False)
    manifest = json.loads(Path(paths["manifest"]).read_text())
    Path(paths["manifest"]).write_text(json.dumps({**manifest, "version": LAB_VERSION - 1}))
    before = os.stat(_weights(paths["teacher"])).st_mtime_ns
    assert build_lab(tmp_path, cfg, progress=False) == paths
    assert read_manifest(paths["root"])["version"] == LAB_VERSION
    assert os.stat(_weights(paths["teacher"])).st_mtime_ns != before


def test_force_rebuilds_with_new_config(tmp_path):
    cfg = dataclasses.replace(PRESETS["micro"], steps=3, n_prompts=2, warmup_steps=1)
    paths = build_lab(tmp_path, cfg, progress=False)
    weights = _weights(paths["teacher"])
    before = os.stat(weights).st_mtime_ns
    cfg2 = dataclasses.replace(cfg, steps=4)
    with pytest.raises(LabError):
        build_lab(tmp_path, cfg2, progress=False)
    build_lab(tmp_path, cfg2, force=True, progress=False)
    assert read_manifest(paths["root"])["preset"]["steps"] == 4
    assert os.stat(_weights(paths["teacher"])).st_mtime_ns != before


def test_build_is_deterministic(tmp_path):
    cfg = dataclasses.replace(PRESETS["micro"], steps=3, n_prompts=2, warmup_steps=1)
    a, b = (build_lab(tmp_path / d, cfg, progress=False) for d in ("a", "b"))
    for role in ("teacher", "proxy", "student"):
        with open(_weights(a[role]), "rb") as fa, open(_weights(b[role]), "rb") as fb:
            assert fa.read() == fb.read(), role
    assert read_manifest(a["root"])["stats"] == read_manifest(b["root"])["stats"]


def test_split_is_deterministic_and_disjoint():
    docs = [f"Document number {i} has a first sentence. And then a rest of {i}." for i in range(40)]
    a = split_corpus(docs, 5, seed=3)
    assert a == split_corpus(docs, 5, seed=3)
    assert a != split_corpus(docs, 5, seed=4)
    teacher, proxy, prompts = a
    assert len(prompts) == 5 and len(teacher) + len(proxy) == 35
    assert not set(teacher) & set(proxy)
    held = {p["prompt"] for p in prompts}
    assert not any(d.split(". ")[0] + "." in held for d in teacher + proxy)


def test_heldout_prompts_share_no_text_with_training_documents():
    """The corpus repeats first sentences across documents; a held-out prompt's text must not open any document
    the teacher or the proxy trains on, nor any training prompt, and held-out prompts are distinct."""
    from bayeskd.corpus import embedded_corpus, split_prompt_response

    docs = [f"Shared opening {i % 7}. Body of document {i}." for i in range(60)]  # 7 prompt texts, each 8-9 times
    teacher, proxy, records = split_corpus(docs, 4, seed=0)
    held = [r["prompt"] for r in records]
    assert len(set(held)) == 4
    train = [split_prompt_response(d)[0] for d in teacher + proxy]
    assert not set(held) & set(train)
    assert len(teacher) + len(proxy) == 60 - sum(1 for d in docs if split_prompt_response(d)[0] in held)
    # the real corpus, at the tiny preset's split
    preset = PRESETS["tiny"]
    teacher, proxy, records = split_corpus(embedded_corpus(), preset.n_prompts, preset.seed)
    held = {r["prompt"] for r in records}
    assert len(held) == len(records) == preset.n_prompts
    train = {pair[0] for d in teacher + proxy if (pair := split_prompt_response(d)) is not None}
    assert not held & train, sorted(held & train)[:5]


def test_black_box_exposes_text_only(black_box):
    out = black_box.generate(["The if statement is used for"], max_new_tokens=8, temperature=1.0, seed=0)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    for name in dir(black_box):
        if name.startswith("__"):
            continue
        value = getattr(black_box, name)
        assert not isinstance(value, (torch.nn.Module, torch.Tensor)), name
        assert "logit" not in name.lower() and name not in ("model", "tokenizer"), name
    for name, value in vars(black_box).items():
        assert not isinstance(value, (torch.nn.Module, torch.Tensor)), name
    public = [n for n in dir(black_box) if not n.startswith("_")]
    assert set(public) == {"generate", "path"}


def test_same_seed_same_samples(black_box):
    prompts = ["A class definition defines a class object.", "The for statement is used to iterate"]
    a = black_box.generate(prompts, max_new_tokens=12, temperature=1.0, seed=7)
    assert a == black_box.generate(prompts, max_new_tokens=12, temperature=1.0, seed=7)
    assert a != black_box.generate(prompts, max_new_tokens=12, temperature=1.0, seed=8)
    greedy = black_box.generate(prompts, max_new_tokens=12, temperature=0.0, seed=1)
    assert greedy == black_box.generate(prompts, max_new_tokens=12, temperature=0.0, seed=2)


def test_sample_teacher_jsonl_loads(lab, black_box, tmp_path):
    prompts = load_lab_prompts(lab["prompts"])
    out = tmp_path / "teacher.jsonl"
    counts = sample_teacher_jsonl(black_box, prompts, out, max_new_tokens=12, seed=5, batch_size=4)
    assert counts["written"] + counts["empty"] == len(prompts) and counts["written"] > 0
    records, report = load_teacher_records(str(out))
    assert len(records) == counts["written"]
    again = tmp_path / "again.jsonl"
    sample_teacher_jsonl(black_box, [p["prompt"] for p in prompts], again, max_new_tokens=12, seed=5, batch_size=4)
    assert out.read_bytes() == again.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class _EmptyTeacher:
    def generate(self, prompts, max_new_tokens, temperature, seed):
        return ["" if i % 2 else " ok" for i in range(len(prompts))]


def test_sample_skips_and_counts_empty(tmp_path):
    out = tmp_path / "t.jsonl"
    counts = sample_teacher_jsonl(_EmptyTeacher(), ["a", "b", "c"], out, batch_size=2)
    assert counts == {"written": 2, "empty": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "a", "response": "ok"}, {"prompt": "c", "response": "ok"}]


def test_white_box_logprobs(lab):
    wb = WhiteBoxTeacher(lab["teacher"])
    ids = wb.tokenizer(["The if statement", "A class"], return_tensors="pt", padding=True)["input_ids"]
    lp = wb.logprobs(ids)
    assert lp.shape == (2, ids.shape[1], len(wb.tokenizer)) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:2]), rtol=0, atol=1e-4)
