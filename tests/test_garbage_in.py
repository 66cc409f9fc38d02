"""Garbage in (issue 15, item 5): property-based tests over the readers. Every bad record gives a one-line
`DataError` naming file:line (or row) and the field, or is skipped and counted under `skip_bad`; good records in a
mixed file are all kept, in order. Hypothesis runs derandomized (replayable: the same examples every run)."""
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bayeskd.data import DataError, load_prompts, load_teacher_records, tokenize_records, truncation_window

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=20)  # Cs: surrogates
nonblank = text.filter(lambda s: s.strip() != "")


@st.composite
def good_records(draw):
    if draw(st.booleans()):
        rec = {"prompt": draw(text), "response": draw(nonblank)}
    else:
        turns = draw(st.lists(st.tuples(nonblank, nonblank), min_size=0, max_size=2))
        msgs = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        rec = {"messages": msgs + [{"role": "user", "content": draw(nonblank)},
                                   {"role": "assistant", "content": draw(nonblank)}]}
    if draw(st.booleans()):
        rec["id"] = draw(st.integers(0, 10**6))
    return rec


def _lp(token: str, logprob=-0.5, **over):
    return {"token": token, "bytes": list(token.encode()), "logprob": logprob, **over}


# (the bad line, bytes; a substring the error must hold: the field or what is wrong)
BAD_LINES = [
    (b'{"prompt": "a"}', "'response'"),
    (b'{"response": "a"}', "'prompt'"),
    (b'{"prompt": 3, "response": "a"}', "'prompt'"),
    (b'{"prompt": "a", "response": null}', "'response'"),
    (b'{"prompt": "a", "response": ["x"]}', "'response'"),
    (b'{"prompt": "a", "response": NaN}', "'response'"),
    (b'{"prompt": "a", "response": ""}', "'response' is empty"),
    (b'{"prompt": "a", "response": "  "}', "'response' is empty"),
    (b'{"prompt": "a", "response": "", "finish_reason": "length"}', "'response' is empty"),
    (b'{"prompt": "a", "response": "b", "finish_reason": 7}', "'finish_reason'"),
    (b'{"prompt": "a", "response": "\\ud800"}', "'response' is not valid Unicode"),
    (b'{"prompt": "a\\udfff b", "response": "x"}', "'prompt' is not valid Unicode"),
    (b'{"prompt": "\xff\xfe", "response": "x"}', "UTF-8"),
    (b'{"prompt": "a", "response": "b"', "invalid JSON"),
    (b'[1, 2]', "must be an object"),
    (b'"just text"', "must be an object"),
    (b'[' * 50000 + b']' * 50000, "nested too deeply"),
    (b'{"prompt": "a", "response": "b", "x": ' + b'9' * 5000 + b'}', "unreadable JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "'messages' must end with the assistant"),
    (b'{"messages": []}', "'messages' is empty"),
    (b'{"messages": [{"role": "assistant", "content": 5}]}', "'messages[0]'"),
    (b'{"messages": [{"role": "assistant", "content": "x"}], "response": "y"}', "both 'messages' and 'response'"),
    (json.dumps({"prompt": "a", "response": "b", "logprobs": "x"}).encode(), "'logprobs'"),
    (json.dumps({"prompt": "a", "response": "b", "logprobs": [_lp("b", float("nan"))]}).encode(),
     "'logprobs[0].logprob'"),
    (json.dumps({"prompt": "a", "response": "b", "logprobs": [_lp("b", "-1")]}).encode(), "'logprobs[0].logprob'"),
    (json.dumps({"prompt": "a", "response": "b", "logprobs": [_lp("b", 0.5)]}).encode(), "'logprobs[0].logprob'"),
    (json.dumps({"prompt": "a", "response": "b", "logprobs": [{"token": "b", "logprob": -1.0}]}).encode(),
     "'logprobs[0].bytes'"),
    (json.dumps({"prompt": "a", "response": "b", "logprobs": [_lp("b", bytes=[300])]}).encode(),
     "'logprobs[0].bytes'"),
    (json.dumps({"prompt": "a", "response": "b", "logprobs": [_lp("b", top_logprobs=[_lp("c", None), 3])]}).encode(),
     "'logprobs[0].top_logprobs[1]'"),
    (json.dumps({"prompt": "a", "response": "b",
                 "logprobs": [_lp("b", top_logprobs=[{"token": "c", "bytes": "c", "logprob": -1}])]}).encode(),
     "'logprobs[0].top_logprobs[0].bytes'"),
]


@st.composite
def mixed_files(draw):
    """(lines as bytes, the good records in order, {1-based line number of each bad line: expected substring})."""
    n = draw(st.integers(1, 8))
    lines, good, bad = [], [], {}
    for _ in range(n):
        if draw(st.booleans()):
            if draw(st.booleans()):
                lines.append(b"   ")  # blank lines are not records (and shift the line numbers)
            rec = draw(good_records())
            lines.append(json.dumps(rec, ensure_ascii=draw(st.booleans())).encode("utf-8"))
            good.append(rec)
        else:
            line, why = BAD_LINES[draw(st.integers(0, len(BAD_LINES) - 1))]
            lines.append(line)
            bad[len(lines)] = why
    return lines, good, bad


def _same(kept: dict, rec: dict) -> bool:
    return {k: v for k, v in kept.items()} == rec


@FAST
@given(mixed_files())
def test_mixed_jsonl_bad_lines_named_or_skipped_and_good_kept_in_order(tmp_path_factory, case):
    lines, good, bad = case
    path = tmp_path_factory.mktemp("mixed") / "t.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    if bad:
        first = min(bad)
        with pytest.raises(DataError) as e:
            load_teacher_records(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{path}:{first}: ") and bad[first] in msg, msg
    if not good:
        with pytest.raises(DataError, match="malformed|empty"):
            load_teacher_records(path, skip_bad=True)
        return
    kept, report = load_teacher_records(path, skip_bad=True)
    assert report.skipped == len(bad) and report.kept == len(good) and report.total == len(good) + len(bad)
    assert all(_same(k, g) for k, g in zip(kept, good)) and len(kept) == len(good)
    assert [r.split(": ")[0] for r in report.reasons] == [f"{path}:{i}" for i in sorted(bad)][:len(report.reasons)]


BAD_PROMPTS = [
    (b'{"prompt": ""}', "'prompt' is empty"),
    (b'{"prompt": 1}', "'prompt'"),
    (b'{"id": 3}', "'prompt'"),
    (b'{"prompt": "a", "id": [1]}', "'id'"),
    (b'{"prompt": "a", "id": true}', "'id'"),
    (b'{"messages": [{"role": "assistant", "content": "x"}]}', "ends with an assistant"),
    (b'{"messages": "hi"}', "'messages'"),
    (b'{"prompt": "\\ud83d"}', "'prompt' is not valid Unicode"),
]


@FAST
@given(st.lists(st.one_of(st.builds(lambda p: {"prompt": p}, nonblank), st.integers(0, len(BAD_PROMPTS) - 1)),
                min_size=1, max_size=8))
def test_prompt_files_bad_lines_named_or_skipped(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    lines = [json.dumps(x).encode() if isinstance(x, dict) else BAD_PROMPTS[x][0] for x in items]
    path.write_bytes(b"\n".join(lines))
    good = [x for x in items if isinstance(x, dict)]
    bad = [(i + 1, BAD_PROMPTS[x][1]) for i, x in enumerate(items) if not isinstance(x, dict)]
    if bad:
        with pytest.raises(DataError) as e:
            load_prompts(path)
        assert str(e.value).startswith(f"{path}:{bad[0][0]}: ") and bad[0][1] in str(e.value), str(e.value)
    if good:
        kept, report = load_prompts(path, skip_bad=True)
        assert [k["prompt"] for k in kept] == [g["prompt"] for g in good] and report.skipped == len(bad)


def test_surrogate_pairs_and_escaped_backslashes_are_fine(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('\ufeff{"prompt": "\\ud83d\\ude00", "response": "\\\\ud800 is text"}\n')  # with a BOM
    recs, _ = load_teacher_records(path)
    assert recs == [{"prompt": "\U0001F600", "response": "\\ud800 is text"}]


def test_json_array_file_names_the_record(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "\\udc00"}]')
    with pytest.raises(DataError, match=r"t\.json: record 1: field 'response' is not valid Unicode"):
        load_teacher_records(path)
    assert load_teacher_records(path, skip_bad=True)[1].skipped == 1
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_teacher_records(path)


def test_enormous_line_is_read_and_its_bad_neighbour_named(tmp_path):
    path = tmp_path / "t.jsonl"
    big = "word " * 400_000  # a 2 MB response
    path.write_text(json.dumps({"prompt": "a", "response": big}) + "\n" + '{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: missing field 'response'"):
        load_teacher_records(path)
    recs, report = load_teacher_records(path, skip_bad=True)
    assert recs[0]["response"] == big and report.skipped == 1


# ---------------------------------------------------------------------------------------------------- Parquet

COLUMN_KINDS = ["string", "int", "float", "list", "struct", "null", "missing"]


@FAST
@given(st.sampled_from(COLUMN_KINDS), st.sampled_from(COLUMN_KINDS), st.integers(1, 5))
def test_parquet_wrong_schema_names_row_and_field(tmp_path_factory, prompt_kind, response_kind, n):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def column(kind):
        return {"string": pa.array([f"x{i}" for i in range(n)]), "int": pa.array(list(range(n))),
                "float": pa.array([0.5] * n), "list": pa.array([["a"]] * n),
                "struct": pa.array([{"a": 1}] * n), "null": pa.array([None] * n, pa.string())}.get(kind)

    cols = {k: column(kind) for k, kind in (("prompt", prompt_kind), ("response", response_kind))
            if column(kind) is not None}
    cols["other"] = pa.array(list(range(n)))
    path = tmp_path_factory.mktemp("pq") / "t.parquet"
    pq.write_table(pa.table(cols), path)
    if prompt_kind == response_kind == "string":
        recs, _ = load_teacher_records(path)
        assert [r["response"] for r in recs] == [f"x{i}" for i in range(n)]
        return
    with pytest.raises(DataError) as e:
        load_teacher_records(path)
    field = "response" if response_kind != "string" else "prompt"
    assert str(e.value).startswith(f"{path}: row 0: ") and f"'{field}'" in str(e.value), str(e.value)
    with pytest.raises(DataError, match=f"all {n} records are malformed"):
        load_teacher_records(path, skip_bad=True)


def test_damaged_parquet_is_a_data_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["p"] * 50, "response": ["r" * 20] * 50}), path, row_group_size=10)
    raw = bytearray(path.read_bytes())
    for at in range(len(raw) // 4, len(raw) // 2, 7):  # damage the data pages, keep the footer
        raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    try:
        recs, _ = load_teacher_records(path)
    except DataError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
    else:  # the damage may land in bytes no page reads back as invalid: then the rows must still be strings
        assert all(isinstance(r["response"], str) for r in recs)


def test_saved_dataset_rows_are_named(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "response": ["x", "", "z"]}).save_to_disk(str(d))
    with pytest.raises(DataError, match=r"ds: row 1: field 'response' is empty"):
        load_teacher_records(d)
    recs, report = load_teacher_records(d, skip_bad=True)
    assert [r["response"] for r in recs] == ["x", "z"] and report.skipped == 1


# ---------------------------------------------------------------------------------------------------- truncation

@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 50), st.integers(0, 50), st.one_of(st.none(), st.integers(1, 60)))
def test_truncation_window_is_the_stated_policy(p, r, m):
    kp, kr = truncation_window(p, r, m)
    if m is None or p + r <= m:
        assert (kp, kr) == (p, r)
        return
    assert kp + kr == m and 0 <= kp <= p and 0 <= kr <= r
    assert kr == min(r, m - min(1, p))  # the response keeps all it can, leaving one prompt token as context
    assert kp >= min(1, p) or kr == 0


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.text(st.sampled_from("ab .x"), max_size=30), st.text(st.sampled_from("ab .x"),
                                                                                    min_size=1, max_size=40),
                          st.sampled_from([None, "stop", "length"])), min_size=1, max_size=4),
       st.integers(2, 24))
def test_tokenize_records_and_targets_dataset_truncate_alike(tiny_tokenizer, recs, max_length):
    """The trainer tokenizes untruncated (its target rows cover whole responses) and truncates per item; Proxy-KD
    tokenizes with max_length: both must give the same tokens and masks."""
    from bayeskd.distillation.targets import TeacherTargetsDataset

    records = [{"prompt": p, "response": r + "!", **({"finish_reason": f} if f else {})} for p, r, f in recs]
    full = tokenize_records(records, tiny_tokenizer)
    cut = tokenize_records(records, tiny_tokenizer, max_length=max_length)
    ds = TeacherTargetsDataset(full, max_length=max_length)
    for i in range(len(records)):
        item = ds[i]
        np.testing.assert_array_equal(item["input_ids"].numpy(), cut.input_ids[i])
        np.testing.assert_array_equal(item["response_mask"].numpy(), cut.response_mask[i])
        assert len(cut.input_ids[i]) <= max_length
        p, r = int(full.prompt_lengths[i]), len(full.input_ids[i]) - int(full.prompt_lengths[i])
        kp, kr = truncation_window(p, r, max_length)
        np.testing.assert_array_equal(cut.input_ids[i], np.concatenate([full.input_ids[i][p - kp:p],
                                                                        full.input_ids[i][p:p + kr]]))
    assert cut.report.response_truncated == sum(
        truncation_window(int(pl), len(ids) - int(pl), max_length)[1] < len(ids) - int(pl)
        for ids, pl in zip(full.input_ids, full.prompt_lengths))


def test_empty_teacher_response_tokenizes_to_eos_only(tiny_tokenizer):
    recs = [{"prompt": "q", "response": "", "finish_reason": "stop"}]
    tok = tokenize_records(recs, tiny_tokenizer, max_length=4)
    r = tok.input_ids[0][tok.response_mask[0]]
    assert r.tolist() == [tiny_tokenizer.eos_token_id]


def test_nan_and_negative_infinity_in_logprobs(tmp_path):
    """-Infinity (and null) mean "not in the top k" and load; NaN never does."""
    path = tmp_path / "t.jsonl"
    ok = {"prompt": "a", "response": "b", "logprobs": [_lp("b", -0.1, top_logprobs=[_lp("c", None)])]}
    path.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "logprobs": [_lp("b", -math.inf)]}) + "\n")
    assert len(load_teacher_records(path)[0]) == 2
