"""Teacher data loading (JSONL / Parquet / saved datasets), validation errors, tokenization and the corpus."""
import json
import re

import numpy as np
import pytest

from bayeskd.corpus import CHAT_TEMPLATE, embedded_corpus, embedded_teacher_jsonl, split_prompt_response
from bayeskd.data import DataError, load_teacher_records, load_tokenizer, tokenize_records
from bayeskd.core.sparse import tokenizer_fingerprint

WORDS = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object",
         "café", "naïve", "—", "x = 1", "()", "\n", "def f():", "   ", "'quoted'", "42", "über", "日本"]


def _text(rng, lo=1, hi=20) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))).strip() or "fallback"


def _records(rng, n=30) -> list[dict]:
    """A random mix of prompt/response and chat records (with an extra id field)."""
    recs = []
    for i in range(n):
        if rng.random() < 0.5:
            recs.append({"id": i, "prompt": _text(rng, 0, 8), "response": _text(rng)})
        else:
            msgs = [{"role": "user", "content": _text(rng)}]
            if rng.random() < 0.5:
                msgs = [{"role": "system", "content": _text(rng)}] + msgs
            if rng.random() < 0.3:  # a multi-turn conversation
                msgs += [{"role": "assistant", "content": _text(rng)}, {"role": "user", "content": _text(rng)}]
            recs.append({"id": i, "messages": msgs + [{"role": "assistant", "content": _text(rng)}]})
    return recs


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _table(records):
    import pyarrow as pa

    # pa.array infers the schema from every row (Table.from_pylist and Dataset.from_list look at the first).
    return pa.Table.from_struct_array(pa.array(records))


def _write_parquet(path, records) -> str:
    import pyarrow.parquet as pq

    pq.write_table(_table(records), path)
    return str(path)


# ----------------------------------------------------------------------------------------------- loading

def test_jsonl_parquet_and_saved_dataset_give_the_same_records(tmp_path, rng):
    import datasets

    recs = _records(rng)
    from_jsonl, rep = load_teacher_records(_write_jsonl(tmp_path / "t.jsonl", recs))
    assert from_jsonl == recs and (rep.total, rep.kept, rep.skipped, rep.format) == (30, 30, 0, "jsonl")
    assert rep.get("skipped") == 0 and rep.to_dict()["kept"] == 30

    from_parquet, rep = load_teacher_records(_write_parquet(tmp_path / "t.parquet", recs))
    assert from_parquet == recs and rep.format == "parquet"

    ds = datasets.Dataset(_table(recs))
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_teacher_records(tmp_path / "ds")[0] == recs

    other = _records(rng, 7)
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset(_table(other))}).save_to_disk(str(tmp_path / "dd"))
    assert load_teacher_records(tmp_path / "dd")[0] == recs
    assert load_teacher_records(tmp_path / "dd", split="test")[0] == other
    with pytest.raises(DataError, match=r"no split 'validation' \(available: test, train\)"):
        load_teacher_records(tmp_path / "dd", split="validation")


def test_json_array_file_is_accepted(tmp_path, rng):
    recs = _records(rng, 5)
    (tmp_path / "t.json").write_text(json.dumps(recs))
    assert load_teacher_records(tmp_path / "t.json")[0] == recs


BAD_JSONL = [
    # (line written at line 3, expected message fragment)
    ('{"prompt": "a", "response": "b"', r"t\.jsonl:3: invalid JSON"),
    ('{"prompt": "a"}', r"t\.jsonl:3: missing field 'response' \(need 'prompt'\+'response' or 'messages'\)"),
    ('{"response": "a"}', r"t\.jsonl:3: missing field 'prompt'"),
    ('{"prompt": "a", "response": ""}', r"t\.jsonl:3: field 'response' is empty"),
    ('{"prompt": "a", "response": "  \\n "}', r"t\.jsonl:3: field 'response' is empty"),
    ('{"prompt": "a", "response": 7}', r"t\.jsonl:3: field 'response' must be a string, got int"),
    ('{"prompt": "a", "response": null}', r"t\.jsonl:3: field 'response' must be a string, got null"),
    ('{"prompt": ["a"], "response": "b"}', r"t\.jsonl:3: field 'prompt' must be a string, got list"),
    ('["a", "b"]', r"t\.jsonl:3: record must be an object, got list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}',
     r"t\.jsonl:3: field 'messages' must end with the assistant's message .* last role is 'user'"),
    ('{"messages": []}', r"t\.jsonl:3: field 'messages' is empty"),
    ('{"messages": "hi"}', r"t\.jsonl:3: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}', r"t\.jsonl:3: field 'messages\[0\]'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
     r"t\.jsonl:3: field 'messages\[1\]\.content' \(the assistant response\) is empty"),
]


@pytest.mark.parametrize("bad,message", BAD_JSONL)
def test_each_malformed_jsonl_line_is_named(tmp_path, bad, message):
    good = json.dumps({"prompt": "p", "response": "r"})
    path = tmp_path / "t.jsonl"
    path.write_text(f"{good}\n\n{bad}\n{good}\n")  # the blank line 2 still counts in the numbering
    with pytest.raises(DataError, match=message):
        load_teacher_records(path)
    records, report = load_teacher_records(path, skip_bad=True)
    assert len(records) == 2 and (report.total, report.kept, report.skipped) == (3, 2, 1)
    assert len(report.reasons) == 1 and ":3:" in report.reasons[0]


def test_invalid_utf8_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: not valid UTF-8"):
        load_teacher_records(path)


def test_malformed_parquet_row_is_named(tmp_path):
    recs = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}, {"prompt": "e", "response": ""}]
    path = _write_parquet(tmp_path / "t.parquet", recs)
    with pytest.raises(DataError, match=r"t\.parquet: row 2: field 'response' is empty"):
        load_teacher_records(path)
    path = _write_parquet(tmp_path / "m.parquet", [{"prompt": "a"}])
    with pytest.raises(DataError, match=r"m\.parquet: row 0: missing field 'response'"):
        load_teacher_records(path)


def test_skip_bad_counts_and_keeps_first_reasons(tmp_path, rng):
    lines, n_bad = [], 0
    for i in range(60):
        if rng.random() < 0.4:
            lines.append(rng.choice(['{"prompt": "a"}', "{oops", '{"prompt": "a", "response": ""}']))
            n_bad += 1
        else:
            lines.append(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}))
    lines.append(json.dumps({"prompt": "last", "response": "one"}))
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, report = load_teacher_records(path, skip_bad=True)
    assert (report.total, report.kept, report.skipped) == (61, 61 - n_bad, n_bad)
    assert len(records) == report.kept and records[-1] == {"prompt": "last", "response": "one"}
    assert len(report.reasons) == min(n_bad, 5) and report.to_dict()["skipped"] == n_bad


def test_empty_and_all_bad_inputs_are_errors(tmp_path):
    for content in ["", "\n\n  \n"]:
        (tmp_path / "e.jsonl").write_text(content)
        with pytest.raises(DataError, match=r"e\.jsonl: no records"):
            load_teacher_records(tmp_path / "e.jsonl", skip_bad=True)
    (tmp_path / "b.jsonl").write_text('{"prompt": "a"}\n{"x": 1}\n')
    with pytest.raises(DataError, match=r"b\.jsonl: all 2 records are malformed; first: .*b\.jsonl:1: missing"):
        load_teacher_records(tmp_path / "b.jsonl", skip_bad=True)


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_teacher_records(tmp_path / "nope.jsonl")
    (tmp_path / "t.csv").write_text("prompt,response\n")
    with pytest.raises(DataError, match=r"unknown file type '\.csv'"):
        load_teacher_records(tmp_path / "t.csv")
    (tmp_path / "notds").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with datasets.save_to_disk"):
        load_teacher_records(tmp_path / "notds")


# ----------------------------------------------------------------------------------------------- tokenizing

def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_prompt_response_tokens_and_mask(tiny_tokenizer, rng):
    recs = [{"prompt": _text(rng, 0, 8), "response": _text(rng)} for _ in range(25)]
    data = tokenize_records(recs, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token
    assert len(data) == 25 and data.prompt_lengths.dtype == np.int32
    for rec, ids, mask, plen, resp in zip(recs, data.input_ids, data.response_mask, data.prompt_lengths,
                                          data.response_sequences()):
        assert ids.dtype == np.int32 and mask.dtype == bool and len(ids) == len(mask)
        assert not mask[:plen].any() and mask[plen:].all()
        assert _decode(tiny_tokenizer, ids[mask]) == rec["response"] + eos
        assert _decode(tiny_tokenizer, ids[~mask]) == tiny_tokenizer.bos_token + rec["prompt"]
        np.testing.assert_array_equal(resp, ids[mask])
    assert data.tokenizer_fingerprint == data.fingerprint == tokenizer_fingerprint(tiny_tokenizer)
    assert data.vocab_size == len(tiny_tokenizer)
    assert data.report.tokens == sum(map(len, data.input_ids))
    assert data.report.response_tokens == int(sum(m.sum() for m in data.response_mask))

    no_eos = tokenize_records(recs, tiny_tokenizer, add_eos=False)
    for a, b in zip(no_eos.response_sequences(), data.response_sequences()):
        np.testing.assert_array_equal(a, b[:-1])


def test_tokenized_records_are_read_once_per_file_version(tiny_tokenizer, tmp_path, rng, monkeypatch):
    """load_tokenized_records: a second call on the same file returns the first call's result without reading
    it; a changed file, another split or skip_bad setting is read again; the result equals tokenize_records'."""
    import os

    import bayeskd.data as data_mod
    from bayeskd.data import load_tokenized_records

    recs = [{"prompt": _text(rng, 0, 8), "response": _text(rng)} for _ in range(12)]
    path = tmp_path / "t.jsonl"
    _write_jsonl(path, recs)
    reads = []
    real = data_mod.load_teacher_records
    monkeypatch.setattr(data_mod, "load_teacher_records", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    first, report = load_tokenized_records(path, tiny_tokenizer)
    again, _ = load_tokenized_records(str(path), tiny_tokenizer)
    assert again is first and len(reads) == 1 and report.kept == 12
    want = tokenize_records(recs, tiny_tokenizer)
    for a, b in zip(first.input_ids, want.input_ids):
        np.testing.assert_array_equal(a, b)
    load_tokenized_records(path, tiny_tokenizer, skip_bad=True)
    assert len(reads) == 2
    _write_jsonl(path, recs + [{"prompt": "p", "response": "one more"}])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    grown, _ = load_tokenized_records(path, tiny_tokenizer)
    assert len(reads) == 3 and len(grown) == 13


def test_chat_records_render_through_template_and_mask_covers_the_assistant_text(tiny_tokenizer, rng):
    recs = [r for r in _records(rng, 40) if "messages" in r]
    data = tokenize_records(recs, tiny_tokenizer)
    for rec, ids, mask in zip(recs, data.input_ids, data.response_mask):
        msgs = rec["messages"]
        prompt = tiny_tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        assert _decode(tiny_tokenizer, ids[~mask]) == prompt
        assert _decode(tiny_tokenizer, ids[mask]) == msgs[-1]["content"] + tiny_tokenizer.eos_token
        assert prompt.endswith("<|assistant|>\n") and prompt.count("<bos>") == 1  # no BOS doubled


def test_chat_records_need_a_chat_template(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        tokenize_records([{"messages": [{"role": "user", "content": "a"},
                                        {"role": "assistant", "content": "b"}]}], tok)


def test_truncation_drops_prompt_from_the_left_and_counts_response_truncation(tiny_tokenizer, rng):
    prompt, response = _text(rng, 30, 40), _text(rng, 10, 15)
    full = tokenize_records([{"prompt": prompt, "response": response}], tiny_tokenizer)
    ids, plen = full.input_ids[0], int(full.prompt_lengths[0])
    n_resp = len(ids) - plen
    assert plen > 10 and n_resp > 5

    # Room for the whole response and 3 prompt tokens: the prompt keeps its last 3 tokens.
    cut = tokenize_records([{"prompt": prompt, "response": response}], tiny_tokenizer, max_length=n_resp + 3)
    np.testing.assert_array_equal(cut.input_ids[0], ids[plen - 3:])
    assert cut.prompt_lengths[0] == 3 and cut.report.prompt_truncated == 1 and cut.report.response_truncated == 0

    # A response longer than max_length: cut from the right, one prompt token kept as context, counted.
    m = n_resp - 2
    cut = tokenize_records([{"prompt": prompt, "response": response}], tiny_tokenizer, max_length=m)
    np.testing.assert_array_equal(cut.input_ids[0], np.concatenate([ids[plen - 1:plen], ids[plen:plen + m - 1]]))
    assert len(cut.input_ids[0]) == m and cut.prompt_lengths[0] == 1 and cut.response_mask[0][1:].all()
    assert cut.report.response_truncated == 1 and cut.report.response_tokens_dropped == n_resp - (m - 1)

    # Short records are untouched.
    same = tokenize_records([{"prompt": "a", "response": "b"}], tiny_tokenizer, max_length=len(ids))
    assert same.report.prompt_truncated == same.report.response_truncated == 0
    with pytest.raises(ValueError):
        tokenize_records([{"prompt": "a", "response": "b"}], tiny_tokenizer, max_length=0)


def test_load_tokenizer_errors(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert tok.chat_template and tok.pad_token == "<pad>" and tok.unk_token == "<unk>"
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="broken: a local directory without a usable tokenizer"):
        load_tokenizer(tmp_path / "broken")


# ----------------------------------------------------------------------------------------------- corpus

def test_embedded_corpus_is_nonempty_clean_and_deterministic():
    corpus = embedded_corpus()
    assert len(corpus) > 500 and sum(map(len, corpus)) > 100_000
    assert corpus == embedded_corpus()
    assert all(isinstance(d, str) and len(d) >= 40 for d in corpus)
    underline = re.compile(r"[*=~^-]{4,}")  # heading underlines are removed
    assert not any(underline.fullmatch(line) for d in corpus for line in d.splitlines())
    assert not any(d.startswith("+-") for d in corpus)  # tables stay attached to their introduction
    assert len(embedded_corpus(include_docstrings=True)) > len(corpus)


def test_embedded_teacher_jsonl_loads_and_tokenizes(tmp_path, tiny_tokenizer):
    n = embedded_teacher_jsonl(tmp_path / "t.jsonl", n=50, seed=3)
    records, report = load_teacher_records(tmp_path / "t.jsonl")
    assert n == 50 and report.kept == 50 and report.skipped == 0
    assert all(r["prompt"].strip() and r["response"].strip() for r in records)
    embedded_teacher_jsonl(tmp_path / "u.jsonl", n=50, seed=3)
    assert (tmp_path / "t.jsonl").read_bytes() == (tmp_path / "u.jsonl").read_bytes()
    embedded_teacher_jsonl(tmp_path / "v.jsonl", n=50, seed=4)
    assert (tmp_path / "t.jsonl").read_bytes() != (tmp_path / "v.jsonl").read_bytes()
    data = tokenize_records(records, tiny_tokenizer)
    assert all(len(s) > 1 for s in data.response_sequences())


def test_split_prompt_response():
    assert split_prompt_response("A first sentence here. And then the rest.") == \
        ("A first sentence here.", "And then the rest.")
    assert split_prompt_response("Intro line without stop\n  code()\n") == ("Intro line without stop", "  code()")
    assert split_prompt_response("Only one sentence, nothing after it.") is None


def test_tokenizer_fixture_has_the_chat_template(tiny_tokenizer):
    assert tiny_tokenizer.chat_template == CHAT_TEMPLATE
    assert 500 <= len(tiny_tokenizer) <= 1000
    ids = tiny_tokenizer("hello world")["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id and tiny_tokenizer.unk_token_id not in ids


def test_blank_teacher_answers_and_eos_only_at_a_natural_end(tmp_path, tiny_tokenizer):
    """A teacher's blank answer is one of its samples (kept with its finish_reason; in hand-made data it is an
    error); EOS ends only responses that ended themselves, not those cut off by the length limit."""
    rows = [{"prompt": "a", "response": " \n", "finish_reason": "stop"},
            {"prompt": "a", "response": "", "finish_reason": "stop"},
            {"prompt": "a", "response": "x y", "finish_reason": "length"},
            {"prompt": "a", "response": "x y"}]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_teacher_records(str(p))
    tok = tokenize_records(records, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    resp = tok.response_sequences()
    assert resp[0][-1] == eos and len(resp[0]) > 1
    assert resp[1].tolist() == [eos]  # the teacher ended at once: its one row is EOS
    assert eos not in resp[2].tolist() and resp[3][-1] == eos  # cut off: no EOS; no finish_reason: a whole answer
    assert tok.report.no_eos == 1
    p.write_text(json.dumps({"prompt": "a", "response": "", "finish_reason": "length"}) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'response' is empty and the teacher did not end it"):
        load_teacher_records(str(p))
