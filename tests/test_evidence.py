"""Evidence rows from teacher records' logprobs (`bayeskd.posterior.evidence`): records made by actually running a
teacher (`HFTeacher.complete`, as `bayeskd generate --backend hf` does); exact entries equal to the teacher's own
teacher-forced log-softmax when the student shares its tokenizer; byte-offset alignment, summed lower bounds
across tokenizers; top(k); every kind of bad input named by record; mixed records.

Seeds are fixed (the model's, each prompt's); `SEED` is printed so a failure can be replayed.
"""
import copy
import math
import re

import numpy as np
import pytest
import torch
from conftest import is_utf8, save_tiny_llama

from bayeskd.corpus import embedded_corpus, train_bpe_tokenizer
from bayeskd.data import DataError, tokenize_records
from bayeskd.posterior.evidence import Evidence, StudentVocab, evidence_rows
from bayeskd.core.sparse import tokenizer_fingerprint
from bayeskd.teacher_forcing import target_logprobs, target_row_layout
from bayeskd.teachers.hf import HFTeacher
from bayeskd.token_bytes import token_bytes_table

SEED = 0
K = 5
PROMPTS = ["The os module", "import sys", "def f(x):", "Hello", "A list is", "class Path", "# comment", "x = 1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_tokenizer) -> HFTeacher:
    """A tiny random Llama nudged towards whole UTF-8 tokens: a random model emits a partial character every few
    tokens, after which the text (holding U+FFFD) and the teacher's bytes part ways and no row has evidence. A
    constant hidden component with a negative lm_head weight for partial-character tokens keeps most samples
    whole while a few still break (that path is tested too)."""
    print(f"teacher model seed {SEED}")
    path = save_tiny_llama(tmp_path_factory.mktemp("evidence") / "teacher", tiny_tokenizer, seed=SEED)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    partial = torch.tensor([not is_utf8(b) for b in token_bytes_table(tiny_tokenizer)])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 3.0
        model.lm_head.weight[partial, 0] = -0.8
    model.save_pretrained(path)
    return HFTeacher(path, device="cpu")


def _record(gen, j: int, fingerprint: str, **where) -> dict:
    """A record as `bayeskd generate` writes it (with the teacher's tokenizer fingerprint, as the hf backend and
    serve-teacher report it)."""
    return {"id": f"r{j}", **where, "finish_reason": gen.finish_reason, "teacher_tokenizer": fingerprint,
            "logprobs": [t.to_json() for t in gen.tokens]}


@pytest.fixture(scope="module")
def records(teacher) -> list[dict]:
    out, fp = [], tokenizer_fingerprint(teacher.tokenizer)
    for s, p in enumerate(PROMPTS):
        for g in teacher.complete(prompt=p, n=2, max_tokens=8, top_logprobs=K, logprobs=True, seed=s):
            if g.text:  # generate puts empty answers aside
                out.append(_record(g, len(out), fp, prompt=p, response=g.text))
    chat = [{"role": "user", "content": "What is a path?"}]
    for g in teacher.complete(messages=chat, n=2, max_tokens=8, top_logprobs=K, logprobs=True, seed=99):
        out.append(_record(g, len(out), fp, messages=chat + [{"role": "assistant", "content": g.text}]))
    return out


@pytest.fixture(scope="module")
def same(records, tiny_tokenizer):
    # The text re-tokenized (not the teacher's own tokens, `teacher_tokens=False`): the alignment is what is tested
    # here, also after a split the tokenizer would not make; the teacher's own tokens are tested below.
    tokenized = tokenize_records(records, tiny_tokenizer, teacher_tokens=False)
    ev, report = evidence_rows(records, tokenized, tiny_tokenizer)
    return tokenized, ev, report


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(train_bpe_tokenizer(embedded_corpus(), vocab_size=300,
                                                             out_dir=tmp_path_factory.mktemp("bpe300")))


def _text(rec: dict) -> str:
    return rec["messages"][-1]["content"] if "messages" in rec else rec["response"]


def _rows(tokenized, q: int) -> range:
    _, _, off = target_row_layout(tokenized, range(len(tokenized)))
    return range(int(off[q]), int(off[q + 1]))


# ---------------------------------------------------------------------------------------------------- same tokenizer

def test_same_tokenizer_entries_are_the_teachers_distribution(teacher, records, same, tiny_tokenizer):
    tokenized, ev, report = same
    n = len(records)
    assert report["records_with_logprobs"] == report["records_same_tokenizer"] + report["records_cross_tokenizer"] == n
    assert report["rows"] == ev.num_rows == sum(len(_rows(tokenized, q)) for q in range(n))
    exact = ev.has & ~ev.lower.any(1)
    assert report["rows_exact"] == exact.sum() > 0.5 * report["rows_with_logprobs"]
    # The teacher-forced recomputation over the student's rows (same tokenizer: the student's rows are the
    # teacher's contexts): every exact entry is the model's own probability, the list holds its top K.
    logp = target_logprobs(teacher.model, tokenized)[0].numpy()
    for r in np.nonzero(exact)[0]:
        listed = ev.indices[r] >= 0
        np.testing.assert_allclose(ev.probs[r, listed], np.exp(logp[r, ev.indices[r, listed]]), rtol=1e-4, atol=1e-7)
        top = np.argsort(-logp[r])[:K]
        assert set(top) <= set(ev.indices[r, listed])
        assert ev.cap[r] == pytest.approx(math.exp(logp[r, top[-1]]), rel=1e-4)
        assert np.all(np.diff(ev.probs[r, listed]) <= 0)  # largest first
    table = token_bytes_table(tiny_tokenizer)
    kinds = set()
    for q, rec in enumerate(records):
        rr = _rows(tokenized, q)
        has, ex = ev.has[rr.start:rr.stop], exact[rr.start:rr.stop]
        ids = tokenized.input_ids[q][tokenized.prompt_lengths[q]:]
        if rec["finish_reason"] == "stop":
            assert not has[-1] and ids[-1] == tiny_tokenizer.eos_token_id  # the EOS row stays empty
            ids = ids[:-1]
        else:  # cut off by max_tokens: no EOS was produced, none is appended
            assert rec["finish_reason"] == "length" and tiny_tokenizer.eos_token_id not in ids
        k = int(ex.sum())
        assert ex[:k].all()  # exact rows are a prefix of the response rows ...
        teacher_bytes = [bytes(t["bytes"]) for t in rec["logprobs"]]
        student_bytes = [table[x] for x in ids]
        if teacher_bytes == student_bytes:
            assert k == len(ids)  # ... all of them when the teacher's tokens are the student's
            kinds.add("one to one")
        else:  # ... up to a partial character, a special token or a non-canonical token (then lower bounds)
            d = next(i for i, (x, y) in enumerate(zip(teacher_bytes + [None], student_bytes + [None])) if x != y)
            assert k == d + 1 if k else not any(teacher_bytes[:1])
            kinds.add("broken text" if "\ufffd" in _text(rec) else "special" if b"" in teacher_bytes else "other")
        for j in range(k):  # the sampled token's column is the student's own token where their bytes agree
            if teacher_bytes[j] == table[ids[j]]:
                assert ev.indices[rr.start + j, ev.chosen[rr.start + j]] == ids[j]
    assert kinds == {"one to one", "broken text", "special", "other"}, kinds  # every path taken
    assert report["share_with_evidence"] == pytest.approx(ev.has.mean())


def test_the_teachers_own_tokens_make_every_row_exact(teacher, records, same, tiny_tokenizer):
    """Tokenized with the teacher's own tokens (the default), every record whose logprobs spell its text is one to
    one, the non-canonical ones included (those holding a special token are re-tokenized), so every row but EOS has exact evidence, equal to the teacher's own."""
    retok = same[0]
    tokenized = tokenize_records(records, tiny_tokenizer)
    ev, report = evidence_rows(records, tokenized, tiny_tokenizer)
    table = token_bytes_table(tiny_tokenizer)
    spelled = [[bytes(t["bytes"]) for t in r["logprobs"]] for r in records]  # a special token (no bytes): re-tokenized
    whole = [q for q, r in enumerate(records)  # a partial character reads as U+FFFD in the text; its bytes are known
             if b"".join(spelled[q]).decode("utf-8", "replace") == _text(r) and b"" not in spelled[q]]
    assert any("\ufffd" in _text(records[q]) for q in whole)
    assert tokenized.report.teacher_tokens == len(whole) and 0 < tokenized.report.noncanonical < len(whole)
    changed = 0
    for q in whole:
        ids = tokenized.input_ids[q][tokenized.prompt_lengths[q]:]
        body = ids[:-1] if records[q]["finish_reason"] == "stop" else ids
        assert [table[x] for x in body] == [bytes(t["bytes"]) for t in records[q]["logprobs"]]
        rr = _rows(tokenized, q)
        assert (ev.has & ~ev.lower.any(1))[rr.start:rr.start + len(body)].all()
        changed += not np.array_equal(ids, retok.input_ids[q][retok.prompt_lengths[q]:])
    assert changed == tokenized.report.noncanonical
    logp = target_logprobs(teacher.model, tokenized)[0].numpy()
    r = np.nonzero(ev.has & ~ev.lower.any(1))[0]
    assert len(r) > 0.9 * ev.num_rows - len(records)
    np.testing.assert_allclose(ev.probs[r, 0], np.exp(logp[r, ev.indices[r, 0]]), rtol=1e-4, atol=1e-7)


def test_rows_follow_the_indices_asked_for(records, same, tiny_tokenizer):
    tokenized, ev, _ = same
    part, report = evidence_rows(records, tokenized, tiny_tokenizer, indices=[3, 1])
    want = Evidence.cat([ev[_rows(tokenized, 3).start:_rows(tokenized, 3).stop],
                         ev[_rows(tokenized, 1).start:_rows(tokenized, 1).stop]])
    w = part.indices.shape[1]
    assert report["records"] == 2 and part.num_rows == want.num_rows
    np.testing.assert_array_equal(part.indices, want.indices[:, :w])
    np.testing.assert_array_equal(part.probs, want.probs[:, :w])
    np.testing.assert_array_equal(part.chosen, want.chosen)
    assert (want.indices[:, w:] < 0).all()


def test_records_in_chunks_give_the_same_evidence(records, same, tiny_tokenizer, monkeypatch):
    """Records are read a chunk at a time (the array passes' temporaries were GBs at 1 M tokens with top-20): 4 at a
    time, with a short last chunk, gives the same arrays and report as all at once, exact and lower-bound rows."""
    from bayeskd.posterior import evidence

    tokenized, ev, report = same
    whole_lower = evidence_rows(records, tokenized, tiny_tokenizer, allow_exact=False)
    monkeypatch.setattr(evidence, "EVIDENCE_CHUNK_RECORDS", 4)
    assert len(records) % 4 != 0
    for (got, got_report), (want, want_report) in (
            (evidence_rows(records, tokenized, tiny_tokenizer), (ev, report)),
            (evidence_rows(records, tokenized, tiny_tokenizer, allow_exact=False), whole_lower)):
        for field in ("indices", "probs", "lower", "chosen", "cap"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        assert list(got_report.items()) == list(want_report.items())
    assert whole_lower[0].lower[whole_lower[0].indices >= 0].all() and not ev.lower[ev.indices >= 0].all()


def test_truncated_responses_keep_their_rows(records, same, tiny_tokenizer):
    """max_length cuts responses (and prompts): the kept rows carry the evidence of the full record's first rows
    (the teacher saw the whole prompt, so its numbers stay its numbers)."""
    full, ev, _ = same
    tokenized = tokenize_records(records, tiny_tokenizer, max_length=8, teacher_tokens=False)
    assert tokenized.report.response_truncated > 0
    cut, report = evidence_rows(records, tokenized, tiny_tokenizer)
    assert cut.num_rows == report["rows"] == sum(len(_rows(tokenized, q)) for q in range(len(records)))
    w = cut.indices.shape[1]
    for q in range(len(records)):
        a, b = _rows(tokenized, q), _rows(full, q)
        keep = b.start + len(a) if len(a) < len(b) else b.stop
        np.testing.assert_array_equal(cut.indices[a.start:a.stop], ev.indices[b.start:keep, :w])
        np.testing.assert_array_equal(cut.probs[a.start:a.stop], ev.probs[b.start:keep, :w])


# ---------------------------------------------------------------------------------------------------- tokenizers

def test_cross_tokenizer_aligns_by_byte_offsets(records, other_tokenizer):
    tok = other_tokenizer
    tokenized = tokenize_records(records, tok)
    ev, report = evidence_rows(records, tokenized, tok)
    assert report["records_cross_tokenizer"] == report["records_with_logprobs"] == len(records)
    assert ev.lower[ev.indices >= 0].all()
    assert 0 < report["share_with_evidence"] < 1
    table = token_bytes_table(tok)
    for q, rec in enumerate(records):
        rr = _rows(tokenized, q)
        text = _text(rec).encode()
        t_bytes = [bytes(t["bytes"]) for t in rec["logprobs"]]
        t_start = {}  # teacher positions whose context is the text: up to a broken byte, through a special token
        for i in range(len(t_bytes)):
            context = b"".join(t_bytes[:i])
            if not text.startswith(context) or not all(t_bytes[:i]):
                break
            t_start.setdefault(len(context), i)
        ids = tokenized.input_ids[q][tokenized.prompt_lengths[q]:]
        s_start = np.cumsum([0] + [len(table[x]) for x in ids])[:-1]
        for j, r in enumerate(rr):
            expect = bool(table[ids[j]]) and int(s_start[j]) in t_start
            assert ev.has[r] == expect, (q, j)
            if not expect:
                continue
            pos = rec["logprobs"][t_start[int(s_start[j])]]
            entries = {bytes(a["bytes"]): a["logprob"] for a in pos["top_logprobs"]}
            entries.setdefault(bytes(pos["bytes"]), pos["logprob"])
            # Every alternative lands on some student token (byte-level: every byte is one), masses summed, but
            # for strict prefixes of the observed student token, which are no bound for any one token (dropped)
            obs = table[ids[j]]
            entries = {b: v for b, v in entries.items() if not (b and len(obs) > len(b) and obs.startswith(b))}
            assert ev.mass[r] == pytest.approx(sum(math.exp(v) for v in entries.values()), rel=1e-5, abs=1e-6)
            got = dict(zip(ev.indices[r][ev.indices[r] >= 0].tolist(), ev.probs[r][ev.indices[r] >= 0].tolist()))
            for b, v in entries.items():
                if b and is_utf8(b):
                    first = tok(b.decode(), add_special_tokens=False)["input_ids"][0]
                    assert got[first] >= math.exp(v) * (1 - 1e-5)


def test_lower_bounds_only_when_asked_and_the_vocabulary_is_reused(records, same, other_tokenizer, tiny_tokenizer):
    """allow_exact=False: the same rows, every entry a lower bound, and (byte-level: every alternative maps) the
    same masses. A `StudentVocab` serves several calls; one of another tokenizer is refused."""
    tokenized, ev, _ = same
    vocab = StudentVocab(tiny_tokenizer)
    low, report = evidence_rows(records, tokenized, tiny_tokenizer, vocab=vocab, allow_exact=False)
    again, _ = evidence_rows(records, tokenized, tiny_tokenizer, vocab=vocab, allow_exact=False)
    np.testing.assert_array_equal(low.indices, again.indices)
    assert report["rows_exact"] == report["records_same_tokenizer"] == 0
    assert low.lower[low.indices >= 0].all()
    # the same masses, less the entries that are a strict prefix of the row's observed token (issue 27 item 3: as a
    # lower bound across tokenizers they would claim mass that the tokens extending them share)
    table = token_bytes_table(tiny_tokenizer)
    observed = np.concatenate([np.asarray(tokenized.input_ids[q][tokenized.prompt_lengths[q]:])[:len(_rows(tokenized, q))]
                               for q in range(len(tokenized))])
    expect = ev.mass.astype(np.float64).copy()
    dropped = 0
    for r in np.nonzero(ev.has)[0]:
        o = table[observed[r]]
        for i, pr in zip(ev.indices[r].tolist(), ev.probs[r].tolist()):
            if i >= 0 and table[i] and len(o) > len(table[i]) and o.startswith(table[i]):
                expect[r] -= pr
                dropped += 1
    assert 0 < dropped == report["cross_entries_dropped"]  # the fixture's text has such rows: the check bites
    np.testing.assert_allclose(low.mass, expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="another tokenizer"):
        evidence_rows(records, tokenized, other_tokenizer)
    with pytest.raises(ValueError, match="another tokenizer"):
        evidence_rows(records, tokenized, tiny_tokenizer, vocab=StudentVocab(other_tokenizer))


def _sentencepiece():
    """A SentencePiece-style tokenizer (byte fallback, a prepended "▁" its decoder strips): its tokens' bytes
    carry a leading space the text lacks, and "▁" and <0x20> share the bytes b" "."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁hello", "▁w", "r", "ld"]
    tok = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 1 else -5.0) for p in pieces], unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_leading_space():
    tok = _sentencepiece()
    table = token_bytes_table(tok)
    text = "hello wörld"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert table[ids[0]] == b" hello"  # the space the decoder strips
    alts = [tok.convert_tokens_to_ids(t) for t in ("▁w", "r", "▁")]
    lps = [{"token": "x", "bytes": list(table[t]), "logprob": math.log(0.5),
            "top_logprobs": [{"token": "x", "bytes": list(table[t]), "logprob": math.log(0.5)}] +
                            [{"token": "y", "bytes": list(table[a]), "logprob": math.log(0.1)} for a in alts if a != t]}
           for t in ids]
    rec = {"prompt": "Say:", "response": text, "finish_reason": "stop", "teacher_tokenizer": tokenizer_fingerprint(tok),
           "logprobs": lps}
    ev, report = evidence_rows([rec], tokenize_records([rec], tok), tok)
    assert report["records_same_tokenizer"] == 1 and report["rows_exact"] == len(ids)  # every row but EOS
    for j, t in enumerate(ids):
        got = dict(zip(ev.indices[j].tolist(), ev.probs[j].tolist()))
        assert got[t] == pytest.approx(0.5) and ev.indices[j, ev.chosen[j]] == t
        assert got[tok.convert_tokens_to_ids("▁")] == pytest.approx(0.1) or t == tok.convert_tokens_to_ids("▁")
    assert tok.convert_tokens_to_ids("<0x20>") not in ev.indices  # b" " is "▁", the id that tokenizes it


# ---------------------------------------------------------------------------------------------------- top(k)

@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_top_k_is_an_api_that_returned_fewer(records, same, tiny_tokenizer, k):
    tokenized, ev, _ = same
    fewer, _ = evidence_rows(records, tokenized, tiny_tokenizer, top_k=k)
    cut = ev.top(k)
    assert cut.indices.shape[1] <= k + 1
    np.testing.assert_array_equal(cut.has, fewer.has)
    for r in np.nonzero(ev.has)[0]:
        a = dict(zip(cut.indices[r].tolist(), cut.probs[r].tolist()))
        b = dict(zip(fewer.indices[r].tolist(), fewer.probs[r].tolist()))
        assert a == pytest.approx(b)
        assert cut.indices[r, cut.chosen[r]] == fewer.indices[r, fewer.chosen[r]] == ev.indices[r, ev.chosen[r]]
        if ev.lower[r].any():  # lower-bound rows: an API that lists fewer may leave the observed token unlisted,
            assert fewer.cap[r] >= cut.cap[r] - 1e-6  # and then lifts the cap (top(k) does not know that token)
            continue
        assert cut.cap[r] == pytest.approx(fewer.cap[r])
        assert cut.cap[r] == (1.0 if k == 0 else pytest.approx(np.sort(ev.probs[r])[::-1][k - 1]))


def test_evidence_helpers():
    ev = Evidence(np.array([[3, 1, -1], [-1, -1, -1]]), np.array([[0.5, 0.25, 0], [0, 0, 0]]),
                  np.zeros((2, 3), bool), chosen=np.array([1, -1]), cap=np.array([0.25, 1.0]))
    assert ev.num_rows == len(ev) == 2
    np.testing.assert_array_equal(ev.has, [True, False])
    np.testing.assert_allclose(ev.mass, [0.75, 0])
    both = Evidence.cat([ev, Evidence.empty(3)])
    assert both.num_rows == 5 and both.indices.shape == (5, 3) and not both.has[2:].any()
    assert both[np.array([0])].chosen[0] == 1
    assert ev.top(5).indices.shape == (2, 3) and Evidence.cat([]).num_rows == 0
    one = ev.top(0)
    assert one.indices[0].tolist() == [1] and one.probs[0, 0] == 0.25 and one.cap[0] == 1.0


# ---------------------------------------------------------------------------------------------------- bad input

def _top(rec):
    return rec["logprobs"][1]["top_logprobs"]


def _list_the_sampled_token(rec):
    """The sampled token also as the list's last entry, with another value than its own."""
    pos = rec["logprobs"][1]
    assert all(bytes(a["bytes"]) != bytes(pos["bytes"]) for a in pos["top_logprobs"])
    pos["top_logprobs"][-1] = {"token": pos["token"], "bytes": pos["bytes"],
                               "logprob": pos["top_logprobs"][-2]["logprob"] - 0.01}
    pos["logprob"] = pos["top_logprobs"][-1]["logprob"] - 0.5


def _set_all(rec, value):
    for e in [rec["logprobs"][1]] + _top(rec):
        e["logprob"] = value


BAD = {
    "not sorted": (lambda r: _top(r).reverse(), r"logprobs\[1\]: .*not sorted"),
    "repeated token": (lambda r: _top(r).__setitem__(1, dict(_top(r)[0])), r"logprobs\[1\]: .*repeat the token"),
    "above zero": (lambda r: _top(r)[0].__setitem__("logprob", 0.5), r"logprobs\[1\]: .*> 0"),
    "sum above one": (lambda r: _set_all(r, math.log(0.3)), r"logprobs\[1\]: .*sum to"),
    "missing bytes": (lambda r: _top(r)[2].pop("bytes"), r"logprobs\[1\]: .*no 'bytes'"),
    "bytes not a list": (lambda r: _top(r)[2].__setitem__("bytes", "ab"), r"logprobs\[1\]: .*'bytes' must be a list"),
    "bytes out of range": (lambda r: _top(r)[2].__setitem__("bytes", [300]), r"logprobs\[1\]: .*0..255"),
    "bytes not integers": (lambda r: r["logprobs"][2].__setitem__("bytes", [97.0]), r"logprobs\[2\]: .*0..255"),
    "logprob true": (lambda r: _top(r)[1].__setitem__("logprob", True), r"logprobs\[1\]: .*must be a number"),
    "NaN": (lambda r: _top(r)[0].__setitem__("logprob", float("nan")), r"logprobs\[1\]: .*NaN"),
    "logprob a string": (lambda r: _top(r)[0].__setitem__("logprob", "-1"), r"logprobs\[1\]: .*must be a number"),
    "sampled token disagrees with its entry": (_list_the_sampled_token, r"logprobs\[1\]: .*differs from its"),
    "other response": (lambda r: r.__setitem__("response", "something else entirely"), "do not belong"),
    "response edited": (lambda r: r.__setitem__("response", r["response"][:2] + "#" + r["response"][3:]),
                        "do not belong"),
    "logprobs not a list": (lambda r: r.__setitem__("logprobs", {"a": 1}), "must be a list"),
    "position not an object": (lambda r: r["logprobs"].__setitem__(1, -0.5), r"logprobs\[1\]: .*must be an object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_record(records, tiny_tokenizer, case):
    mutate, message = BAD[case]
    bad = copy.deepcopy(records)
    q = next(i for i, r in enumerate(bad) if "response" in r and len(r["logprobs"]) > 2 and i >= 2)
    mutate(bad[q])
    with pytest.raises(DataError, match=rf"record {q} \(id 'r{q}'\)") as err:
        evidence_rows(bad, tokenize_records(bad, tiny_tokenizer), tiny_tokenizer)
    assert re.search(message, str(err.value)), str(err.value)


def test_placeholder_means_not_in_the_top_k(records, same, tiny_tokenizer):
    tokenized, ev, _ = same
    q = next(i for i, r in enumerate(records) if ev.has[_rows(tokenized, i).start + 1])
    rec = copy.deepcopy(records)
    top = rec[q]["logprobs"][1]["top_logprobs"]
    chosen = bytes(rec[q]["logprobs"][1]["bytes"])
    gone = [j for j in (K - 1, K - 2) if bytes(top[j]["bytes"]) != chosen]
    for j, value in zip(gone, (-9999.0, None)):
        top[j]["logprob"] = value
    got, _ = evidence_rows(rec, tokenize_records(rec, tiny_tokenizer), tiny_tokenizer)
    r = _rows(tokenized, q).start + 1
    old = dict(zip(ev.indices[r].tolist(), ev.probs[r].tolist()))
    new = dict(zip(got.indices[r].tolist(), got.probs[r].tolist()))
    lost = {k for k in old if k not in new}
    assert len(lost) == len(gone) and all(new[k] == old[k] for k in new if k >= 0)
    assert got.mass[r] < ev.mass[r]


def test_a_broken_character_ends_the_evidence(tiny_tokenizer):
    """The teacher emitted a lone byte of a multi-byte character; the text holds U+FFFD (3 bytes) there. Later
    teacher offsets (counted in its bytes) fall on student starts in the text by accident: no evidence there."""
    pieces = [b"a", b"b", b"\xe6", b"c", b"d", b"e", b"f"]
    lps = [{"token": "t", "bytes": list(b), "logprob": math.log(0.2),
            "top_logprobs": [{"token": "t", "bytes": list(b), "logprob": math.log(0.2)},
                             {"token": "u", "bytes": list(b"zz"), "logprob": math.log(0.1)}]} for b in pieces]
    rec = {"prompt": "x", "response": "ab\ufffdcdef", "finish_reason": "length",
           "teacher_tokenizer": tokenizer_fingerprint(tiny_tokenizer), "logprobs": lps}
    tokenized = tokenize_records([rec], tiny_tokenizer, teacher_tokens=False)  # the text re-tokenized
    ev, report = evidence_rows([rec], tokenized, tiny_tokenizer)
    table = token_bytes_table(tiny_tokenizer)
    ids = tokenized.input_ids[0][tokenized.prompt_lengths[0]:]
    starts = np.cumsum([0] + [len(table[x]) for x in ids])[:-1]
    assert set(starts.tolist()) & {3, 4, 5, 6}  # teacher offsets 3..6 (in its bytes) would have coincided
    np.testing.assert_array_equal(ev.has, np.isin(starts, [0, 1, 2]))
    assert report["rows_with_evidence"] >= 1
    # The teacher's own tokens (the default) keep the lone byte: every row is the teacher's, with its evidence.
    own = tokenize_records([rec], tiny_tokenizer)
    assert [table[x] for x in own.input_ids[0][own.prompt_lengths[0]:]] == pieces
    ev, _ = evidence_rows([rec], own, tiny_tokenizer)
    assert ev.has.all() and np.allclose(ev.probs[:, 0], 0.2)  # ("zz" is no student token: lower bounds)


def test_stop_may_cut_inside_a_token_length_may_not(records, tiny_tokenizer):
    rec = copy.deepcopy(records[0])
    rec["response"] += "@@"  # the text goes on past the tokens: what a stop string cut mid-token leaves
    rec["finish_reason"] = "stop"
    ev, report = evidence_rows([rec], tokenize_records([rec], tiny_tokenizer), tiny_tokenizer)
    assert report["rows_with_evidence"] > 0
    rec["finish_reason"] = "length"
    with pytest.raises(DataError, match=r"record 0 \(id 'r0'\): its logprobs do not belong"):
        evidence_rows([rec], tokenize_records([rec], tiny_tokenizer), tiny_tokenizer)


def test_mixed_records(records, same, tiny_tokenizer):
    tokenized, ev, _ = same
    mixed = [r if q % 2 else {k: v for k, v in r.items() if k != "logprobs"} for q, r in enumerate(records)]
    got, report = evidence_rows(mixed, tokenized, tiny_tokenizer)
    assert report["records_with_logprobs"] == len(records) // 2
    for q in range(len(records)):
        rr = _rows(tokenized, q)
        if q % 2:
            w = got.indices.shape[1]
            np.testing.assert_array_equal(got.indices[rr.start:rr.stop], ev.indices[rr.start:rr.stop, :w])
        else:
            assert not got.has[rr.start:rr.stop].any()
    assert report["share_with_evidence"] < report["share_in_logprob_records"]


def test_a_teacher_prefix_of_the_observed_student_token_is_no_bound_for_it():
    """Issue 27 item 3, the audit's case: the teacher reveals {' ': .6, ' s': .2, ' t': .1} where the student's
    token is ' ☃' (the teacher wrote ' ' then '☃'). ' ' is no lower bound for the student's ' ' (its strings go
    on, the observed ' ☃' among them), and the cap of .1 must not push the observed token down: it was made nearly
    impossible (p 0.0003 against 0.70 for ' ')."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from bayeskd.core.condition import apply_evidence
    from bayeskd.core.sparse import SparseDist

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), " ☃", " ", " s", " t", "Say:"]
    model = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 1 else -5.0) for p in pieces], unk_id=0,
                                     byte_fallback=True))
    model.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    snow, space, s_, t_ = (tok.convert_tokens_to_ids(p) for p in (" ☃", " ", " s", " t"))

    def entry(b: bytes, p: float) -> dict:
        return {"token": b.decode(), "bytes": list(b), "logprob": math.log(p)}

    rec = {"prompt": "Say:", "response": " ☃", "finish_reason": "stop", "logprobs": [
        {**entry(b" ", 0.6), "top_logprobs": [entry(b" ", 0.6), entry(b" s", 0.2), entry(b" t", 0.1)]},
        {**entry("☃".encode(), 0.9), "top_logprobs": [entry("☃".encode(), 0.9)]}]}
    tokenized = tokenize_records([rec], tok)
    assert tokenized.input_ids[0][tokenized.prompt_lengths[0]] == snow  # the student writes ' ☃' as one token
    ev, report = evidence_rows([rec], tokenized, tok)
    got = {int(i): float(p) for i, p in zip(ev.indices[0], ev.probs[0]) if i >= 0}
    assert got == pytest.approx({s_: 0.2, t_: 0.1}) and ev.lower[0, :2].all() and ev.cap[0] == 1.0
    assert report["cross_entries_dropped"] == 1 and report["cross_rows_cap_lifted"] == 1
    # a posterior (prior x proxy) that expects the snowman keeps it the most likely token once conditioned
    V = len(tok)
    post = SparseDist(indices=torch.tensor([[snow, space, s_, t_]], dtype=torch.int32),
                      logprobs=torch.tensor([[0.5, 0.3, 0.1, 0.05]]).log(), tail=torch.tensor([0.05]), vocab_size=V)
    out = apply_evidence(post, ev[:1], "condition", 8).to_dense(torch.float64)[0]
    assert out[snow] > 0.3 and out[snow] > out[space], (float(out[snow]), float(out[space]))
    assert out[s_] >= 0.2 - 1e-6 and out[t_] >= 0.1 - 1e-6 and float(out.sum()) == pytest.approx(1.0)
