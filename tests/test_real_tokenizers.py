"""Real tokenizers in the lab (`bayeskd.lab.real_tokenizers`): GPT-2's and Whisper's multilingual BPE, converted from
openai-whisper's tiktoken files, give tiktoken's ids; the tiny-gpt2 preset builds with them."""
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bayeskd.lab.build import PRESETS, LabError, build_lab, read_manifest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("whisper") is None or importlib.util.find_spec("tiktoken") is None,
    reason="needs openai-whisper and tiktoken (pip install -e '.[lab-real]', also in the dev extra)")

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45, isn't it?",
    "naïve café: 日本語のテキスト, 한국어, Ελληνικά, русский — “quoted” 🙂👍🏽",
    "    indented\n\n\n\tand tabbed  \t \r\n   trailing   ",
    "3.14159 1,000,000 0x1F 20240930 000123 9999999999999",
    "x == y != z; a->b; '''docstring''' ============ ------ ...",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def converted(cache):
    from transformers import AutoTokenizer

    from bayeskd.lab.real_tokenizers import real_tokenizer, tiktoken_reference

    return {asset: (AutoTokenizer.from_pretrained(real_tokenizer(asset, cache)), tiktoken_reference(asset))
            for asset in ("gpt2", "multilingual")}


@pytest.mark.parametrize("asset", ["gpt2", "multilingual"])
def test_converted_tokenizer_matches_tiktoken(converted, asset):
    from bayeskd.corpus import SPECIAL_TOKENS

    tok, ref = converted[asset]
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ref.encode_ordinary(text), text
        assert tok.decode(ids) == text
        assert tok(text)["input_ids"] == [tok.bos_token_id] + ids  # <bos> first, as every lab tokenizer
    assert len(tok) == 50256 + len(SPECIAL_TOKENS)  # the BPE tokens (tiktoken's ids), then the lab's specials
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id] == list(range(50256, 50260))
    assert tok.chat_template is not None


def test_the_pair_differs(converted):
    """Teacher B's multilingual vocabulary is not GPT-2's: the same text splits otherwise."""
    (gpt2, _), (multi, _) = converted["gpt2"], converted["multilingual"]
    text = TEXTS[1]
    assert gpt2.tokenize(text) != multi.tokenize(text)
    assert len(multi.tokenize(text)) < len(gpt2.tokenize(text))  # Whisper's merges cover more scripts


def test_conversion_is_cached(converted, cache, monkeypatch):
    from bayeskd.lab import real_tokenizers

    first = real_tokenizers.real_tokenizer("gpt2", cache)
    monkeypatch.setattr(real_tokenizers, "convert_tiktoken", lambda *a, **k: pytest.fail("converted again"))
    assert real_tokenizers.real_tokenizer("gpt2", cache) == first
    assert sorted(p.name for p in Path(cache).iterdir()) == sorted(  # no temporary directory left
        Path(real_tokenizers.real_tokenizer(a, cache)).name for a in ("gpt2", "multilingual"))


def test_recover_merges_toy():
    from bayeskd.lab.real_tokenizers import recover_merges

    ranks = {bytes([b]): b for b in range(256)}
    for tok in (b"ab", b"abc", b"bc", b"abcd", b"aaa"):
        ranks[tok] = len(ranks)
    ranks[b"aa"] = len(ranks)  # after b"aaa": b"aaa" is no merge of lower ranks, so it gets none
    assert recover_merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"abc", b"d"), (b"a", b"a")]


@pytest.mark.parametrize("missing", ["tiktoken", "whisper"])
def test_missing_extra_names_it(tmp_path, monkeypatch, missing):
    from bayeskd.lab.real_tokenizers import tokenizer_asset

    monkeypatch.setitem(sys.modules, missing, None)  # `import` fails, `find_spec` finds nothing
    with pytest.raises(LabError, match=r"pip install -e '\.\[lab-real\]'"):
        tokenizer_asset("gpt2")
    with pytest.raises(LabError, match=r"tiny-gpt2.*\[lab-real\]"):
        build_lab(tmp_path, "tiny-gpt2", progress=False)


def test_default_tokenizer_keeps_manifests():
    """Presets with the trained BPE keep the preset dict that labs built before the `tokenizer` field recorded."""
    for name in ("micro", "tiny", "small", "tiny-sharp"):
        assert "tokenizer" not in PRESETS[name].to_dict()
    assert PRESETS["tiny-gpt2"].to_dict()["tokenizer"] == "gpt2"
    assert PRESETS["tiny-gpt2-sharp"].base_preset() == PRESETS["tiny-gpt2"]
    tiny, gpt2 = PRESETS["tiny"].to_dict(), PRESETS["tiny-gpt2"].to_dict()
    assert {k: v for k, v in gpt2.items() if k not in ("name", "vocab_size", "tokenizer")} == \
        {k: v for k, v in tiny.items() if k not in ("name", "vocab_size")}  # tiny's sizes


def _micro_gpt2(steps: int):
    return dataclasses.replace(PRESETS["micro"], name="micro-gpt2", vocab_size=PRESETS["tiny-gpt2"].vocab_size,
                               tokenizer="gpt2", steps=steps)


def test_gpt2_lab_builds(tmp_path, cache, converted):
    """A micro-sized lab (2 steps) with GPT-2's tokenizer: models of its vocabulary, its tokenizer saved with them,
    and teacher B with Whisper's multilingual tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    from bayeskd.lab.cross import build_teacher_b
    from bayeskd.lab.real_tokenizers import CACHE_DIR

    shutil.copytree(cache, tmp_path / CACHE_DIR)  # the conversions made above: the labs' root caches them
    preset = _micro_gpt2(steps=2)
    paths = build_lab(tmp_path, preset, progress=False)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert len(tok) == preset.vocab_size
    for role in ("teacher", "proxy", "student"):
        assert AutoConfig.from_pretrained(paths[role]).vocab_size == len(tok)
        assert json.loads((Path(paths[role]) / "tokenizer.json").read_text()) == \
            json.loads((Path(paths["tokenizer"]) / "tokenizer.json").read_text())
    gpt2_ref = converted["gpt2"][1]
    assert tok(TEXTS[0], add_special_tokens=False)["input_ids"] == gpt2_ref.encode_ordinary(TEXTS[0])
    m = read_manifest(paths["root"])
    assert m["preset"]["tokenizer"] == "gpt2" and m["stats"]["teacher"]["steps"] == 2
    assert build_lab(tmp_path, preset, progress=False) == paths  # reused

    b_tok = AutoTokenizer.from_pretrained(build_teacher_b(paths["root"], preset, progress=False))
    multi_ref = converted["multilingual"][1]
    assert b_tok(TEXTS[1], add_special_tokens=False)["input_ids"] == multi_ref.encode_ordinary(TEXTS[1])
    assert AutoConfig.from_pretrained(Path(paths["root"]) / "teacher_b" / "teacher").vocab_size == len(b_tok)


@pytest.mark.e2e
def test_gpt2_micro_lab_learns(tmp_path):
    """The whole micro schedule (50 steps) at V = 50,260: the teacher's loss falls well below log V (~10.8)."""
    paths = build_lab(tmp_path, _micro_gpt2(steps=PRESETS["micro"].steps), progress=False)
    stats = read_manifest(paths["root"])["stats"]["teacher"]
    assert stats["first_loss"] > 10.0 and stats["last_loss"] < stats["first_loss"] - 2.0
