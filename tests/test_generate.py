"""`bayeskd generate`: keys, resumable output, logprob formats, rate limits, prompt files; end to end against
`serve-teacher` (loopback, a free port, always stopped) with faults, and with the local backend."""
import asyncio
import json
import time

import pytest

from bayeskd.data import DataError, load_prompts
from bayeskd.teachers.clients import RateLimiter, chat_logprobs, completion_logprobs
from bayeskd.teachers.generate import GenerateSettings, read_done, request_key, request_seed


def test_request_key_depends_on_prompt_and_settings_only():
    s = GenerateSettings(model="m", n=2, temperature=0.7)
    a = request_key({"prompt": "hello", "id": 1}, s)
    assert a == request_key({"prompt": "hello", "id": 2}, s)  # the id names the prompt, it is not the question
    assert a != request_key({"prompt": "hello!"}, s)
    assert a != request_key({"prompt": "hello"}, GenerateSettings(model="m", n=2, temperature=0.8))
    assert a != request_key({"messages": [{"role": "user", "content": "hello"}]}, s)
    assert request_seed(0, a) == request_seed(0, a) != request_seed(1, a)
    assert request_seed(None, a) is None


def test_read_done_cuts_a_torn_last_line_and_names_a_corrupt_one(tmp_path):
    out = tmp_path / "t.jsonl"
    good = [{"key": f"k{i}/0", "response": "x"} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in good)
    out.write_text(text + '{"key": "k3/0", "resp')  # killed mid-write
    assert [r["key"] for r in read_done(out)] == ["k0/0", "k1/0", "k2/0"]
    assert out.read_text() == text  # the torn tail is gone, the rest untouched
    out.write_text(text + "{not json\n")  # a complete but broken last line: also a torn write
    assert len(read_done(out)) == 3 and out.read_text() == text
    out.write_text("{not json\n" + text)  # broken in the middle: someone else changed the file
    with pytest.raises(DataError, match="t.jsonl:1"):
        read_done(out)
    assert read_done(tmp_path / "missing.jsonl") == []


def test_logprob_formats_drop_the_not_in_top_placeholder():
    chat = [{"token": "Hi", "bytes": [72, 105], "logprob": -0.1,
             "top_logprobs": [{"token": "Hi", "bytes": [72, 105], "logprob": -0.1},
                              {"token": "Yo", "bytes": None, "logprob": -9999.0}]},
            {"token": "!", "bytes": [33], "logprob": -9999.0, "top_logprobs": []}]
    got = chat_logprobs(chat)
    assert got[0]["top_logprobs"] == [{"token": "Hi", "bytes": [72, 105], "logprob": -0.1}]
    assert got[1]["logprob"] is None  # not a probability of e^-9999
    legacy = {"tokens": ["a", "é"], "token_logprobs": [-0.5, -1.5],
              "top_logprobs": [{"a": -0.5, "b": -9999}, {"é": -1.5, "e": -2.0}], "token_bytes": [[97], [195, 169]]}
    got = completion_logprobs(legacy)
    assert [g["bytes"] for g in got] == [[97], [195, 169]]
    assert [a["token"] for a in got[1]["top_logprobs"]] == ["é", "e"]  # sorted, most likely first
    assert [a["token"] for a in got[0]["top_logprobs"]] == ["a"]


def test_rate_limiter_spaces_requests():
    async def run():
        lim = RateLimiter(rpm=600, tpm=None)  # 10 requests a second, a bucket of 600 to start
        lim.buckets[0]["level"] = 0.0  # empty bucket: each request waits 0.1 s
        t = time.perf_counter()
        for _ in range(3):
            await lim.acquire(1)
        return time.perf_counter() - t

    assert 0.25 < asyncio.run(run()) < 1.0


def test_load_prompts_names_bad_records(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "id": 1}\n{"messages": [{"role": "user", "content": "b"}]}\n{"promt": "c"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:3: missing field 'prompt'"):
        load_prompts(f)
    recs, report = load_prompts(f, skip_bad=True)
    assert len(recs) == 2 and report.skipped == 1 and recs[0]["id"] == 1
    f.write_text('{"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}\n')
    with pytest.raises(DataError, match="user's turn"):
        load_prompts(f)
