"""Checks of one input record (teacher record or prompt), without its location: each raises `_BadRecord` with the
reason and the field; `bayeskd.data` adds the file:line (or row) and turns it into a `DataError`, or skips and
counts the record under `--skip-bad`. Everything a later stage relies on is checked here, at load time, so a bad
record is named where it was read (and can be skipped), never met later as a traceback or silently ignored.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

NATURAL_END = (None, "stop", "eos", "eos_token", "end_turn")  # finish reasons of a response that ended itself
LOGPROB_TOL = 1e-6  # as bayeskd.posterior.evidence: a log-probability may exceed 0 by rounding, not more
# A JSON escape of a UTF-16 surrogate: the only way invalid Unicode gets into a parsed str (a lone one cannot be
# encoded as UTF-8, so it would fail later, in tokenizers, fingerprints or written outputs).
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
FINGERPRINT = re.compile(r"[0-9a-f]{64}")  # bayeskd.core.sparse.tokenizer_fingerprint: a sha256 in hex


class _BadRecord(Exception):
    """Internal: one record is malformed (the reason, without its location)."""


class CheckedLogprobs:
    """A record's `logprobs` held outside Python dicts (columnar Parquet, `bayeskd.record_parquet`), checked where
    they were read: `token_bytes()` gives the sampled tokens' bytes without building per-token objects,
    `to_list()` the list of {token, bytes, logprob, top_logprobs} dicts the JSONL form holds."""

    def token_bytes(self) -> list[bytes]:
        raise NotImplementedError

    def to_list(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def __reduce__(self):  # pickled (e.g. to a worker) as the plain list
        return list, (self.to_list(),)


def logprob_entries(lps: Any) -> Any:
    """A record's `logprobs` as the JSONL form's list of dicts (also a `json.dumps(default=...)` for records
    read from Parquet); anything else unchanged."""
    return lps.to_list() if isinstance(lps, CheckedLogprobs) else lps


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def check_encodable(rec: Any) -> None:
    """Raise `_BadRecord` naming the first top-level field holding an unpaired surrogate (call it only when the
    raw text contains a surrogate escape: pairs are fine, so the check is exact)."""
    items = rec.items() if isinstance(rec, dict) else [("(record)", rec)]
    for k, v in items:
        try:
            json.dumps([k, v], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise _BadRecord(f"field '{k}' is not valid Unicode: an unpaired UTF-16 surrogate escape "
                             f"({e.object[e.start]!r})") from None


def _check_string(rec: dict, key: str, allow_empty: bool) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise _BadRecord(f"field '{key}' must be a string, got {_type_name(v)}")
    if not allow_empty and not v.strip():
        raise _BadRecord(f"field '{key}' is empty")
    return v


def _check_message_list(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)):
        raise _BadRecord(f"field 'messages' must be a non-empty list of {{role, content}}, got {_type_name(messages)}")
    if not messages:
        raise _BadRecord("field 'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRecord(f"field 'messages[{i}]' must be {{'role': str, 'content': str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_messages(messages: Any) -> list[dict[str, str]]:
    out = _check_message_list(messages)
    if out[-1]["role"] != "assistant":
        raise _BadRecord(f"field 'messages' must end with the assistant's message (the response), "
                         f"last role is '{out[-1]['role']}'")
    return out


def _check_response(text: str, finish: Any, what: str) -> None:
    """A blank response is data only when a teacher gave it (the record carries its `finish_reason`): the teacher
    answering nothing but whitespace, or ending at once, is one of its samples (`generate --keep-empty`); in
    hand-made data it is a mistake. A response that is empty and did not end itself has nothing in it at all."""
    if text.strip():
        return
    if finish is None:
        raise _BadRecord(f"{what} is empty")
    if not text and finish not in NATURAL_END:
        raise _BadRecord(f"{what} is empty and the teacher did not end it (finish_reason "
                         f"{finish!r}): nothing was generated")


def _check_entry(a: dict, where: str) -> None:
    """One logprobs entry (a sampled token or one of its alternatives): bytes 0..255, logprob a number <= 0,
    -inf or null ("not in the top k"), never NaN."""
    b = a.get("bytes")
    if not isinstance(b, list):
        raise _BadRecord(f"field '{where}.bytes' must be a list of integers 0..255, got {_type_name(b)}")
    try:
        bytes(b)
    except (TypeError, ValueError):
        raise _BadRecord(f"field '{where}.bytes' must be integers 0..255, got {b!r:.60}") from None
    v = a.get("logprob")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise _BadRecord(f"field '{where}.logprob' must be a number or null, got {_type_name(v)}")
    if v is not None and (math.isnan(v) or v > LOGPROB_TOL):
        raise _BadRecord(f"field '{where}.logprob' must be a log-probability (<= 0), got {v!r}")


def check_logprobs(lps: Any) -> None:
    """The structure of a record's `logprobs` (`generate --top-logprobs`): a list, per generated token an object
    {token, bytes, logprob, top_logprobs: [{token, bytes, logprob}, ...]}. Alignment with the response and the
    order of the alternatives are checked where they are used (`bayeskd.posterior.evidence`)."""
    if isinstance(lps, CheckedLogprobs):
        return
    if not isinstance(lps, list):
        raise _BadRecord(f"field 'logprobs' must be a list (one entry per generated token), got {_type_name(lps)}")
    for p, pos in enumerate(lps):
        if not isinstance(pos, dict):
            raise _BadRecord(f"field 'logprobs[{p}]' must be an object {{token, bytes, logprob, top_logprobs}}, "
                             f"got {_type_name(pos)}")
        _check_entry(pos, f"logprobs[{p}]")
        top = pos.get("top_logprobs")
        if top is None:
            continue
        if not isinstance(top, list):
            raise _BadRecord(f"field 'logprobs[{p}].top_logprobs' must be a list of objects, got {_type_name(top)}")
        for j, a in enumerate(top):
            if not isinstance(a, dict):
                raise _BadRecord(f"field 'logprobs[{p}].top_logprobs[{j}]' must be an object, got {_type_name(a)}")
            _check_entry(a, f"logprobs[{p}].top_logprobs[{j}]")


def normalize_record(rec: Any) -> dict[str, Any]:
    """Check one record and return it normalized (raises `_BadRecord` with the reason).

    Chat records keep only role/content per message; other top-level fields (e.g. an id) are kept, except
    null ones, which tabular formats use for absent columns.
    """
    if not isinstance(rec, dict):
        raise _BadRecord(f"record must be an object, got {_type_name(rec)}")
    out = {k: v for k, v in rec.items() if v is not None}
    finish = out.get("finish_reason")
    if finish is not None and not isinstance(finish, str):  # it decides EOS: a wrong type must not mean "cut off"
        raise _BadRecord(f"field 'finish_reason' must be a string or null, got {_type_name(finish)}")
    if "logprobs" in out:
        check_logprobs(out["logprobs"])
    fp = out.get("teacher_tokenizer")
    if fp is not None and not (isinstance(fp, str) and FINGERPRINT.fullmatch(fp)):  # a name would silently mismatch
        raise _BadRecord(f"field 'teacher_tokenizer' must be a tokenizer fingerprint (64 hex digits, as bayeskd."
                         f"tokenizer_fingerprint computes and generate --teacher-tokenizer writes), got {fp!r:.70}")
    if out.get("messages") is not None:
        out["messages"] = _check_messages(out["messages"])
        _check_response(out["messages"][-1]["content"], finish,
                        f"field 'messages[{len(out['messages']) - 1}].content' (the assistant response)")
        for k in ("prompt", "response"):  # a record is one or the other; mixing them would be ambiguous
            if k in out:
                raise _BadRecord(f"record has both 'messages' and '{k}'; use one format per record")
        return out
    if "response" not in rec:
        raise _BadRecord("missing field 'response' (need 'prompt'+'response' or 'messages')")
    if "prompt" not in rec:
        raise _BadRecord("missing field 'prompt' (need 'prompt'+'response' or 'messages')")
    out["response"] = _check_string(rec, "response", allow_empty=True)
    _check_response(out["response"], finish, "field 'response'")
    out["prompt"] = _check_string(rec, "prompt", allow_empty=True)  # an empty prompt = unconditional text
    return out


def normalize_prompt(rec: Any) -> dict[str, Any]:
    """Check one prompt record: {"prompt": str} or chat {"messages": [...]} (ending with the user's turn), plus
    an optional "id"; other fields are kept (raises `_BadRecord` with the reason)."""
    if not isinstance(rec, dict):
        raise _BadRecord(f"record must be an object, got {_type_name(rec)}")
    out = {k: v for k, v in rec.items() if v is not None}
    if "messages" in out:
        if "prompt" in out:
            raise _BadRecord("record has both 'messages' and 'prompt'; use one format per record")
        out["messages"] = _check_message_list(out["messages"])
        if out["messages"][-1]["role"] == "assistant":
            raise _BadRecord("field 'messages' ends with an assistant message: a prompt ends with the user's turn")
    elif "prompt" in out:
        out["prompt"] = _check_string(out, "prompt", allow_empty=False)
    else:
        raise _BadRecord("missing field 'prompt' (need 'prompt' or 'messages')")
    if "id" in out and (isinstance(out["id"], bool) or not isinstance(out["id"], (str, int))):
        raise _BadRecord(f"field 'id' must be a string or an integer, got {_type_name(out['id'])}")
    return out
