"""Teacher records in columnar Parquet: the compact form of records with log-probabilities at scale.

One row per record. Text columns `key`, `prompt`, `response`, `finish_reason`, `teacher_tokenizer` (each null where
the record has no such string field), `extra` (every other field as one JSON object: messages, id, settings, usage,
...), and the `logprobs` as list columns: per generated token `token_bytes` (binary), `token` (string, null where it
is the bytes read as UTF-8), `logprob`, and per token its alternatives `top_bytes`, `top_token`, `top_logprob`
(null where an entry has no `top_logprobs`). Token strings and bytes are dictionary-encoded and every column
zstd-compressed, so a token costs a few bits of index instead of ~70 bytes of JSON per alternative.

`logprob` columns are float32 when every value of the file is a float32 value (what teachers compute: the hf
backend, vLLM), else float64, so a JSONL -> Parquet -> JSONL round trip gives equal records as parsed dicts;
`float32=True` rounds to float32 anyway (~2x smaller; values then differ from the JSONL's in the low bits).
Logprobs of an unusual shape (extra keys, a null `top_logprobs`) stay in `extra` as JSON: still lossless.

Read by `bayeskd.data.load_teacher_records` (a Parquet file whose schema metadata carries `FORMAT_KEY`): each record's
`logprobs` is a `CheckedLogprobs` over the batch's columns, checked column-wise, so `tokenize_records` reads the
sampled tokens' bytes without building a dict per token; the evidence rows build the dicts when they need them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from bayeskd.record_checks import LOGPROB_TOL, CheckedLogprobs, _BadRecord

FORMAT_KEY = b"bayeskd.records"
FORMAT_VERSION = b"1"
TEXT = ("key", "prompt", "response", "finish_reason", "teacher_tokenizer")  # string fields promoted to columns
LIST1 = ("token_bytes", "token", "logprob")
LIST2 = ("top_bytes", "top_token", "top_logprob")
_ENTRY = {"token", "bytes", "logprob"}
BATCH = 2048  # records per written row batch / read batch
_WRITER = dict(compression="zstd", compression_level=9, use_dictionary=True, write_statistics=False)


def _schema(float_type):
    import pyarrow as pa

    return pa.schema(
        [pa.field(k, pa.string()) for k in TEXT] + [pa.field("extra", pa.string(), nullable=False)]
        + [pa.field("token_bytes", pa.list_(pa.binary())), pa.field("token", pa.list_(pa.string())),
           pa.field("logprob", pa.list_(float_type)),
           pa.field("top_bytes", pa.list_(pa.list_(pa.binary()))),
           pa.field("top_token", pa.list_(pa.list_(pa.string()))),
           pa.field("top_logprob", pa.list_(pa.list_(float_type)))],
        metadata={FORMAT_KEY: FORMAT_VERSION})


def _entry_ok(e: Any) -> bool:
    if not isinstance(e, dict) or not isinstance(e.get("token"), str) or not isinstance(e.get("bytes"), list):
        return False
    v = e.get("logprob", 0)
    return "logprob" in e and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))


def _columnar(lps: Any) -> bool:
    """Whether a record's logprobs fit the columns exactly (else they stay in `extra`, as JSON)."""
    if not isinstance(lps, list):
        return False
    for e in lps:
        if not _entry_ok(e) or not set(e) <= _ENTRY | {"top_logprobs"}:
            return False
        if "top_logprobs" in e:
            top = e["top_logprobs"]
            if not isinstance(top, list) or not all(_entry_ok(a) and set(a) == _ENTRY for a in top):
                return False
    return True


def _token_or_none(token: str, b: bytes) -> str | None:
    """The token string, or None where it is its bytes read as UTF-8 (the reader restores it)."""
    try:
        return None if b.decode("utf-8") == token else token
    except UnicodeDecodeError:
        return token


def _f32_exact(values: Iterable[float | None]) -> bool:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    with np.errstate(over="ignore"):
        return bool(np.all((v.astype(np.float32).astype(np.float64) == v) | np.isnan(v)))


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {k: rec[k] if isinstance(rec.get(k), str) else None for k in TEXT}
    lps = rec.get("logprobs")
    columnar = _columnar(lps)
    extra = {k: v for k, v in rec.items() if not (k in TEXT and row[k] is not None) and
             not (k == "logprobs" and columnar)}
    row["extra"] = json.dumps(extra, ensure_ascii=False, separators=(",", ":"))
    if columnar:
        tb = [bytes(e["bytes"]) for e in lps]
        row.update(token_bytes=tb, token=[_token_or_none(e["token"], b) for e, b in zip(lps, tb)],
                   logprob=[e["logprob"] for e in lps])
        tops = [e.get("top_logprobs") for e in lps]
        tbs = [None if t is None else [bytes(a["bytes"]) for a in t] for t in tops]
        row.update(top_bytes=tbs,
                   top_token=[None if t is None else [_token_or_none(a["token"], b) for a, b in zip(t, bs)]
                              for t, bs in zip(tops, tbs)],
                   top_logprob=[None if t is None else [a["logprob"] for a in t] for t in tops])
    else:
        row.update({k: None for k in LIST1 + LIST2})
    return row


class _Inexact(Exception):
    """A log-probability that float32 does not hold exactly (the file is then written in float64)."""


def _write_rows(records: Iterable[dict[str, Any]], path: str | Path, float32: bool, exact: bool) -> None:
    """Write `records` in batches of BATCH rows, so memory does not grow with the file. `exact`: raise `_Inexact`
    at the first batch with a log-probability that float32 changes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(pa.float32() if float32 else pa.float64())
    with pq.ParquetWriter(str(path), schema, **_WRITER) as w:
        for part in _batched(records, BATCH):
            rows = [_row(r) for r in part]
            if exact and not (_f32_exact(v for r in rows if r["logprob"] is not None for v in r["logprob"])
                              and _f32_exact(v for r in rows if r["top_logprob"] is not None
                                             for t in r["top_logprob"] if t is not None for v in t)):
                raise _Inexact
            w.write_batch(pa.record_batch([pa.array([r[f.name] for r in rows], type=f.type) for f in schema],
                                          schema=schema))


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    part: list[Any] = []
    for item in items:
        part.append(item)
        if len(part) == n:
            yield part
            part = []
    if part:
        yield part


def write_parquet_records(records: Iterable[dict[str, Any]] | Callable[[], Iterable[dict[str, Any]]],
                          path: str | Path, float32: bool | None = None) -> None:
    """Write records (as parsed from JSONL) to `path` in the columnar form (module doc), streamed: `records` is a
    list, or a callable that returns a fresh iterator of them (records larger than memory). `float32`: None picks
    float32 when it is exact for every log-probability, else float64 (the records are then read a second time,
    from the start, once the first inexact value shows); True always rounds to float32."""
    fresh = records if callable(records) else (lambda: records)
    if float32 is None:
        try:
            return _write_rows(fresh(), path, float32=True, exact=True)
        except _Inexact:
            float32 = False
    _write_rows(fresh(), path, float32=bool(float32), exact=False)


def write_parquet_head(src: str | Path, dst: str | Path, n: int) -> int:
    """Copy the first `n` rows of the records file `src` (this format) to `dst` with its schema and metadata (its
    float type included): what `load_teacher_records` reads from `src`, cut to `n` records, never re-encoded through
    Python objects. Returns the rows written."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(src))
    if not is_records_parquet(pf.schema_arrow):
        raise ValueError(f"{src}: not a bayeskd records Parquet file (no {FORMAT_KEY.decode()} in its metadata)")
    left = n
    with pq.ParquetWriter(str(dst), pf.schema_arrow, **_WRITER) as w:
        for batch in pf.iter_batches(batch_size=BATCH):
            if left <= 0:
                break
            w.write_batch(batch.slice(0, left))
            left -= min(left, batch.num_rows)
    return n - left


def is_records_parquet(schema) -> bool:
    """Whether an Arrow schema is this module's format (its metadata says so)."""
    return bool(schema.metadata) and FORMAT_KEY in schema.metadata


def check_schema(schema, where: str) -> None:
    """Raise ValueError naming the first missing or mistyped column of a file that says it is in this format."""
    import pyarrow as pa

    version = schema.metadata.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: records format version {version!r} is not this version's "
                         f"({FORMAT_VERSION.decode()})")
    for ft in (pa.float32(), pa.float64()):
        want = _schema(ft)
        if all(n in schema.names and schema.field(n).type == want.field(n).type for n in want.names):
            return
    want = _schema(pa.float32())
    for name in want.names:
        if name not in schema.names:
            raise ValueError(f"{where}: column '{name}' is missing (a bayeskd records file has "
                             f"{', '.join(want.names)})")
        got = schema.field(name).type
        if got != want.field(name).type and not (name.endswith("logprob") and got == _schema(pa.float64()).field(
                name).type):
            raise ValueError(f"{where}: column '{name}' has type {got}, expected {want.field(name).type}")


class _Batch:
    """One read batch's columns; per-token Python objects are built once per batch, only when asked for."""

    def __init__(self, batch):
        self.batch = batch
        self._bytes: list[bytes] | None = None

    def col(self, name: str):
        return self.batch.column(name)

    def flat_bytes(self) -> list[bytes]:
        if self._bytes is None:
            self._bytes = self.col("token_bytes").flatten().to_pylist()
        return self._bytes


class ParquetLogprobs(CheckedLogprobs):
    """One record's logprobs over its batch's columns (row `row`; its tokens are `start:end` of the flat ones)."""

    __slots__ = ("_b", "_row", "_start", "_end")

    def __init__(self, b: _Batch, row: int, start: int, end: int):
        self._b, self._row, self._start, self._end = b, row, start, end

    def __len__(self) -> int:
        return self._end - self._start

    def token_bytes(self) -> list[bytes]:
        return self._b.flat_bytes()[self._start:self._end]

    def to_list(self) -> list[dict[str, Any]]:
        col, r = self._b.col, self._row
        tb = self.token_bytes()
        tok, lp = col("token")[r].as_py(), col("logprob")[r].as_py()
        tbs, tts, tlp = col("top_bytes")[r].as_py(), col("top_token")[r].as_py(), col("top_logprob")[r].as_py()
        out = []
        for p, b in enumerate(tb):
            e = {"token": b.decode("utf-8") if tok[p] is None else tok[p], "bytes": list(b), "logprob": lp[p]}
            if tbs[p] is not None:
                e["top_logprobs"] = [{"token": ab.decode("utf-8") if at is None else at, "bytes": list(ab),
                                      "logprob": av} for ab, at, av in zip(tbs[p], tts[p], tlp[p])]
            out.append(e)
        return out


def _lengths(arr) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _bad_values(arr) -> np.ndarray:
    """Indices (into the flat values) of NaN or positive log-probabilities (null is "not in the top k": fine)."""
    v = arr.to_numpy(zero_copy_only=False).astype(np.float64)
    null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(len(v), bool)
    return np.nonzero((np.isnan(v) & ~null) | (v > LOGPROB_TOL))[0]


def _check_batch(b: _Batch) -> tuple[dict[int, str], np.ndarray]:
    """(reason per bad row, flat start offset of each row's tokens) of one batch, checked column-wise."""
    bad: dict[int, str] = {}
    n = b.batch.num_rows
    lens = {k: _lengths(b.col(k)) for k in LIST1}
    for k in ("token", "logprob"):
        for r in np.nonzero(lens[k] != lens["token_bytes"])[0].tolist():
            bad.setdefault(r, f"column '{k}' has {lens[k][r]} entries where 'token_bytes' has "
                              f"{lens['token_bytes'][r]} (-1: null)")
    starts = np.concatenate([[0], np.cumsum(np.maximum(lens["token_bytes"], 0))])
    pos_row = np.repeat(np.arange(n), np.maximum(lens["token_bytes"], 0))  # flat token -> row
    lp = b.col("logprob").flatten()
    if len(lp) == len(pos_row):
        for i in _bad_values(lp).tolist():
            r = int(pos_row[i])
            bad.setdefault(r, f"field 'logprobs[{i - starts[r]}].logprob' must be a log-probability (<= 0), "
                              f"got {lp[i].as_py()!r}")
    top_lens = {k: _lengths(b.col(k)) for k in LIST2}
    for k in ("top_bytes", "top_token", "top_logprob"):
        for r in np.nonzero(top_lens[k] != lens["token_bytes"])[0].tolist():
            bad.setdefault(r, f"column '{k}' has {top_lens[k][r]} entries where 'token_bytes' has "
                              f"{lens['token_bytes'][r]} (-1: null)")
    inner = {k: _lengths(b.col(k).flatten()) for k in LIST2}
    if not bad and len(inner["top_bytes"]) == len(pos_row):
        for k in ("top_token", "top_logprob"):
            for i in np.nonzero(inner[k] != inner["top_bytes"])[0].tolist():
                r = int(pos_row[i])
                bad.setdefault(r, f"column '{k}' at logprobs[{i - starts[r]}] has {inner[k][i]} alternatives "
                                  f"where 'top_bytes' has {inner['top_bytes'][i]}")
        tlp = b.col("top_logprob").flatten()
        alt_pos = np.repeat(np.arange(len(inner["top_bytes"])), np.maximum(inner["top_bytes"], 0))
        alt_start = np.concatenate([[0], np.cumsum(np.maximum(inner["top_bytes"], 0))])
        flat = tlp.flatten()
        if len(flat) == len(alt_pos):
            for j in _bad_values(flat).tolist():
                i = int(alt_pos[j])
                r = int(pos_row[i])
                bad.setdefault(r, f"field 'logprobs[{i - starts[r]}].top_logprobs[{j - alt_start[i]}].logprob' "
                                  f"must be a log-probability (<= 0), got {flat[j].as_py()!r}")
    return bad, starts


def iter_parquet_records(pf, where: str) -> Iterator[tuple[str, Any]]:
    """(location, record or `_BadRecord`) per row of an open `pyarrow.parquet.ParquetFile` in this format."""
    i = 0
    for batch in pf.iter_batches(batch_size=BATCH):
        b = _Batch(batch)
        bad, starts = _check_batch(b)
        cols = {k: batch.column(k).to_pylist() for k in TEXT + ("extra",)}
        has_lp = batch.column("token_bytes").is_valid().to_numpy(zero_copy_only=False)
        for r in range(batch.num_rows):
            loc = f"{where}: row {i}"
            i += 1
            if r in bad:
                yield loc, _BadRecord(bad[r])
                continue
            try:
                rec = json.loads(cols["extra"][r])
            except (json.JSONDecodeError, TypeError) as e:
                yield loc, _BadRecord(f"column 'extra' is not a JSON object ({e})")
                continue
            if not isinstance(rec, dict):
                yield loc, _BadRecord(f"column 'extra' is not a JSON object (got {type(rec).__name__})")
                continue
            for k in TEXT:
                if cols[k][r] is not None:
                    rec[k] = cols[k][r]
            if has_lp[r]:
                if "logprobs" in rec:
                    yield loc, _BadRecord("record has 'logprobs' both in column 'extra' and in the logprob columns")
                    continue
                rec["logprobs"] = ParquetLogprobs(b, r, int(starts[r]), int(starts[r + 1]))
            yield loc, rec


def plain_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A record read from Parquet as the JSONL form's dict (its logprobs as a list of dicts)."""
    lps = rec.get("logprobs")
    return {**rec, "logprobs": lps.to_list()} if isinstance(lps, CheckedLogprobs) else rec

