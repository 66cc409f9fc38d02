"""Issue 27, item 3: "same tokenizer" means the same tokenizer (its fingerprint), not vocabulary containment.

A teacher record says which tokenizer its logprobs are in (`teacher_tokenizer`, a `tokenizer_fingerprint`). The
teacher here is a BPE trained on the student tokenizer's text with 1.5 times its vocabulary (the lab's teacher B):
its vocabulary contains the student's, and its responses below are written in pieces that are all student
tokens, one of them in a split the student's tokenizer never makes. Only the student's own fingerprint keeps the
teacher's tokens and makes its evidence exact; another fingerprint, or none (an unknown tokenizer), is
re-tokenized and its evidence mapped as lower bounds. Everything is deterministic (no sampling).
"""
import json
import logging
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from bayeskd.corpus import embedded_corpus, train_bpe_tokenizer
from bayeskd.data import DataError, load_teacher_records, tokenize_records
from bayeskd.posterior.evidence import evidence_rows
from bayeskd.core.sparse import tokenizer_fingerprint
from bayeskd.token_bytes import token_bytes_table

TEXTS = ("return the value", "the name of the file")


@pytest.fixture(scope="module")
def teacher_tokenizer(tmp_path_factory, tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(train_bpe_tokenizer(embedded_corpus(), vocab_size=768,
                                                            out_dir=tmp_path_factory.mktemp("teacher_bpe")))
    assert set(tiny_tokenizer.get_vocab().items()) < set(tok.get_vocab().items())  # it contains the student's
    return tok


def _pieces(tok, text: str) -> list[bytes]:
    table = token_bytes_table(tok)
    return [table[i] for i in tok(text, add_special_tokens=False)["input_ids"]]


@pytest.fixture(scope="module")
def responses(teacher_tokenizer, tiny_tokenizer) -> list[tuple[str, list[bytes]]]:
    """(text, the teacher's pieces): the first as the teacher's tokenizer splits it, the second a split that
    neither tokenizer makes (one token of the teacher's split cut in two), as a sampling teacher may emit."""
    student = set(token_bytes_table(tiny_tokenizer))
    first = _pieces(teacher_tokenizer, TEXTS[0])
    second = _pieces(teacher_tokenizer, TEXTS[1])
    j, c = next((j, c) for j, p in enumerate(second) for c in range(1, len(p)) if {p[:c], p[c:]} <= student)
    second = second[:j] + [second[j][:c], second[j][c:]] + second[j + 1:]
    out = [(TEXTS[0], first), (TEXTS[1], second)]
    for text, pieces in out:
        assert set(pieces) <= student and b"".join(pieces) == text.encode()  # every piece is a student token
    assert second != _pieces(tiny_tokenizer, TEXTS[1])  # a split the student's tokenizer never makes
    return out


def _records(responses, fingerprint: str | None) -> list[dict]:
    """Teacher records with logprobs: each piece sampled at 0.5, one alternative (also a student token) at 0.2."""
    def entry(b: bytes, p: float) -> dict:
        return {"token": b.decode(), "bytes": list(b), "logprob": math.log(p)}

    out = []
    for text, pieces in responses:
        lps = [{**entry(p, 0.5), "top_logprobs": [entry(p, 0.5), entry(b"," if p != b"," else b".", 0.2)]}
               for p in pieces]
        rec = {"prompt": "Say:", "response": text, "finish_reason": "stop", "logprobs": lps}
        out.append(rec if fingerprint is None else {**rec, "teacher_tokenizer": fingerprint})
    return out


def _response_bytes(tokenized, tok, q: int) -> list[bytes]:
    table = token_bytes_table(tok)
    ids = tokenized.input_ids[q][tokenized.prompt_lengths[q]:]
    assert ids[-1] == tok.eos_token_id  # finish_reason "stop": EOS appended
    return [table[i] for i in ids[:-1]]


@pytest.mark.parametrize("whose", ["the teacher's", "none"])
def test_a_tokenizer_containing_the_students_is_not_the_students(responses, teacher_tokenizer, tiny_tokenizer, whose,
                                                                 caplog):
    """Before: every piece being a student token made the record the student's: its tokens were kept (the
    sampled split too, which the student would never produce) and its evidence exact."""
    fingerprint = tokenizer_fingerprint(teacher_tokenizer) if whose == "the teacher's" else None
    records = _records(responses, fingerprint)
    with caplog.at_level(logging.WARNING, logger="bayeskd.data"):
        tokenized = tokenize_records(records, tiny_tokenizer)
    report = tokenized.report
    assert (report.teacher_tokens, report.noncanonical) == (0, 0)
    assert (report.no_fingerprint, report.other_fingerprint) == ((0, 2) if fingerprint else (2, 0))
    assert sum("generate --teacher-tokenizer" in m for m in caplog.messages) == (0 if fingerprint else 1)
    for q, (text, _) in enumerate(responses):  # the student's own split of the text
        assert _response_bytes(tokenized, tiny_tokenizer, q) == _pieces(tiny_tokenizer, text)
    ev, ev_report = evidence_rows(records, tokenized, tiny_tokenizer)
    assert ev_report["rows_exact"] == ev_report["records_same_tokenizer"] == 0
    assert ev_report["records_cross_tokenizer"] == 2 and ev.has.sum() > 4
    assert ev.lower[ev.indices >= 0].all()  # every revealed entry is a lower bound


def test_the_students_own_fingerprint_keeps_the_teachers_tokens(responses, tiny_tokenizer):
    """The same records, saying they are of the student's tokenizer: the teacher's tokens are kept (its sampled
    split included) and every row but EOS has exact evidence, the teacher's numbers."""
    records = _records(responses, tokenizer_fingerprint(tiny_tokenizer))
    tokenized = tokenize_records(records, tiny_tokenizer)
    report = tokenized.report
    assert (report.teacher_tokens, report.noncanonical, report.no_fingerprint, report.other_fingerprint) == (2, 1, 0, 0)
    for q, (_, pieces) in enumerate(responses):
        assert _response_bytes(tokenized, tiny_tokenizer, q) == pieces
    ev, ev_report = evidence_rows(records, tokenized, tiny_tokenizer)
    n = sum(len(p) for _, p in responses)
    assert ev_report["records_same_tokenizer"] == 2 and ev_report["rows_exact"] == n
    exact = ev.has & ~ev.lower.any(1)
    assert exact.sum() == n and not ev.has[~exact].any()  # the EOS rows stay empty
    np.testing.assert_allclose(ev.probs[exact, 0], 0.5, rtol=1e-6)
    # Without the fingerprint's say-so, asking for the teacher's tokens changes nothing: containment is not enough.
    unknown = tokenize_records(_records(responses, None), tiny_tokenizer, teacher_tokens=True)
    assert unknown.report.teacher_tokens == 0


def test_a_teacher_tokenizer_that_is_no_fingerprint_is_refused_at_load(tmp_path, responses):
    """A tokenizer's name where its fingerprint belongs would never match any student: refused, naming the field."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_records(responses, "gpt2")[0]) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:1: .*'teacher_tokenizer' must be a tokenizer fingerprint"):
        load_teacher_records(path)
