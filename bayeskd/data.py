"""Teacher data: load prompt/response records (JSONL, Parquet, saved HF datasets) and tokenize them.

A record is either `{"prompt": str, "response": str}` or chat `{"messages": [{"role", "content"}, ...]}` whose
last message is the assistant's (the response; everything before it is the prompt); a record with the teacher's
`logprobs` may say which tokenizer they are in (`teacher_tokenizer`, see `same_tokenizer`). Bad input raises
`DataError` naming the file and the line (JSONL, 1-based) or row (Parquet / datasets, 0-based) and the field.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from bayeskd.record_checks import (NATURAL_END, SURROGATE_ESCAPE, CheckedLogprobs, _BadRecord,  # noqa: F401
                                   check_encodable, normalize_prompt, normalize_record)  # re-exported: their home was here
from bayeskd.core.sparse import tokenizer_fingerprint

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_MAGIC = b"PAR1"  # a Parquet file's first bytes: read as Parquet whatever its name
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
TEACHER_TOKENIZER = "teacher_tokenizer"  # record field: the fingerprint of the tokenizer its `logprobs` are in
MAX_REASONS = 5  # how many skip reasons a report keeps


class DataError(ValueError):
    """Malformed or unusable input data; the message names the file, line/row and field."""


@dataclass
class LoadReport:
    """What `load_teacher_records` read: counts, and the first few reasons records were skipped."""
    source: str
    format: str
    total: int = 0
    kept: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "total": self.total, "kept": self.kept,
                "skipped": self.skipped, "reasons": list(self.reasons)}

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access, so code that treats the report as a mapping keeps working."""
        return self.to_dict().get(key, default)


# ----------------------------------------------------------------------------------------------- readers

def _parse_json(text: str, check_unicode: bool = True) -> Any:
    """json.loads, or a `_BadRecord` for anything that is not one valid JSON value (of valid Unicode, with
    `check_unicode`)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return _BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits; nesting deeper than the parser's stack
        return _BadRecord(f"unreadable JSON ({'nested too deeply' if isinstance(e, RecursionError) else e})")
    if check_unicode and SURROGATE_ESCAPE.search(text):
        try:
            check_encodable(obj)
        except _BadRecord as e:
            return e
    return obj


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed object or _BadRecord) per non-blank line; read line by line to name the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:  # a byte-order mark (some Windows editors write one) is not part of the first record
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", _BadRecord(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            yield f"{path}:{lineno}", _parse_json(line)


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    data = _parse_json(text, check_unicode=False)
    if isinstance(data, _BadRecord):
        raise DataError(f"{path}: {data}")
    surrogates = SURROGATE_ESCAPE.search(text) is not None
    for i, rec in enumerate(data):
        if surrogates:  # checked per record, so one bad record is named (and can be skipped)
            try:
                check_encodable(rec)
            except _BadRecord as e:
                rec = e
        yield f"{path}: record {i}", rec


def _one_line(e: BaseException) -> str:
    """A library's error message on one line (pyarrow's and datasets' may span several)."""
    return " ".join(str(e).split())


def _iter_rows(rows: Iterable[Any], where: str) -> Iterator[tuple[str, Any]]:
    """(location, row) per row of a table; a damaged Parquet page / arrow file is a `DataError`."""
    return _guarded(((f"{where}: row {i}", rec) for i, rec in enumerate(rows)), where)


def _guarded(items: Iterator[tuple[str, Any]], where: str) -> Iterator[tuple[str, Any]]:
    """`items`, with a library error met while reading (a damaged page) as a `DataError` naming the file."""
    it, i = iter(items), 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types
            raise DataError(f"{where}: row {i}: cannot read the file from here on "
                            f"({type(e).__name__}: {_one_line(e)})") from e
        yield item
        i += 1


def _parquet_items(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a Parquet file: bayeskd's columnar records (`bayeskd.record_parquet`, logprobs read column-wise),
    or any other table whose columns are record fields (each row a dict), streamed batch by batch."""
    import pyarrow.parquet as pq

    from bayeskd.record_parquet import check_schema, is_records_parquet, iter_parquet_records

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read as Parquet ({_one_line(e)})") from e
    if is_records_parquet(pf.schema_arrow):
        try:
            check_schema(pf.schema_arrow, str(path))
        except ValueError as e:
            raise DataError(str(e)) from None
        return _guarded(iter_parquet_records(pf, str(path)), str(path))
    # stream, so a large file is never held as one list
    return _iter_rows((row for batch in pf.iter_batches(batch_size=4096) for row in batch.to_pylist()), str(path))


def _dataset_rows(path: Path, split: str) -> tuple[Iterable[dict], str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: a directory, but not a dataset saved with datasets.save_to_disk "
                        f"({_one_line(e)})") from e
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}' (available: {', '.join(sorted(ds))})")
        ds, where = ds[split], f"{path}[{split}]"
    return ds, where


def _hub_rows(name: str, split: str) -> Iterable[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{name}: no such file or directory, and loading it as a Hugging Face dataset "
                        f"(split '{split}') failed: {_one_line(e)}") from e


def _input_items(path_or_name: str | os.PathLike, split: str) -> tuple[Iterator[tuple[str, Any]], str]:
    """(location, record) pairs of JSONL, Parquet, a `save_to_disk` directory or a hub dataset, and the format."""
    path = Path(path_or_name)
    if path.is_dir():
        rows, where = _dataset_rows(path, split)
        return _iter_rows(rows, where), "dataset"
    if path.is_file():
        suffix = path.suffix.lower()
        with open(path, "rb") as f:
            first = f.read(64)
        if suffix in PARQUET_SUFFIXES or first.startswith(PARQUET_MAGIC):
            return _parquet_items(path), "parquet"
        if suffix in JSONL_SUFFIXES or suffix == "":
            first = first.lstrip()
            # A .json file holding one array is accepted too; everything else is read as JSON lines.
            if suffix == ".json" and first.startswith(b"["):
                return _iter_json_array(path), "json"
            return _iter_jsonl(path), "jsonl"
        raise DataError(f"{path}: unknown file type '{suffix}' (expected .jsonl, .json, .parquet "
                        "or a directory saved with datasets.save_to_disk)")
    if str(path_or_name).startswith((".", "/", "~")) or str(path_or_name).endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
        raise DataError(f"{path_or_name}: no such file or directory")
    return _iter_rows(_hub_rows(str(path_or_name), split), f"{path_or_name}[{split}]"), "hub"


def _checked(items: Iterator[tuple[str, Any]], report: LoadReport, skip_bad: bool, normalize,
             what: str) -> Iterator[Any]:
    """Each record of `items` checked with `normalize`, counted in `report` as it goes; the checks that need the
    whole input (empty, all bad) raise when it ends."""
    for where, rec in items:
        report.total += 1
        try:
            if isinstance(rec, _BadRecord):
                raise rec
            checked = normalize(rec)
        except _BadRecord as e:
            if not skip_bad:
                raise DataError(f"{where}: {e}") from None
            report.skipped += 1
            if len(report.reasons) < MAX_REASONS:
                report.reasons.append(f"{where}: {e}")
            continue
        report.kept += 1
        yield checked
    if report.total == 0:
        raise DataError(f"{report.source}: no {what} (the input is empty)")
    if not report.kept:
        raise DataError(f"{report.source}: all {report.total} {what} are malformed; first: {report.reasons[0]}")
    if report.skipped:
        logger.warning("%s: skipped %d of %d malformed records (first: %s)", report.source, report.skipped,
                       report.total, report.reasons[0])


def _load(path_or_name: str | os.PathLike, split: str, skip_bad: bool, normalize,
          what: str) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read `path_or_name`, check each record with `normalize`; see `load_teacher_records`."""
    items, fmt = _input_items(path_or_name, split)
    report = LoadReport(source=str(path_or_name), format=fmt)
    return list(_checked(items, report, skip_bad, normalize, what)), report


def _checked_as_read(rec: Any) -> Any:
    normalize_record(rec)
    return rec


def load_teacher_records(path_or_name: str | os.PathLike, split: str = "train", skip_bad: bool = False,
                         as_read: bool = False) -> tuple[list[dict[str, Any]], LoadReport]:
    """Load and validate teacher records from JSONL, Parquet (any table of record fields, or the columnar records
    of `bayeskd.record_parquet`, whose `logprobs` are read column-wise), a `save_to_disk` directory or a hub
    dataset.

    With `skip_bad`, malformed records are skipped and counted in the report instead of raising. An input
    with no records, or with every record bad, is always an error. `as_read`: each record checked but kept as it
    was read (null fields and extra message keys too), as `bayeskd.records.convert_records` copies them.
    """
    return _load(path_or_name, split, skip_bad, _checked_as_read if as_read else normalize_record, "records")


def iter_teacher_records(path_or_name: str | os.PathLike, split: str = "train", skip_bad: bool = False,
                         as_read: bool = False) -> tuple[Iterator[dict[str, Any]], LoadReport]:
    """`load_teacher_records` one record at a time, for inputs larger than memory: the records (checked as it checks
    them) and the report, which fills in as they are read and is complete once the iterator is exhausted (an empty
    or all-bad input raises `DataError` then)."""
    items, fmt = _input_items(path_or_name, split)
    report = LoadReport(source=str(path_or_name), format=fmt)
    return _checked(items, report, skip_bad, _checked_as_read if as_read else normalize_record, "records"), report


def load_prompts(path_or_name: str | os.PathLike, split: str = "train",
                 skip_bad: bool = False) -> tuple[list[dict[str, Any]], LoadReport]:
    """Load prompt records ({"prompt"} or chat {"messages"}, optional "id") from the same sources as
    `load_teacher_records`; bad records raise `DataError` naming the file and line, or are skipped."""
    return _load(path_or_name, split, skip_bad, normalize_prompt, "prompts")


# ----------------------------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | os.PathLike):
    """`AutoTokenizer.from_pretrained(path)` with a clear error when `path` is not a tokenizer."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.exists() and str(path).startswith((".", "/", "~")):
        raise DataError(f"{path}: tokenizer directory does not exist")
    if p.is_file():
        raise DataError(f"{path}: is a file; pass the directory holding the tokenizer files")
    if p.is_dir() and not any((p / f).exists() for f in TOKENIZER_FILES):
        raise DataError(f"{path}: not a tokenizer directory (none of {', '.join(TOKENIZER_FILES)} in it)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError... for bad input
        what = "a local directory without a usable tokenizer" if p.is_dir() else \
            "not a local directory, and loading it as a Hugging Face hub id failed"
        raise DataError(f"{path}: {what} ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------- tokenization

@dataclass
class TokenizeReport:
    records: int = 0
    tokens: int = 0
    response_tokens: int = 0
    prompt_truncated: int = 0  # records whose prompt lost tokens on the left
    response_truncated: int = 0  # records whose response alone was longer than max_length
    response_tokens_dropped: int = 0
    teacher_tokens: int = 0  # records whose response tokens are the teacher's own (from its logprobs' bytes)
    noncanonical: int = 0  # of those, records the tokenizer would have tokenized otherwise
    no_fingerprint: int = 0  # records with logprobs that do not say their tokenizer: re-tokenized
    other_fingerprint: int = 0  # records with logprobs of another tokenizer: re-tokenized
    no_eos: int = 0  # records cut off (finish_reason "length", ...): no EOS appended

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class TokenizedData:
    """Token sequences of prompt+response, with the response positions marked.

    `response_mask[i][t]` is True when `input_ids[i][t]` is a response token (including the appended EOS):
    those are the tokens whose next-token distribution, predicted at position t-1, the prior/posterior
    estimate. Responses are always the tail of a sequence: `response_mask[i] == arange(L) >= prompt_lengths[i]`.
    """
    input_ids: list[np.ndarray]  # int32 [L_i]
    response_mask: list[np.ndarray]  # bool [L_i]
    prompt_lengths: np.ndarray  # int32 [N]
    tokenizer_fingerprint: str
    vocab_size: int
    eos_token_id: int | None = None
    report: TokenizeReport = field(default_factory=TokenizeReport)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def fingerprint(self) -> str:
        """Alias of `tokenizer_fingerprint`."""
        return self.tokenizer_fingerprint

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def response_sequences(self) -> list[np.ndarray]:
        """The response tokens of each record (views), e.g. to count the n-gram prior on teacher text."""
        return [ids[int(p):] for ids, p in zip(self.input_ids, self.prompt_lengths)]

    def prompt_sequences(self) -> list[np.ndarray]:
        """The prompt ids of every record (the context before its response)."""
        return [ids[:int(p)] for ids, p in zip(self.input_ids, self.prompt_lengths)]


_TOKENIZED: "OrderedDict[tuple, tuple[TokenizedData, LoadReport]]" = OrderedDict()  # load_tokenized_records
_TOKENIZED_KEEP = 2


def load_tokenized_records(data: str | os.PathLike, tokenizer, split: str = "train",
                           skip_bad: bool = False) -> tuple[TokenizedData, LoadReport]:
    """`tokenize_records(load_teacher_records(data))` with its load report, remembered for the last two local
    files (keyed by path, size, modification time, split and the tokenizer): a process that trains many students
    on one file (the lab: ~25 students on records whose top-20 log-probabilities take seconds to parse and check)
    reads it once. A changed file is read again. The result is shared between callers: read-only."""
    key = None
    path = Path(os.fspath(data)).expanduser()
    if path.is_file():
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, split, skip_bad, type(tokenizer).__name__,
               tokenizer_fingerprint(tokenizer), getattr(tokenizer, "eos_token_id", None),
               str(getattr(tokenizer, "chat_template", None)))
        if key in _TOKENIZED:
            _TOKENIZED.move_to_end(key)
            return _TOKENIZED[key]
    records, report = load_teacher_records(data, split=split, skip_bad=skip_bad)
    out = (tokenize_records(records, tokenizer), report)
    if key is not None:
        _TOKENIZED[key] = out
        while len(_TOKENIZED) > _TOKENIZED_KEEP:
            _TOKENIZED.popitem(last=False)
    return out


def truncation_window(prompt_len: int, response_len: int, max_length: int | None) -> tuple[int, int]:
    """THE truncation policy of bayeskd, for every stage that fits a record into `max_length` tokens
    (`tokenize_records`, `TeacherTargetsDataset`, hence distill, align-proxy and the lab): (prompt tokens kept,
    response tokens kept). A record that fits is kept whole. Otherwise the response (+ EOS) keeps its first
    `max_length - 1` tokens (all of `max_length` when there is no prompt), cut from the right, so its kept
    tokens still follow the teacher's context; the prompt fills what is left, cut from the left (the text nearest
    the response stays). Kept prompt tokens are the last `prompt kept`, kept response tokens the first
    `response kept`. GAD budgets prompt and response separately (`max_prompt_tokens`, `max_new_tokens`) and cuts
    in the same directions; estimate-prior/-posterior never truncate (their rows cover every response token)."""
    if max_length is None or prompt_len + response_len <= max_length:
        return prompt_len, response_len
    keep_r = min(response_len, max_length - min(1, prompt_len))  # one prompt token gives the response a context
    return min(prompt_len, max_length - keep_r), keep_r


def _batch_encode(tokenizer, texts: list[str], add_special_tokens: bool, desc: str,
                  batch_size: int = 1024) -> list[list[int]]:
    """The tokenizer's batch call in chunks (fast tokenizers parallelize each chunk), with a progress bar
    for large inputs."""
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    starts = range(0, len(texts), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=len(texts) < 20 * batch_size, leave=False):
        enc = tokenizer(texts[s:s + batch_size], add_special_tokens=add_special_tokens,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
        out.extend(enc["input_ids"])
    return out


def render_prompt(record: dict[str, Any], tokenizer) -> str:
    """The prompt text of a record: the prompt itself, or the chat template over every message but the last,
    ending with the generation prompt (what the model sees before the assistant's answer)."""
    if "messages" not in record:
        return record["prompt"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat 'messages' records need a tokenizer with a chat template; this one has none "
                        "(set tokenizer.chat_template or convert the data to 'prompt'/'response')")
    return tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=False)


def same_tokenizer(record: dict[str, Any], fingerprint: str) -> bool:
    """Whether a record's `logprobs` are tokens of the tokenizer with this fingerprint (its `teacher_tokenizer`
    field, `bayeskd.core.sparse.tokenizer_fingerprint`). A record without the field is of an unknown tokenizer, so not
    this one, whatever its tokens look like: a tokenizer whose vocabulary contains the teacher's pieces may still
    split text otherwise, so only the fingerprint (the same vocabulary) makes the teacher's splits ones the
    student would produce."""
    return record.get(TEACHER_TOKENIZER) == fingerprint


def _teacher_ids(rec: dict[str, Any], response: str, id_of: dict[bytes, int]) -> list[int] | None:
    """The teacher's own tokens of a record, as student ids, when its `logprobs` spell the response (exactly, or
    but for partial characters) and every token is one student token; None otherwise (then the text is
    re-tokenized). Callers ask only for records of the student's tokenizer (`same_tokenizer`)."""
    lps = rec.get("logprobs")
    if isinstance(lps, CheckedLogprobs):  # read column-wise (Parquet): no per-token dicts
        pieces = lps.token_bytes()
    elif not isinstance(lps, list):
        return None
    else:
        try:
            pieces = [bytes(e["bytes"]) for e in lps]
        except (TypeError, ValueError, KeyError):
            return None  # malformed logprobs: the evidence rows name the record
    spelled = b"".join(pieces)
    if spelled != response.encode("utf-8") and spelled.decode("utf-8", "replace") != response:
        return None  # (a character the teacher left partial reads as U+FFFD in the text: its bytes are the truth)
    ids = [id_of.get(b, -1) for b in pieces]
    return None if -1 in ids else ids


def tokenize_records(records: list[dict[str, Any]], tokenizer, max_length: int | None = None,
                     add_eos: bool = True, teacher_tokens: bool = True) -> TokenizedData:
    """Tokenize records into prompt tokens + response tokens (+ EOS) with a response mask.

    The observed tokens must be the teacher's own (they are samples of the distribution every stage estimates):
    - Prompt and response are tokenized separately and concatenated, as the teacher saw its prompt and
      generated after it (a merge across the boundary is never formed).
    - `teacher_tokens`: a record whose `logprobs` (from `generate --top-logprobs`) are of this tokenizer (its
      `teacher_tokenizer` fingerprint is this one's, `same_tokenizer`) and spell the response keeps the teacher's
      tokens, also where the teacher sampled a split the tokenizer would not make (re-tokenizing would put tokens
      the teacher never produced in its place). A record of another tokenizer, or one that does not say (an
      unknown tokenizer: `generate --teacher-tokenizer` names it for APIs that do not report it), is
      re-tokenized, even when its pieces all are tokens of this vocabulary, and its evidence is mapped as lower
      bounds (`bayeskd.posterior.evidence`); both are counted in the report (`no_fingerprint`,
      `other_fingerprint`), the first with a warning.
    - EOS (with `add_eos`) only ends a response that ended itself: `finish_reason` absent, "stop" (or "eos",
      "eos_token", "end_turn"); one cut off by the length limit ("length") or otherwise gets none.
    - `prompt`/`response` records: the prompt gets the tokenizer's special tokens (e.g. BOS), as
      `tokenizer(prompt)` would; the response gets none.
    - `messages` records: the prompt is `apply_chat_template(messages[:-1], add_generation_prompt=True,
      tokenize=False)`, tokenized without special tokens (templates write their own BOS); the response is the
      assistant content. The template's own end-of-turn text is not added; EOS is (with `add_eos`).
    - `max_length`: `truncation_window` (the prompt cut from the left; a response that does not fit alone cut
      from the right, keeping one prompt token for context when there is one); counted in the report.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    records = list(records)
    if not records:
        raise DataError("no records to tokenize")
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        logger.warning("tokenizer has no EOS token; responses are not terminated")

    chat = ["messages" in r for r in records]
    prompts = [render_prompt(r, tokenizer) for r in records]
    responses = [r["messages"][-1]["content"] if c else r["response"] for r, c in zip(records, chat)]
    # Two batch calls for the prompts (with / without special tokens), keeping the record order.
    plain_idx = [i for i, c in enumerate(chat) if not c]
    chat_idx = [i for i, c in enumerate(chat) if c]
    prompt_ids: list[list[int]] = [[] for _ in records]
    for idx, special in ((plain_idx, True), (chat_idx, False)):
        if idx:
            for i, ids in zip(idx, _batch_encode(tokenizer, [prompts[i] for i in idx], special, "prompts")):
                prompt_ids[i] = ids
    response_ids = _batch_encode(tokenizer, responses, False, "responses")

    report = TokenizeReport(records=len(records))
    fingerprint = tokenizer_fingerprint(tokenizer)
    with_logprobs = [r for r in records if r.get("logprobs") is not None]
    report.no_fingerprint = sum(r.get(TEACHER_TOKENIZER) is None for r in with_logprobs)
    report.other_fingerprint = len(with_logprobs) - report.no_fingerprint - sum(
        same_tokenizer(r, fingerprint) for r in with_logprobs)
    if report.no_fingerprint:
        logger.warning("%d of %d records with logprobs do not say which tokenizer produced them ('%s'): their "
                       "tokens are re-tokenized and their log-probabilities used as lower bounds. If the teacher's "
                       "tokenizer is the student's, name it: generate --teacher-tokenizer PATH_OR_NAME",
                       report.no_fingerprint, len(with_logprobs), TEACHER_TOKENIZER)
    if teacher_tokens and len(with_logprobs) > report.no_fingerprint + report.other_fingerprint:
        from bayeskd.token_bytes import cached_bytes_to_id

        id_of = cached_bytes_to_id(tokenizer, fingerprint)
        for i, rec in enumerate(records):
            own = _teacher_ids(rec, responses[i], id_of) if same_tokenizer(rec, fingerprint) else None
            if own is not None:
                report.teacher_tokens += 1
                report.noncanonical += own != response_ids[i]
                response_ids[i] = own
    input_ids, masks, plens = [], [], np.empty(len(records), dtype=np.int32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ended = records[i].get("finish_reason") in NATURAL_END
        report.no_eos += not ended
        r = np.asarray(r + ([eos] if eos is not None and ended else []), dtype=np.int32)
        p = np.asarray(p, dtype=np.int32)
        keep_p, keep_r = truncation_window(len(p), len(r), max_length)
        if keep_r < len(r):
            report.response_truncated += 1
            report.response_tokens_dropped += len(r) - keep_r
            r = r[:keep_r]
        if keep_p < len(p):
            report.prompt_truncated += 1
            p = p[len(p) - keep_p:]
        ids = np.concatenate([p, r])
        input_ids.append(ids)
        masks.append(np.arange(len(ids)) >= len(p))
        plens[i] = len(p)
        report.tokens += len(ids)
        report.response_tokens += len(r)
    if report.response_truncated:
        logger.warning("%d responses were longer than max_length=%d and were truncated (%d tokens dropped)",
                       report.response_truncated, max_length, report.response_tokens_dropped)
    return TokenizedData(input_ids, masks, plens, fingerprint, len(tokenizer),
                         tokenizer.eos_token_id, report)
