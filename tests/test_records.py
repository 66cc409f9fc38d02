"""Columnar Parquet records (bayeskd.record_parquet, bayeskd convert-records): lossless round trip, the same
TokenizedData as JSONL, clear errors for malformed or foreign files."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bayeskd.cli import main
from bayeskd.core.sparse import tokenizer_fingerprint
from bayeskd.data import DataError, load_teacher_records, tokenize_records
from bayeskd.record_parquet import ParquetLogprobs
from bayeskd.records import convert_records


def _entry(tok, lp, top=None):
    e = {"token": tok, "bytes": list(tok.encode()), "logprob": lp}
    if top is not None:
        e["top_logprobs"] = top
    return e


def _records(fp=None):
    recs = [
        {"key": "k/0", "prompt": "The cat", "response": " sat on", "finish_reason": "stop", "settings": {"n": 1},
         "usage": {"completion_tokens": 2},
         "logprobs": [_entry(" sat", -0.5, [_entry(" sat", -0.5), _entry(" ran", -1.25)]),
                      _entry(" on", -0.125, [_entry(" on", -0.125), {"token": "bytes:\\xc3", "bytes": [195],
                                                                        "logprob": None}])]},
        {"messages": [{"role": "user", "content": "q", "name": "u"}, {"role": "assistant", "content": "an answer"}],
         "finish_reason": None, "id": 7},
        {"prompt": "p", "response": "x y", "finish_reason": "length",
         "logprobs": [_entry("x", -0.1, [])] + [{"token": " y", "bytes": [32, 121], "logprob": -0.3, "rank": 1}]},
        {"prompt": "", "response": "plain", "extra_field": [1, 2]},
    ]
    if fp:
        recs[0]["teacher_tokenizer"] = fp
    return recs


def _write(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return path


def test_round_trip_equal_as_parsed_dicts(tmp_path):
    src = _write(tmp_path / "a.jsonl", _records("f" * 64))
    convert_records(src, tmp_path / "a.parquet")
    convert_records(tmp_path / "a.parquet", tmp_path / "b.jsonl")
    back = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert back == _records("f" * 64)
    schema = pq.read_schema(tmp_path / "a.parquet")
    assert schema.field("logprob").type == pa.list_(pa.float32())  # every value here is a float32: exact


def test_float64_kept_where_float32_would_round(tmp_path):
    recs = [{"prompt": "p", "response": "x", "logprobs": [_entry("x", -0.1234567891234)]}]
    convert_records(_write(tmp_path / "a.jsonl", recs), tmp_path / "a.parquet")
    assert pq.read_schema(tmp_path / "a.parquet").field("logprob").type == pa.list_(pa.float64())
    got, _ = load_teacher_records(tmp_path / "a.parquet")
    assert got[0]["logprobs"].to_list() == recs[0]["logprobs"]
    convert_records(tmp_path / "a.jsonl", tmp_path / "b.parquet", float32=True)
    assert pq.read_schema(tmp_path / "b.parquet").field("logprob").type == pa.list_(pa.float32())


def test_conversion_streams_and_switches_to_float64_at_a_late_inexact_value(tmp_path, monkeypatch):
    """Records are converted a batch at a time (never all loaded); a value float32 would round, first seen after
    whole batches were written in float32, makes the file float64 from its first row, and the skip count holds."""
    import bayeskd.data
    from bayeskd import record_parquet

    monkeypatch.setattr(record_parquet, "BATCH", 3)
    monkeypatch.setattr(bayeskd.data, "load_teacher_records", None)  # the converter must not read all at once
    recs = [{"prompt": f"p{i}", "response": "x", "logprobs": [_entry("x", -0.5 - i / 8)]} for i in range(8)]
    late = [*recs, {"prompt": "q", "response": "x", "logprobs": [_entry("x", -0.1234567891234)]}]
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in late[:4]) + "not json\n"
                   + "".join(json.dumps(r) + "\n" for r in late[4:]))
    summary = convert_records(src, tmp_path / "a.parquet", skip_bad=True)
    assert (summary["records"], summary["skipped"]) == (9, 1)
    assert pq.read_schema(tmp_path / "a.parquet").field("logprob").type == pa.list_(pa.float64())
    assert convert_records(tmp_path / "a.parquet", tmp_path / "b.jsonl")["records"] == 9
    assert [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()] == late
    assert convert_records(_write(tmp_path / "c.jsonl", recs), tmp_path / "c.parquet")["records"] == 8
    assert pq.read_schema(tmp_path / "c.parquet").field("logprob").type == pa.list_(pa.float32())


def test_parquet_tokenizes_like_jsonl(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    fp = tokenizer_fingerprint(tok)
    pieces = [tok.decode([i]) for i in tok(" the cat sat on the mat", add_special_tokens=False)["input_ids"]]
    recs = [{"prompt": "A story:", "response": "".join(pieces), "teacher_tokenizer": fp, "finish_reason": "stop",
             "logprobs": [_entry(p, -0.5, [_entry(p, -0.5), _entry("zz", -2.0)]) for p in pieces]},
            *_records()]
    src = _write(tmp_path / "a.jsonl", recs)
    convert_records(src, tmp_path / "a.parquet")
    a, _ = load_teacher_records(src)
    b, report = load_teacher_records(tmp_path / "a.parquet")
    assert report.format == "parquet" and isinstance(b[0]["logprobs"], ParquetLogprobs)
    ta, tb = tokenize_records(a, tok), tokenize_records(b, tok)
    assert ta.report.teacher_tokens == tb.report.teacher_tokens == 1
    assert all(np.array_equal(x, y) for x, y in zip(ta.input_ids, tb.input_ids))
    assert np.array_equal(ta.prompt_lengths, tb.prompt_lengths)
    from bayeskd.posterior.evidence import evidence_rows
    (ea, ra), (eb, rb) = evidence_rows(a, ta, tok), evidence_rows(b, tb, tok)
    assert ra == rb and ra["records_with_logprobs"] == 3
    fields = {k: v for k, v in vars(ea).items() if isinstance(v, np.ndarray)}
    assert fields and all(np.array_equal(v, getattr(eb, k)) for k, v in fields.items())


def test_parquet_read_by_magic_whatever_the_name(tmp_path):
    convert_records(_write(tmp_path / "a.jsonl", _records()), tmp_path / "a.parquet")
    (tmp_path / "a.parquet").rename(tmp_path / "records.data")
    got, report = load_teacher_records(tmp_path / "records.data")
    assert report.format == "parquet" and len(got) == 4


def _ours(tmp_path):
    convert_records(_write(tmp_path / "a.jsonl", _records()), tmp_path / "a.parquet")
    return pq.read_table(tmp_path / "a.parquet")


def test_missing_column_is_one_line_error(tmp_path):
    t = _ours(tmp_path).drop_columns(["top_logprob"])
    pq.write_table(t, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: column 'top_logprob' is missing") as e:
        load_teacher_records(tmp_path / "bad.parquet")
    assert "\n" not in str(e.value)


def test_wrong_type_is_one_line_error(tmp_path):
    t = _ours(tmp_path)
    i = t.schema.get_field_index("logprob")
    t = t.set_column(i, pa.field("logprob", pa.list_(pa.string())), pa.array([None] * t.num_rows,
                                                                              pa.list_(pa.string())))
    pq.write_table(t.replace_schema_metadata(_ours(tmp_path).schema.metadata), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: column 'logprob' has type list<element: string>"):
        load_teacher_records(tmp_path / "bad.parquet")


def _with_bad_logprob(tmp_path):
    t = _ours(tmp_path)
    vals = t.column("logprob").to_pylist()
    vals[0][1] = 0.5  # row 0, token 1: a positive "log-probability"
    t = t.set_column(t.schema.get_field_index("logprob"), t.schema.field("logprob"),
                     pa.array(vals, t.schema.field("logprob").type))
    pq.write_table(t, tmp_path / "bad.parquet")
    return tmp_path / "bad.parquet"


def test_bad_value_names_row_and_field_and_skip_bad(tmp_path):
    path = _with_bad_logprob(tmp_path)
    with pytest.raises(DataError, match=r"bad.parquet: row 0: field 'logprobs\[1\].logprob' must be a "
                                        r"log-probability"):
        load_teacher_records(path)
    got, report = load_teacher_records(path, skip_bad=True)
    assert report.skipped == 1 and len(got) == 3


def test_foreign_parquet_still_read_as_a_table(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "response": ["b"]}), tmp_path / "plain.parquet")
    got, _ = load_teacher_records(tmp_path / "plain.parquet")
    assert got == [{"prompt": "a", "response": "b"}]
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "foreign.parquet")
    with pytest.raises(DataError, match=r"foreign.parquet: row 0: missing field 'response'"):
        load_teacher_records(tmp_path / "foreign.parquet")


def test_cli_convert_records(tmp_path):
    src = _write(tmp_path / "a.jsonl", _records())
    r = CliRunner().invoke(main, ["convert-records", str(src), str(tmp_path / "a.parquet")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["records"] == 4
    r = CliRunner().invoke(main, ["convert-records", str(src), str(tmp_path / "a.txt")])
    assert r.exit_code != 0 and "unknown output type" in r.output
    (tmp_path / "bad.jsonl").write_text(src.read_text() + "{not json\n")
    r = CliRunner().invoke(main, ["convert-records", str(tmp_path / "bad.jsonl"), str(tmp_path / "b.parquet")])
    assert r.exit_code != 0 and "bad.jsonl:5" in r.output
    r = CliRunner().invoke(main, ["convert-records", "--skip-bad", str(tmp_path / "bad.jsonl"),
                                  str(tmp_path / "b.parquet")])
    assert r.exit_code == 0 and json.loads(r.output)["skipped"] == 1


def test_records_pickle_as_plain_lists(tmp_path):
    import pickle
    convert_records(_write(tmp_path / "a.jsonl", _records()), tmp_path / "a.parquet")
    got, _ = load_teacher_records(tmp_path / "a.parquet")
    assert pickle.loads(pickle.dumps(got[0]))["logprobs"] == _records()[0]["logprobs"]
