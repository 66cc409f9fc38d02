"""A sharper lab teacher (issue 14, item 6): the lab teacher at a temperature τ < 1, saved as a model of its own
whose logits are the original logits / τ, with τ chosen for a target mean entropy on training text."""
import dataclasses
import json
import os

import pytest
import torch

from bayeskd.corpus import embedded_corpus
from bayeskd.lab.build import (LAB_VERSION, PRESETS, LabError, SharpLabPreset, build_lab, get_preset, lab_paths,
                               read_manifest, sharp_preset)
from bayeskd.lab.report import format_report, format_teacher
from bayeskd.lab.teacher import entropy_at, forced_logits, mean_entropy, search_tau, sharpen_model, sharpen_teacher


def _llama(vocab: int, tied: bool, seed: int = 0, tokenizer=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    special = {} if tokenizer is None else dict(pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      initializer_range=0.2, tie_word_embeddings=tied, **special)
    return LlamaForCausalLM(cfg).eval()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@torch.no_grad()
def _logprobs(model, x, tau: float = 1.0):
    return torch.log_softmax(model(input_ids=x).logits.double() / tau, dim=-1)


@pytest.mark.parametrize("tied", [False, True])
def test_sharpened_copy_is_the_teacher_at_temperature_tau(tmp_path, tied):
    tau, V = 0.37, 96
    _llama(V, tied).save_pretrained(tmp_path / "orig")
    model = _load(tmp_path / "orig")
    emb = model.get_input_embeddings()
    assert (model.get_output_embeddings().weight is emb.weight) == tied  # the copy starts tied when asked
    sharpen_model(model, tau).save_pretrained(tmp_path / "sharp")
    ref, sharp = _load(tmp_path / "orig"), _load(tmp_path / "sharp")
    x = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(1))
    assert (_logprobs(sharp, x) - _logprobs(ref, x, tau)).abs().max() < 1e-5
    # the input embeddings do not change (a tied copy is untied, in the config too, or loading would tie it again)
    assert torch.equal(sharp.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert sharp.get_output_embeddings().weight is not sharp.get_input_embeddings().weight
    assert not sharp.config.tie_word_embeddings
    assert torch.allclose(sharp.get_output_embeddings().weight, ref.get_output_embeddings().weight / tau)


def test_sharpen_scales_a_bias_and_refuses_soft_capping():
    tau, V = 0.5, 64
    model = _llama(V, tied=False)
    head = torch.nn.Linear(32, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
    model.lm_head = head
    x = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    want = _logprobs(model, x, tau)
    assert (_logprobs(sharpen_model(model, tau), x) - want).abs().max() < 1e-5
    capped = _llama(V, tied=False)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-capping"):
        sharpen_model(capped, tau)
    with pytest.raises(ValueError):
        sharpen_model(_llama(V, tied=False), 0.0)


def test_tau_search_reaches_the_target(tmp_path, tiny_tokenizer):
    target = 1.4
    src = tmp_path / "teacher"
    _llama(len(tiny_tokenizer), tied=False, tokenizer=tiny_tokenizer).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    docs = embedded_corpus()[:6]
    info = sharpen_teacher(src, tmp_path / "sharp", docs, target, max_len=48)
    assert 0 < info["tau"] < 1 and info["entropy"] <= target < info["entropy_before"]
    assert info["max_abs_logprob_error"] < 1e-4 and info["docs"] == 6
    z = forced_logits(_load(src), tiny_tokenizer, docs, 48)
    assert len(z) == info["positions"]
    assert entropy_at(z, info["tau"]) <= target
    assert entropy_at(z, info["tau"] + 2e-4) > target  # the largest such τ, to the search's tolerance
    sharp = forced_logits(_load(tmp_path / "sharp"), tiny_tokenizer, docs, 48)  # measured on the saved copy
    assert abs(mean_entropy(torch.log_softmax(sharp, -1)) - info["entropy"]) < 1e-4
    assert info["entropy"] <= target
    assert search_tau(z, 100.0) == (1.0, entropy_at(z, 1.0))  # already flat enough: temperature 1


def test_sharp_presets_resolve():
    for name in ("micro", "tiny", "small"):
        p = get_preset(f"{name}-sharp")
        assert isinstance(p, SharpLabPreset) and p.name == f"{name}-sharp" and p.base == name
        assert p.base_preset() == PRESETS[name] and p.teacher_entropy_target <= 1.5
        assert PRESETS[name].base_preset() is PRESETS[name]
        assert "base" not in PRESETS[name].to_dict()  # labs built before keep their manifests
    from bayeskd.cli import main
    from bayeskd.lab.run import RUN_CONFIGS, SCALE_PRESETS

    option = next(o for o in main.commands["lab"].commands["run"].params if o.name == "preset")
    assert set(option.type.choices) == set(PRESETS) | set(SCALE_PRESETS)
    assert "tiny-sharp" not in RUN_CONFIGS  # run_lab falls back on the base lab's settings
    with pytest.raises(LabError):
        dataclasses.replace(PRESETS["tiny-sharp"], base="tiny-sharp")


@pytest.fixture
def fake_base_lab(tmp_path, tiny_tokenizer):
    """A base lab written by hand (untrained models, a manifest matching its preset): build_lab reuses it as is."""
    base = dataclasses.replace(PRESETS["micro"], name="fake")
    paths = lab_paths(tmp_path, base.name)
    os.makedirs(paths["root"])
    tiny_tokenizer.save_pretrained(paths["tokenizer"])
    for role, seed in (("teacher", 0), ("proxy", 1), ("student", 2)):
        _llama(len(tiny_tokenizer), tied=False, seed=seed, tokenizer=tiny_tokenizer).save_pretrained(paths[role])
        tiny_tokenizer.save_pretrained(paths[role])
    with open(paths["prompts"], "w") as f:
        f.write(json.dumps({"prompt": "Return the", "response": "absolute value."}) + "\n")
    with open(paths["manifest"], "w") as f:
        json.dump({"version": LAB_VERSION, "preset": base.to_dict(), "stats": {"teacher": {"steps": 0}}}, f)
    return tmp_path, base, paths


def test_sharp_lab_reuses_its_base_lab(fake_base_lab, tiny_tokenizer):
    root, base, base_paths = fake_base_lab
    preset = dataclasses.replace(sharp_preset(base), entropy_docs=4, entropy_len=48)
    weights = os.path.join(base_paths["teacher"], "model.safetensors")
    before = open(weights, "rb").read()
    paths = build_lab(root, preset, progress=False)
    assert paths == lab_paths(root, "fake-sharp") and open(weights, "rb").read() == before
    for key in ("tokenizer", "proxy", "student"):
        assert os.path.exists(os.path.join(paths[key], "tokenizer.json")), key
    assert open(paths["prompts"]).read() == open(base_paths["prompts"]).read()
    m = read_manifest(paths["root"])
    s = m["sharpen"]
    assert s["entropy"] <= preset.teacher_entropy_target and s["docs"] == 4 and m["stats"]["teacher"]["steps"] == 0
    x = torch.randint(0, len(tiny_tokenizer), (2, 11), generator=torch.Generator().manual_seed(3))
    diff = _logprobs(_load(paths["teacher"]), x) - _logprobs(_load(base_paths["teacher"]), x, s["tau"])
    assert diff.abs().max() < 1e-5
    sharp_weights = os.path.join(paths["teacher"], "model.safetensors")
    mtime = os.stat(sharp_weights).st_mtime_ns
    assert build_lab(root, preset, progress=False) == paths and os.stat(sharp_weights).st_mtime_ns == mtime
    # another base teacher: the sharp copy is stale, refused unless forced
    _llama(len(tiny_tokenizer), tied=False, seed=9, tokenizer=tiny_tokenizer).save_pretrained(base_paths["teacher"])
    with pytest.raises(LabError, match="another"):
        build_lab(root, preset, progress=False)
    build_lab(root, preset, force=True, progress=False)
    assert read_manifest(paths["root"])["base_teacher_sha256"] != m["base_teacher_sha256"]


def test_report_states_the_teacher_entropy():
    t = {"entropy": {"estimation": 3.61, "heldout": 3.5}, "positions": {"estimation": 900, "heldout": 300},
         "sharpen": None}
    assert "mean entropy 3.610 nats/token" in format_teacher(t) and "temperature 1" in format_teacher(t)
    t["sharpen"] = {"tau": 0.5351, "target": 1.4, "entropy": 1.3996, "entropy_before": 3.4517, "positions": 5023,
                    "docs": 64}
    assert "τ = 0.5351" in format_teacher(t) and "3.452 → 1.400" in format_teacher(t)
    text = format_report({"preset": "tiny-sharp", "config": {"top_k": 64, "order": 4}, "teacher": t})
    assert "Teacher: mean entropy 3.610" in text


def test_mean_entropy_in_row_chunks(monkeypatch):
    """mean_entropy works in row chunks (no [N, V] temporaries): the same as the whole matrix at once, valid rows
    only, with a short last chunk."""
    g = torch.Generator().manual_seed(8)
    lp = torch.log_softmax(2 * torch.randn(4099, 1025, generator=g), -1)  # 4 rows a chunk at V = 1025 ... + tail
    valid = torch.rand(4099, generator=g) > 0.25
    whole = torch.special.entr(lp.exp()).sum(-1)
    assert mean_entropy(lp, valid) == pytest.approx(float(whole[valid].mean()), rel=1e-6)
    assert mean_entropy(lp) == pytest.approx(float(whole.mean()), rel=1e-6)
