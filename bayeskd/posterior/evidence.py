"""Evidence rows: what a teacher's revealed log-probabilities (records' `logprobs`: per generated token its bytes,
logprob and top-k alternatives) say about each target row, as sparse (student token id, probability) entries.

Teacher and student tokens are aligned by byte offsets in the response: a row gets evidence only where its token
starts where a teacher token starts and the text before it is what the teacher saw. Exact entries (`lower`
False): the record's `teacher_tokenizer` fingerprint is the student tokenizer's (`data.same_tokenizer`: none is
an unknown tokenizer, not this one), the earlier teacher tokens are the student's one to one (checked per record
and position) and every token listed at the aligned positions is a student token, so both contexts are one token
sequence; the top list plus the sampled token map by their bytes. Otherwise (another or an unknown tokenizer, or
past a sampled non-canonical tokenization) each alternative goes to the first token of the student's tokenization
of its bytes, masses on one token summed, as lower bounds (`lower` True; the student may split it otherwise
inside longer text, so this is an approximation, not a theorem). Rows stay empty at EOS (the
teacher's stop step is not in its logprobs), in records without logprobs, past the point where the student's
context stops being the teacher's (U+FFFD in the text for a partial UTF-8 character, a special token), and where
no start coincides. None or -9999 means "not in the top k", never a probability. Malformed logprobs raise
`DataError` naming the record (index, id or key) and the token position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bayeskd.data import DataError, same_tokenizer
from bayeskd.record_checks import logprob_entries
from bayeskd.core.sparse import tokenizer_fingerprint
from bayeskd.teacher_forcing import target_row_layout
from bayeskd.token_bytes import cached_bytes_to_id, token_bytes_table

PLACEHOLDER = -9999.0  # OpenAI's "not in the top k" log-probability
LOGPROB_TOL = 1e-6  # a log-probability may exceed 0, and a list be out of order, by this much (rounding)
SUM_TOL = 1e-4  # the listed probabilities of a position may sum to 1 + this
CHOSEN_TOL = 1e-3  # the sampled token's logprob and its top-list entry must agree this closely


class _Bad(Exception):
    """Internal: (the malformed token position, -1 for the whole list; the reason)."""


# ---------------------------------------------------------------------------------------------------- Evidence

@dataclass
class Evidence:
    """Sparse evidence per target row: `indices` int32 [N, E] (student token ids, -1 = padding), `probs` float32
    [N, E] (0 at padding), `lower` bool [N, E] (True: a lower bound of the token's probability, not its value).
    Optional per row: `chosen` int32 [N], the column of the teacher's sampled token (-1: none), which APIs report
    listed or not; `cap` float32 [N], the smallest probability in the teacher's top list, so no unlisted teacher
    token is more likely (1: no list). The sampled token is no cap when it was outside the list, hence the field.
    Built rows list entries largest first.
    """
    indices: np.ndarray
    probs: np.ndarray
    lower: np.ndarray
    chosen: np.ndarray | None = None
    cap: np.ndarray | None = None

    def __post_init__(self):
        self.indices = np.asarray(self.indices, dtype=np.int32)
        self.probs = np.asarray(self.probs, dtype=np.float32)
        self.lower = np.asarray(self.lower, dtype=bool)
        n = self.indices.shape[0]
        self.chosen = np.full(n, -1, np.int32) if self.chosen is None else np.asarray(self.chosen, np.int32)
        self.cap = np.ones(n, np.float32) if self.cap is None else np.asarray(self.cap, np.float32)
        shapes = [a.shape for a in (self.indices, self.probs, self.lower, self.chosen, self.cap)]
        if self.indices.ndim != 2 or shapes[1:] != [shapes[0]] * 2 + [(n,)] * 2:
            raise ValueError(f"need indices, probs, lower [N, E] and chosen, cap [N]; got shapes {shapes}")

    @classmethod
    def empty(cls, rows: int, width: int = 1) -> Evidence:
        """`rows` rows without evidence."""
        return cls(np.full((rows, width), -1), np.zeros((rows, width)), np.zeros((rows, width), bool))

    @property
    def num_rows(self) -> int:
        return int(self.indices.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def has(self) -> np.ndarray:
        """bool [N]: the row has at least one entry."""
        return (self.indices >= 0).any(axis=1)

    @property
    def mass(self) -> np.ndarray:
        """float32 [N]: the listed probability of each row."""
        return self.probs.sum(axis=1, dtype=np.float64).astype(np.float32)

    def __getitem__(self, rows: Any) -> Evidence:
        """The rows `rows` (a slice, integer array or bool mask), all columns."""
        return Evidence(self.indices[rows], self.probs[rows], self.lower[rows], self.chosen[rows], self.cap[rows])

    @classmethod
    def cat(cls, parts: Sequence[Evidence]) -> Evidence:
        """The rows of `parts` one after another (narrower parts padded)."""
        parts = list(parts) or [cls.empty(0)]
        w = max(p.indices.shape[1] for p in parts)
        cols = {k: np.concatenate([np.pad(getattr(p, k), ((0, 0), (0, w - p.indices.shape[1])), constant_values=v)
                                   for p in parts]) for k, v in (("indices", -1), ("probs", 0), ("lower", False))}
        return cls(**cols, chosen=np.concatenate([p.chosen for p in parts]), cap=np.concatenate([p.cap for p in parts]))

    def sorted(self) -> Evidence:
        """The same rows with entries largest first, padding last (`chosen` follows its entry)."""
        order = np.argsort(np.where(self.indices >= 0, -self.probs, 2.0), axis=1, kind="stable")
        rank = np.argsort(order, axis=1)
        chosen = np.where(self.chosen >= 0, rank[np.arange(self.num_rows), np.maximum(self.chosen, 0)], -1)
        return Evidence(*(np.take_along_axis(a, order, 1) for a in (self.indices, self.probs, self.lower)), chosen,
                        self.cap.copy())

    def top(self, k: int) -> Evidence:
        """An API that returned k alternatives: each row's k largest entries plus the sampled token's (always
        reported), `cap` raised to the k-th largest where entries were dropped (a list entry: an unlisted sampled
        token lies below the list). Exact rows: equal to `evidence_rows(..., top_k=k)`; lower-bound rows only
        approximately (kept entries keep mass dropped alternatives mapped onto them): use top_k there."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        ev = self.sorted()
        col = np.arange(ev.indices.shape[1])[None, :]
        keep = ((col < k) | (col == ev.chosen[:, None])) & (ev.indices >= 0)
        cut = (ev.indices >= 0).sum(1) > k
        if cut.any():
            ev.cap[cut] = ev.probs[cut, k - 1] if k > 0 else 1.0
        order = np.argsort(~keep, axis=1, kind="stable")[:, :max(min(ev.indices.shape[1], k + 1), 1)]  # kept first
        kept = np.take_along_axis(keep, order, 1)
        chosen = np.where(ev.chosen >= 0, np.cumsum(keep, 1)[np.arange(len(ev)), np.maximum(ev.chosen, 0)] - 1, -1)
        return Evidence(np.where(kept, np.take_along_axis(ev.indices, order, 1), -1),
                        np.where(kept, np.take_along_axis(ev.probs, order, 1), 0),
                        kept & np.take_along_axis(ev.lower, order, 1), chosen, ev.cap)


# ---------------------------------------------------------------------------------------------------- vocabulary

class StudentVocab:
    """The student tokenizer's side: token bytes, bytes -> id, names of byte-less tokens, the first-token cache.
    Build once per tokenizer and pass it to every `evidence_rows` call (its caches only grow)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.table = token_bytes_table(tokenizer)
        self.lengths = np.array([len(b) for b in self.table], dtype=np.int64)
        self.max_len = int(self.lengths.max(initial=0))
        self.id_of_bytes = cached_bytes_to_id(tokenizer, self.fingerprint, self.table)
        # Tokens without bytes (specials) can only be named: the teacher's "<eos>" is the student's "<eos>".
        names = {**getattr(tokenizer, "get_added_vocab", dict)(),
                 **{t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}}
        self.id_of_name = {t: int(i) for t, i in names.items() if i is not None and not self.table[int(i)]}
        self._first: dict[bytes, int] = {}

    def exact(self, b: bytes, name: Any) -> int:
        """The student id with exactly these bytes (or, when b is empty, this name), -1 if none."""
        return self.id_of_bytes.get(b, -1) if b else self.id_of_name.get(name, -1)

    def _longest_prefix(self, b: bytes) -> int:
        return next((self.id_of_bytes[b[:n]] for n in range(min(len(b), self.max_len), 0, -1)
                     if b[:n] in self.id_of_bytes), -1)

    def first_tokens(self, keys: Sequence[bytes]) -> list[int]:
        """The first token of the student's tokenization of each byte string (-1: none). Whole UTF-8 goes through
        the tokenizer; partial characters (which it cannot take) and texts whose first token is no prefix of the
        bytes (a normalizer, SentencePiece's added space) take the longest student token they start with."""
        texts = []
        for b in dict.fromkeys(keys):
            if b not in self._first:
                try:
                    texts.append((b, b.decode("utf-8")))
                except UnicodeDecodeError:
                    self._first[b] = self._longest_prefix(b)
        for s in range(0, len(texts), 4096):
            chunk = texts[s:s + 4096]
            for (b, _), ids in zip(chunk, self.tokenizer([t for _, t in chunk], add_special_tokens=False)["input_ids"]):
                ok = bool(ids) and bool(self.table[ids[0]]) and b.startswith(self.table[ids[0]])
                self._first[b] = int(ids[0]) if ok else self._longest_prefix(b)
        return [self._first[b] for b in keys]


class _Keys:
    """Teacher tokens interned to small ints (by bytes; byte-less ones by name), each with its exact student id."""

    def __init__(self, vocab: StudentVocab):
        self.vocab, self.index = vocab, {}
        self.raw, self.name, self.same = [], [], []  # per key: its bytes, its token string, its exact student id

    def of(self, entry: dict, position: int) -> int:
        b = entry.get("bytes")
        if type(b) is not list:
            raise _Bad(position, "an entry has no 'bytes'" if b is None else
                       f"'bytes' must be a list of integers, got {type(b).__name__}")
        try:
            raw = bytes(b)
        except (TypeError, ValueError):
            raise _Bad(position, f"'bytes' must be integers 0..255, got {b!r:.60}") from None
        key = raw or ("special", entry.get("token"))
        if key not in self.index:
            self.index[key] = len(self.raw)
            self.raw.append(raw)
            self.name.append(entry.get("token"))
            self.same.append(self.vocab.exact(raw, entry.get("token")))
        return self.index[key]


_NUMBER, _DICT, _LIST = {float, int, type(None)}, {dict}, {list}


def _fast(lps: Any, keys: _Keys) -> tuple[list[int], list, list[int]] | None:
    """(keys, logprobs, top-list lengths) of one record's well-formed logprobs in whole-list passes (entries: the
    sampled tokens, then every top list); None when anything is off, and `_careful` finds and names it."""
    if type(lps) is not list or not {type(p) for p in lps} <= _DICT:
        return None
    tops = [p.get("top_logprobs") or [] for p in lps]
    if not {type(t) for t in tops} <= _LIST:
        return None
    entries = lps + [a for t in tops for a in t]
    if not {type(a) for a in entries} <= _DICT:
        return None
    raw, values = [a.get("bytes") for a in entries], [a.get("logprob") for a in entries]
    if not {type(b) for b in raw} <= _LIST or not {type(v) for v in values} <= _NUMBER:
        return None
    try:
        raw = [bytes(b) for b in raw]
    except (TypeError, ValueError):
        return None
    get = keys.index.get
    k = [get(b) if b else None for b in raw]
    for j in [j for j, x in enumerate(k) if x is None]:  # new tokens, and byte-less ones (keyed by name)
        k[j] = keys.of(entries[j], 0)
    return k, values, [len(t) for t in tops]


def _careful(lps: Any, keys: _Keys) -> None:
    """Raise `_Bad` at the first malformed position (called when `_fast` found something off)."""
    if not isinstance(lps, list):
        raise _Bad(-1, f"'logprobs' must be a list (one entry per generated token), got {type(lps).__name__}")
    for p, pos in enumerate(lps):
        if type(pos) is not dict:
            raise _Bad(p, f"must be an object {{token, bytes, logprob, top_logprobs}}, got {pos!r:.40}")
        top = pos.get("top_logprobs") or []
        if type(top) is not list or {type(a) for a in top} - _DICT:
            raise _Bad(p, f"'top_logprobs' must be a list of objects, got {top!r:.60}")
        for a in [pos, *top]:
            keys.of(a, p)
            if type(a.get("logprob")) not in _NUMBER:
                raise _Bad(p, f"'logprob' must be a number or null, got {a.get('logprob')!r:.40}")
    raise _Bad(-1, "malformed logprobs")  # not reached: `_fast` fails only on something named above


class _Teacher:
    """Every parsed teacher position of one call: per position the sampled token's key and logprob, per top-list
    entry its key, logprob, position and rank (arrays per record); per record its name and first position."""

    FIELDS = ("ck", "clp", "tk", "tlp", "tpos", "trank")

    def __init__(self, vocab: StudentVocab):
        self.keys, self.n, self.owner, self.parts = _Keys(vocab), 0, [], {k: [] for k in self.FIELDS}

    def parse(self, lps: Any, name: str) -> list[bytes]:
        """Add one record's logprobs; returns the bytes of its sampled tokens."""
        try:
            k, values, counts = _fast(lps, self.keys) or _careful(lps, self.keys)  # type: ignore[misc]
        except _Bad as e:
            raise DataError(f"{name}{'' if e.args[0] < 0 else f': logprobs[{e.args[0]}]'}: {e.args[1]}") from None
        m = len(counts)
        v = np.array(values, dtype=np.float64)  # None reads as NaN: make it -inf ("no probability"), keep NaN an error
        v[[j for j in np.nonzero(np.isnan(v))[0].tolist() if values[j] is None]] = -np.inf
        v[v <= PLACEHOLDER] = -np.inf
        k, counts = np.asarray(k, np.int64), np.asarray(counts, np.int64)
        start = np.repeat(np.cumsum(counts) - counts, counts)
        for f, part in zip(self.FIELDS, (k[:m], v[:m], k[m:], v[m:], self.n + np.repeat(np.arange(m), counts),
                                         np.arange(len(start)) - start)):
            self.parts[f].append(part)
        self.owner.append((name, self.n))
        self.n += m
        return [self.keys.raw[x] for x in k[:m].tolist()]

    def arrays(self) -> list[np.ndarray]:
        return [np.concatenate(self.parts[f] or [np.zeros(0, float if f.endswith("lp") else np.int64)])
                for f in self.FIELDS]


# ---------------------------------------------------------------------------------------------------- alignment

def _common(a: bytes, b: bytes) -> int:
    """The length of the common prefix of two byte strings."""
    n = min(len(a), len(b))
    return n if a[:n] == b[:n] else int(np.argmax(np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n)))


def _teacher_text(spelled: bytes, text: bytes, finish: Any) -> tuple[int, int] | None:
    """(shift, trusted length) when the teacher's tokens spell the response, else None. shift 1: the tokens carry a
    leading space the text lacks (SentencePiece decoders drop it). Trusted: the bytes of the response the teacher's
    context agrees with. Accepted: equal bytes; equal text once partial UTF-8 reads as U+FFFD (a character cut by
    max_tokens, invalid bytes from a byte-level model); with finish_reason "stop", one a prefix of the other
    (servers differ on the tokens around a stop string)."""
    for shift in (0, 1) if spelled.startswith(b" ") else (0,):
        t = spelled[shift:]
        if t == text:
            return shift, len(text)
        if finish == "stop" and (text.startswith(t) or t.startswith(text)):
            return shift, min(len(t), len(text))
        if t.decode("utf-8", "replace") == text.decode("utf-8", "replace"):
            return shift, _common(t, text)
    return None


def _starts(lengths: list[int], shift: int, trusted: int, cut_at_empty: bool) -> tuple[np.ndarray, np.ndarray]:
    """(start offsets in the text, usable) of a token sequence: usable while the bytes before a token are trusted
    text and no byte-less token (a special) came before it; with `cut_at_empty` the byte-less one is unusable too
    (the student's EOS row stays empty)."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.cumsum(lengths) - lengths - shift
    ok = starts <= trusted
    empty = np.nonzero(lengths == 0)[0]
    if len(empty):
        ok[empty[0] + (0 if cut_at_empty else 1):] = False
    return starts, ok


def _align(t_bytes: list[bytes], text: bytes, finish: Any, s_bytes: list[bytes], name: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(student token indices, teacher positions, exact-eligible) of one record's aligned pairs. Exact-eligible:
    every earlier teacher token has the bytes of the student's token there, so the contexts are one token
    sequence (a sampled non-canonical tokenization ends this at its first odd token)."""
    spelled = b"".join(t_bytes)
    match = _teacher_text(spelled, text, finish)
    if match is None:
        d = _common(spelled, text)
        raise DataError(f"{name}: its logprobs do not belong to its response: the tokens spell "
                        f"{spelled[max(d - 20, 0):d + 20]!r} where the response has {text[max(d - 20, 0):d + 20]!r} "
                        f"(first difference at byte {d}; finish_reason {finish!r})")
    if s_bytes == t_bytes and all(t_bytes):  # the student's tokens are the teacher's own (tokenize_records)
        at = np.arange(len(t_bytes))
        return at, at, np.ones(len(at), bool)
    s_spelled = b"".join(s_bytes)  # a student that adds a leading space (SentencePiece) is read past it
    s_shift = int(s_spelled.startswith(b" ") and _common(s_spelled[1:], text) > _common(s_spelled, text))
    t_start, t_ok = _starts([len(b) for b in t_bytes], match[0], match[1], False)
    s_start, s_ok = _starts([len(b) for b in s_bytes], s_shift, _common(s_spelled[s_shift:], text), True)
    tj, sj = np.nonzero(t_ok)[0], np.nonzero(s_ok)[0]
    at = np.searchsorted(t_start[tj], s_start[sj])
    hit = at < len(tj)
    hit[hit] = t_start[tj[at[hit]]] == s_start[sj[hit]]
    same = next((i for i, (x, y) in enumerate(zip(t_bytes, s_bytes)) if x != y), min(len(t_bytes), len(s_bytes)))
    ti = tj[at[hit]]
    return sj[hit], ti, (ti <= same) & (match[0] == s_shift) & (same >= 1)


def _name(i: int, rec: dict) -> str:
    return next((f"record {i} ({k} {rec[k]!r})" for k in ("id", "key") if k in rec), f"record {i}")


# ---------------------------------------------------------------------------------------------------- extraction

EVIDENCE_CHUNK_RECORDS = 4096  # records parsed and assembled at a time: memory follows the chunk, not the data


def evidence_rows(records: Sequence[dict[str, Any]], tokenized, tokenizer, indices: Sequence[int] | None = None, *,
                  top_k: int | None = None, vocab: StudentVocab | None = None,
                  allow_exact: bool = True) -> tuple[Evidence, dict[str, Any]]:
    """(Evidence over the target rows of the records `indices` (all by default), a report) from the records'
    `logprobs`; `tokenized` = `tokenize_records(records, tokenizer, ...)` with the student's `tokenizer`.
    `top_k`: only the first top_k alternatives of each position (plus the sampled token's logprob, which APIs
    always return): an API that revealed fewer. `vocab`: a `StudentVocab(tokenizer)` reused across calls.
    `allow_exact=False`: every entry a lower bound, also in records of the student's tokenizer. Report: rows,
    rows_with_evidence, rows_exact, share_with_evidence (of all rows), rows_with_logprobs, share_in_logprob_records
    (rows of records with logprobs), records, records_with_logprobs, records_same_tokenizer (every aligned position
    exact), records_cross_tokenizer, teacher_tokens, teacher_tokens_used, mean_mass (over rows with evidence).
    Records are read EVIDENCE_CHUNK_RECORDS at a time (each record's evidence depends on it alone): the array
    passes' temporaries (tens of bytes per revealed alternative) stay the size of a chunk, not of the data."""
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if len(records) != len(tokenized):
        raise ValueError(f"{len(records)} records but {len(tokenized)} tokenized sequences")
    vocab = vocab if vocab is not None else StudentVocab(tokenizer)
    if vocab.tokenizer is not tokenizer or vocab.fingerprint != tokenized.tokenizer_fingerprint:
        raise ValueError("the records were tokenized with another tokenizer than the student's (or vocab's)")
    indices = list(range(len(tokenized))) if indices is None else [int(i) for i in indices]
    step = EVIDENCE_CHUNK_RECORDS
    parts = [_evidence_part(records, tokenized, vocab, indices[s:s + step], top_k, allow_exact)
             for s in range(0, max(len(indices), 1), step)]
    ev = parts[0][0] if len(parts) == 1 else Evidence.cat([p[0] for p in parts])
    counts = {k: sum(p[1][k] for p in parts) for k in parts[0][1]}
    has, n_rows = ev.has, counts["rows"]
    report = {**{k: counts[k] for k in ASSEMBLE_COUNTS},
              "rows": n_rows, "rows_with_evidence": int(has.sum()), "share_with_evidence": has.sum() / max(n_rows, 1),
              "rows_with_logprobs": counts["rows_with_logprobs"],
              "share_in_logprob_records": has.sum() / max(counts["rows_with_logprobs"], 1),
              **{k: counts[k] for k in ("records", "records_with_logprobs", "teacher_tokens", "teacher_tokens_used")},
              "mean_mass": ev.mass[has].mean() if has.any() else 0.0}
    report = {k: float(v) if isinstance(v, np.floating) else v for k, v in report.items()}  # JSON-ready
    return ev, report


def _evidence_part(records: Sequence[dict[str, Any]], tokenized, vocab: StudentVocab, indices: list[int],
                   top_k: int | None, allow_exact: bool) -> tuple[Evidence, dict[str, int]]:
    """`evidence_rows` of the records `indices` alone: their Evidence and the report's counts (they add up)."""
    _, plens, offsets = target_row_layout(tokenized, indices)
    n_rows = int(offsets[-1])
    teacher, pairs, rows_with_logprobs = _Teacher(vocab), [], 0
    observed = np.full(n_rows, -1, np.int64)  # the student's token at each target row
    for q, i in enumerate(indices):
        rec = records[i]
        response_ids = np.asarray(tokenized.input_ids[i][int(plens[q]):], np.int64)
        observed[offsets[q]:offsets[q + 1]] = response_ids[:offsets[q + 1] - offsets[q]]
        if rec.get("logprobs") is None:
            continue
        base, name = teacher.n, _name(i, rec)
        t_bytes = teacher.parse(logprob_entries(rec["logprobs"]), name)
        s_bytes = [vocab.table[x] for x in response_ids.tolist()]
        text = (rec["messages"][-1]["content"] if "messages" in rec else rec["response"]).encode()
        sj, tj, exact = _align(t_bytes, text, rec.get("finish_reason"), s_bytes, name)
        pairs.append((base + tj, offsets[q] + sj, exact & (allow_exact and same_tokenizer(rec, vocab.fingerprint))))
        rows_with_logprobs += int(offsets[q + 1] - offsets[q])
    row_of = np.full(teacher.n, -1, np.int64)  # teacher position -> its target row, -1: not aligned
    exact = np.zeros(teacher.n, bool)
    if pairs:
        pos = np.concatenate([p for p, _, _ in pairs]).astype(np.int64)
        row_of[pos], exact[pos] = np.concatenate([r for _, r, _ in pairs]), np.concatenate([e for _, _, e in pairs])
    ev, counts = _assemble(teacher, vocab, row_of, exact, n_rows, top_k, observed)
    return ev, {**counts, "rows": n_rows, "rows_with_logprobs": rows_with_logprobs, "records": len(indices),
                "records_with_logprobs": len(teacher.owner), "teacher_tokens": teacher.n,
                "teacher_tokens_used": int((row_of >= 0).sum())}


ASSEMBLE_COUNTS = ("records_same_tokenizer", "records_cross_tokenizer", "rows_exact", "cross_entries",
                   "cross_entries_dropped", "cross_rows_dropped_in", "cross_rows_cap_lifted")  # `_assemble`'s


def _assemble(t: _Teacher, vocab: StudentVocab, row_of: np.ndarray, exact: np.ndarray, n_rows: int,
              top_k: int | None, observed: np.ndarray) -> tuple[Evidence, dict[str, Any]]:
    """Check every position's values, then map the entries at aligned positions to student ids, in array passes."""
    n_pos, n_keys, at_pos = t.n, max(len(t.keys.raw), 1), np.arange(t.n)
    ck, clp, tk, tlp, tpos, trank = t.arrays()
    rec_of = np.searchsorted(np.array([b for _, b in t.owner], np.int64), at_pos, side="right") - 1

    def fail(bad: np.ndarray, where: np.ndarray, reason) -> None:
        if len(bad):
            name, base = t.owner[rec_of[where[bad[0]]]]
            raise DataError(f"{name}: logprobs[{where[bad[0]] - base}]: {reason(bad[0])}")

    for v, where in ((clp, at_pos), (tlp, tpos)):
        fail(np.nonzero(np.isnan(v))[0], where, lambda b: "a log-probability is NaN")
        fail(np.nonzero(v > LOGPROB_TOL)[0], where, lambda b, v=v: f"log-probability {v[b]:.6g} > 0 (probability > 1)")
    clp, tlp = np.minimum(clp, 0.0), np.minimum(tlp, 0.0)
    fin = np.isfinite(tlp)  # placeholders drop out of every check: "not in the top k"
    fp, fv, fk, fr = tpos[fin], tlp[fin], tk[fin], trank[fin]
    fail(np.nonzero((fp[1:] == fp[:-1]) & (fv[1:] > fv[:-1] + LOGPROB_TOL))[0], fp,
         lambda b: f"top_logprobs are not sorted largest first ({fv[b]:.6g} before {fv[b + 1]:.6g})")
    order = np.argsort(fp * n_keys + fk, kind="stable")
    sc = np.append((fp * n_keys + fk)[order], np.iinfo(np.int64).max)  # a sentinel: searches never run off the end
    fail(np.nonzero(sc[1:-1] == sc[:-2])[0], fp[order], lambda b: f"top_logprobs repeat the token "
         f"{t.keys.name[fk[order[b]]]!r} (bytes {list(t.keys.raw[fk[order[b]]])})")
    # The sampled token in its own list: the two values must agree.
    at = np.searchsorted(sc, at_pos * n_keys + ck)
    found = sc[at] == at_pos * n_keys + ck
    hit = np.append(order, 0)[at]  # the list entry of the sampled token (meaningless where not found)
    fvx = np.append(fv, -np.inf)[np.where(found, hit, len(fv))]
    fail(np.nonzero(found & np.isfinite(clp) & (np.abs(clp - fvx) > CHOSEN_TOL))[0], at_pos,
         lambda b: f"the sampled token's logprob {clp[b]:.6g} differs from its top_logprobs entry {fvx[b]:.6g}")
    c_val = np.where(found & ~np.isfinite(clp), fvx, clp)
    total = np.bincount(fp, np.exp(fv), n_pos) + np.where(~found & np.isfinite(c_val), np.exp(c_val), 0.0)
    fail(np.nonzero(total > 1 + SUM_TOL)[0], at_pos, lambda b: f"the listed probabilities sum to {total[b]:.6g} > 1")

    # Entries: the (first top_k of the) list, plus the sampled token where it is not among them.
    keep = fr < top_k if top_k is not None else np.ones(len(fr), bool)
    listed = found & np.append(keep, False)[np.where(found, hit, len(fr))]
    extra = np.isfinite(c_val) & ~listed
    is_hit = np.zeros(len(fr), bool)
    is_hit[hit[listed]] = True
    cap = np.ones(n_pos)
    np.minimum.at(cap, fp[keep], np.exp(fv[keep]))
    e_pos, e_key, e_lp, e_chosen = (np.concatenate(x) for x in (
        (fp[keep], at_pos[extra]), (fk[keep], ck[extra]), (fv[keep], c_val[extra]), (is_hit[keep], extra[extra])))
    # Exact only where every token listed at the record's aligned positions is a student token (same vocabulary).
    same_id = np.append(np.asarray(t.keys.same, np.int64), -1)
    aligned = row_of >= 0
    inexact = np.zeros(len(t.owner) + 1, bool)
    inexact[rec_of[fp[aligned[fp] & (same_id[fk] < 0)]]] = True
    inexact[rec_of[aligned & (same_id[ck] < 0)]] = True
    exact &= ~inexact[rec_of]
    on = row_of[e_pos] >= 0
    e_pos, e_key, e_lp, e_chosen = e_pos[on], e_key[on], e_lp[on], e_chosen[on]
    e_exact = exact[e_pos]
    sid = np.where(e_exact, same_id[e_key], -1)
    cross = np.unique(e_key[~e_exact])
    if len(cross):
        first = np.array([vocab.id_of_name.get(t.keys.name[k], -1) for k in cross.tolist()], np.int64)  # byte-less
        raw = [t.keys.raw[k] for k in cross.tolist()]
        first[[bool(b) for b in raw]] = vocab.first_tokens([b for b in raw if b])
        lookup = np.full(n_keys, -1, np.int64)
        lookup[cross] = first
        sid[~e_exact] = lookup[e_key[~e_exact]]
    on = sid >= 0
    dropped = _prefixes_of_observed(t, vocab, e_key, observed[row_of[e_pos]], on & ~e_exact)
    on &= ~dropped
    ev = _pack(row_of[e_pos[on]], sid[on], np.exp(e_lp[on]), e_chosen[on], ~e_exact[on], cap[e_pos[on]], n_rows,
               len(vocab.table))
    # Across tokenizers one student token gathers several teacher strings, so the cap (no unlisted teacher token
    # above the smallest listed) would push down an unlisted observed token (the teacher's sample): no cap there
    lift = ev.lower.any(1) & ~(ev.indices == observed[:, None]).any(1) & (ev.cap < 1)
    ev.cap[lift] = 1.0
    per_rec = [np.bincount(rec_of[m], minlength=len(t.owner)) for m in (aligned, exact)]
    same = int(np.sum((per_rec[0] > 0) & (per_rec[0] == per_rec[1])))
    return ev, {"records_same_tokenizer": same, "records_cross_tokenizer": len(t.owner) - same,
                "rows_exact": int((ev.has & ~ev.lower.any(1)).sum()),
                "cross_entries": int((~e_exact & (sid >= 0)).sum()), "cross_entries_dropped": int(dropped.sum()),
                "cross_rows_dropped_in": int(len(np.unique(row_of[e_pos[dropped]]))),
                "cross_rows_cap_lifted": int(lift.sum())}


def _prefixes_of_observed(t: _Teacher, vocab: StudentVocab, e_key: np.ndarray, observed: np.ndarray,
                          cross: np.ndarray) -> np.ndarray:
    """Cross-tokenizer entries whose teacher string is a strict prefix of the student's observed token at their row:
    the student tokens extending it (the observed one among them) share its mass in a way the evidence does not
    tell, so it bounds no one token (the audit's ' ' where the student wrote ' ☃'). Those entries are dropped."""
    out = np.zeros(len(e_key), bool)
    if not cross.any():
        return out
    base = len(vocab.table) + 1
    code = e_key.astype(np.int64) * base + (observed + 1)
    bad = [c for c in np.unique(code[cross]).tolist()
           if (b := t.keys.raw[c // base]) and (o := c % base - 1) >= 0
           and len(vocab.table[o]) > len(b) and vocab.table[o].startswith(b)]
    out[cross] = np.isin(code[cross], np.asarray(bad, np.int64))
    return out


def _pack(row: np.ndarray, sid: np.ndarray, prob: np.ndarray, chosen: np.ndarray, lower: np.ndarray,
          cap: np.ndarray, n_rows: int, vocab_size: int) -> Evidence:
    """Entries (row, student id, probability, ...) into padded [N, E] arrays: entries landing on one (row, id) are
    summed, rows listed largest first; a row whose mass exceeds 1 (by rounding, checked above) is scaled to 1."""
    code, inv = np.unique(row * vocab_size + sid, return_inverse=True)
    row, sid = code // vocab_size, code % vocab_size
    prob, chosen, lower = (np.bincount(inv, x, len(code)) for x in (prob, chosen, lower))
    prob = prob / np.maximum(np.bincount(row, prob, n_rows)[row], 1.0)
    cap_of = np.ones(len(code))
    cap_of[inv] = cap
    count = np.bincount(row, minlength=n_rows)  # `code` is sorted, so each row's entries are contiguous
    col = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count)
    ev = Evidence.empty(n_rows, max(int(count.max(initial=0)), 1))
    ev.indices[row, col], ev.probs[row, col], ev.lower[row, col] = sid, prob, lower > 0
    ev.chosen[row[chosen > 0]] = col[chosen > 0]
    ev.cap[row] = cap_of
    return ev.sorted()
