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
    p = {"prompt": "hello"}
    assert request_seed(p, s) == request_seed(p, GenerateSettings(model="other", n=2, temperature=0.7))
    assert request_seed(p, s) != request_seed(p, GenerateSettings(model="m", n=2, temperature=0.7, seed=1))
    assert request_seed(p, s) != request_seed({"prompt": "hello!"}, s)
    assert request_seed(p, GenerateSettings(model="m", seed=None)) is None


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


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("gen") / "teacher", tiny_tokenizer, seed=11)


@pytest.fixture(scope="module")
def server(teacher_dir):
    from bayeskd.teachers.server import running_server

    with running_server(teacher_dir, name="teacher") as url:
        yield url


def _prompts(path, n=6, chat=True):
    rows = [{"prompt": f"Question {i}: what does module {i} return?", "id": f"q{i}"} for i in range(n)]
    if chat:
        rows[1] = {"messages": [{"role": "user", "content": "Explain the list type."}], "id": "chat"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _gen(prompts, out, url, **kw):
    from bayeskd.teachers.generate import generate

    kw.setdefault("max_tokens", 8)
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.01)
    return generate(str(prompts), str(out), model="teacher", base_url=url, **kw)


def test_generate_chat_with_logprobs_loads_as_teacher_data(server, tmp_path):
    from bayeskd.data import load_teacher_records

    prompts = _prompts(tmp_path / "p.jsonl")
    s = _gen(prompts, tmp_path / "t.jsonl", server, n=2, top_logprobs=3, seed=7)
    assert s["complete"] and s["records_total"] + s["empty"] == 12 and s["retries"] == 0
    assert s["completion_tokens"] > 0 and s["api_key_env"] == "OPENAI_API_KEY"
    recs = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len({r["key"] for r in recs}) == len(recs)
    for r in recs:
        text = r["messages"][-1]["content"]
        got = b"".join(bytes(t["bytes"]) for t in r["logprobs"])
        assert text.startswith(got.decode("utf-8", "replace"))  # the tokens' bytes spell the answer
        assert all(len(t["top_logprobs"]) == 3 and t["top_logprobs"][0]["logprob"] >= t["top_logprobs"][-1]["logprob"]
                   for t in r["logprobs"])
        assert r["finish_reason"] in ("stop", "length") and r["settings"]["top_logprobs"] == 3
    loaded, _ = load_teacher_records(tmp_path / "t.jsonl")
    assert len(loaded) == len(recs) and "logprobs" in loaded[0]


def test_local_backend_gives_the_server_answers(server, teacher_dir, tmp_path):
    from bayeskd.teachers.generate import generate

    prompts = _prompts(tmp_path / "p.jsonl", n=3, chat=False)
    kw = dict(n=2, top_logprobs=2, seed=3, max_tokens=6, progress=False, endpoint="completions", ordered=True)
    generate(str(prompts), str(tmp_path / "a.jsonl"), model="teacher", base_url=server, **kw)
    generate(str(prompts), str(tmp_path / "b.jsonl"), model=teacher_dir, backend="hf", **kw)
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [(r["response"], r["logprobs"], r["finish_reason"]) for r in a] == \
           [(r["response"], r["logprobs"], r["finish_reason"]) for r in b]


def test_resume_asks_only_for_what_is_missing(server, tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl", n=8, chat=False)
    out = tmp_path / "t.jsonl"
    _gen(prompts, tmp_path / "full.jsonl", server, endpoint="completions", n=2, seed=1, ordered=True)
    first = _gen(prompts, out, server, endpoint="completions", n=2, seed=1, max_prompts=3)
    assert first["requests"] == 3
    with open(out, "a") as f:
        f.write('{"key": "torn')  # a crash mid-line
    again = _gen(prompts, out, server, endpoint="completions", n=2, seed=1, ordered=True)
    assert again["requests"] == 5 and again["records_written"] + again["empty"] == 10
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    done = _gen(prompts, out, server, endpoint="completions", n=2, seed=1)
    assert done["requests"] == 0 and done["records_written"] == 0


def test_faults_every_request_once_and_the_same_records(teacher_dir, tmp_path):
    """serve-teacher --fail-rate 0.3 --drop-rate 0.1: every request present exactly once, records byte-identical
    to a fault-free run (BAYESKD_DRILL_REQUESTS sets the count; CI runs 120, the drill 500)."""
    import os

    from bayeskd.teachers.server import running_server

    n = int(os.environ.get("BAYESKD_DRILL_REQUESTS", "120"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Item {i} of the list"}) + "\n" for i in range(n)))
    kw = dict(endpoint="completions", max_tokens=4, seed=5, ordered=True, concurrency=8, max_retries=12)
    with running_server(teacher_dir, name="teacher") as url:
        clean = _gen(prompts, tmp_path / "clean.jsonl", url, **kw)
    with running_server(teacher_dir, name="teacher", fail_rate=0.3, drop_rate=0.1, fault_seed=2) as url:
        faulty = _gen(prompts, tmp_path / "faulty.jsonl", url, **kw)
    assert clean["complete"] and faulty["complete"] and faulty["retries"] > 0.2 * n
    assert faulty["errors"].get("APIConnectionError", 0) > 0 and faulty["errors"].get("RateLimitError", 0) > 0
    assert (tmp_path / "faulty.jsonl").read_bytes() == (tmp_path / "clean.jsonl").read_bytes()
    keys = [json.loads(x)["key"] for x in (tmp_path / "faulty.jsonl").read_text().splitlines()]
    assert len(keys) + faulty["empty"] == n and len(set(keys)) == len(keys)


def test_killed_runs_resume_to_the_same_records(server, teacher_dir, tmp_path):
    """generate as a user runs it, against serve-teacher --fail-rate 0.3 --drop-rate 0.1, killed with SIGKILL at
    seeded random moments and restarted until it finishes: the same bytes as an undisturbed, fault-free run."""
    import random
    import signal
    import subprocess
    import sys

    from bayeskd.teachers.server import running_server

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Entry {i} says"}) + "\n" for i in range(60)))
    _gen(prompts, tmp_path / "ref.jsonl", server, endpoint="completions", max_tokens=6, seed=9, ordered=True,
         concurrency=4)
    out = tmp_path / "t.jsonl"
    rng = random.Random(1234)
    print("kill seed 1234")
    with running_server(teacher_dir, name="teacher", fail_rate=0.3, drop_rate=0.1, fault_seed=8) as url:
        cmd = [sys.executable, "-m", "bayeskd.cli", "generate", "--prompts", str(prompts), "--model", "teacher",
               "--base-url", url, "--endpoint", "completions", "--max-tokens", "6", "--seed", "9", "--ordered",
               "--quiet", "--concurrency", "4", "--max-retries", "12", "--out", str(out)]
        kills = 0
        for _ in range(3):
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline, target = time.time() + 60, rng.randint(1, 40)
            while proc.poll() is None and time.time() < deadline:  # kill once some records are written
                if out.exists() and out.read_bytes().count(b"\n") >= target:
                    break
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(30)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert kills >= 1 and res.returncode == 0, res.stderr[-2000:]
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------------- bad input

def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clear_errors_for_a_wrong_setup(server, teacher_dir, tmp_path, monkeypatch):
    from bayeskd.teachers.generate import GenerateError
    from bayeskd.teachers.server import running_server

    prompts = _prompts(tmp_path / "p.jsonl", n=3)
    down = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    with pytest.raises(GenerateError, match=f"cannot reach {down}"):
        _gen(prompts, tmp_path / "a.jsonl", down, max_retries=2)
    with pytest.raises(GenerateError, match="'techer' does not exist; this server serves 'teacher'"):
        from bayeskd.teachers.generate import generate
        generate(str(prompts), str(tmp_path / "b.jsonl"), model="techer", base_url=server, progress=False)
    with pytest.raises(GenerateError, match="n must be at most 16"):
        _gen(prompts, tmp_path / "c.jsonl", server, n=20)
    monkeypatch.setenv("BAYESKD_TEST_KEY", "sk-secret-123")
    with running_server(teacher_dir, name="teacher", api_key="another-key") as url:
        with pytest.raises(GenerateError, match="BAYESKD_TEST_KEY") as e:
            _gen(prompts, tmp_path / "d.jsonl", url, api_key_env="BAYESKD_TEST_KEY")
        assert "sk-secret-123" not in str(e.value)
        monkeypatch.setenv("BAYESKD_TEST_KEY", "another-key")
        assert _gen(prompts, tmp_path / "d.jsonl", url, api_key_env="BAYESKD_TEST_KEY")["complete"]
    for f in tmp_path.glob("*"):
        assert "sk-secret-123" not in f.read_text(errors="replace")  # the key is never written
    with pytest.raises(ValueError, match="at most 20"):
        _gen(prompts, tmp_path / "e.jsonl", None, top_logprobs=21)


def _stub_chat_app(answer):
    """A stub OpenAI-compatible chat server (FastAPI, for `running_app`) and the count of requests per prompt text.
    `await answer(text, n, times)` (times: this request's count for the text) returns the n answer texts, or a
    response of its own (a failure)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    seen: dict[str, int] = {}
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        text = body["messages"][-1]["content"]
        seen[text] = seen.get(text, 0) + 1
        out = await answer(text, body.get("n", 1), seen[text])
        if not isinstance(out, list):
            return out
        choices = [{"index": i, "message": {"role": "assistant", "content": a}, "finish_reason": "stop"}
                   for i, a in enumerate(out)]
        if body.get("logprobs"):  # one token per character, as an API without a tokenizer report sends them
            for c, a in zip(choices, out):
                c["logprobs"] = {"content": [{"token": ch, "bytes": list(ch.encode()), "logprob": -0.1,
                                              "top_logprobs": [{"token": ch, "bytes": list(ch.encode()),
                                                                "logprob": -0.1}]} for ch in a]}
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
                             "choices": choices,
                             "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    return app, seen

def test_malformed_json_timeouts_and_empty_answers(tmp_path):
    """A stub server: the first answer to each prompt is broken JSON or too slow, and prompt 2 always gets an
    empty answer; the broken ones are retried, the empty one is listed in t.empty.jsonl, nothing is lost."""
    from fastapi.responses import Response

    from bayeskd.teachers.server import running_app

    async def answer(text: str, n: int, times: int):
        if times == 1 and text.endswith("0"):
            return Response('{"id": "x", "choices": [', media_type="application/json")  # malformed
        if times == 1 and text.endswith("1"):
            await asyncio.sleep(2.0)  # past the client's timeout
        return [" \n" if text.endswith("2") else f"answer to {text}"]  # whitespace only: empty

    app, seen = _stub_chat_app(answer)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    with running_app(app) as url:
        from bayeskd.teachers.generate import generate

        s = generate(str(prompts), str(tmp_path / "t.jsonl"), model="stub", base_url=f"{url}/v1", timeout=0.5,
                     backoff=0.01, progress=False)
        kept = generate(str(prompts), str(tmp_path / "k.jsonl"), model="stub", base_url=f"{url}/v1", timeout=0.5,
                        backoff=0.01, progress=False, keep_empty=True)
    assert s["complete"] and s["records_total"] == 3 and s["empty"] == 1 and s["retries"] == 2
    assert json.loads((tmp_path / "t.empty.jsonl").read_text())["messages"][-1]["content"] == " \n"
    assert {json.loads(x)["messages"][0]["content"] for x in (tmp_path / "t.jsonl").read_text().splitlines()} == \
        {"q0", "q1", "q3"}
    # --keep-empty: the blank answer is a sample like the others, and the loader takes it (it has its finish_reason)
    assert kept["records_total"] == 4 and kept["empty"] == 0 and kept["empty_kept"] == 1
    from bayeskd.data import load_teacher_records

    records, _ = load_teacher_records(str(tmp_path / "k.jsonl"))
    assert sorted(r["messages"][-1]["content"] for r in records)[0] == " \n"


def test_repeated_prompts_are_asked_once_and_the_summary_adds_up(tmp_path, caplog):
    """Issue 27: lines with distinct ids but the same prompt text share their record keys, so each was asked and
    its answers thrown away. A stub server counts what it is asked: every distinct prompt once, the repeats named
    in the summary, and `complete` only when every expected record is there."""
    import logging

    from fastapi.responses import JSONResponse

    from bayeskd.teachers.generate import generate
    from bayeskd.teachers.server import running_app

    broken: set[str] = set()

    async def answer(text: str, n: int, times: int):
        if text in broken:
            return JSONResponse({"error": {"message": "down for this one"}}, status_code=500)
        return [f"answer {i} to {text}" for i in range(n)]

    app, seen = _stub_chat_app(answer)

    texts = [f"question {j}" for j in range(8)] + ["question 0", "question 3", "question 3", "question 5"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, "id": f"p{i}"}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "t.jsonl"
    kw = dict(model="stub", n=2, backoff=0.01, progress=False, max_retries=0, concurrency=4)
    broken.add("question 6")  # one distinct prompt fails: the run is not complete, and says by how much
    with running_app(app) as url, caplog.at_level(logging.WARNING, logger="bayeskd.teachers.generate"):
        s = generate(str(prompts), str(out), base_url=f"{url}/v1", **kw)
        warnings = [r.getMessage() for r in caplog.records if "repeat an earlier one" in r.getMessage()]
        assert len(warnings) == 1 and "4 prompt(s)" in warnings[0] and "'p8'" in warnings[0]
        assert sorted(seen) == sorted(set(texts)) and set(seen.values()) == {1}  # no prompt asked twice
        assert s["requests"] == 8 and s["requests_failed"] == 1
        assert (s["prompts"], s["distinct_prompts"], s["duplicate_prompts"]) == (12, 8, 4)
        assert s["duplicates"] == [{"prompt_index": 8, "id": "p8", "same_as": 0},
                                   {"prompt_index": 9, "id": "p9", "same_as": 3},
                                   {"prompt_index": 10, "id": "p10", "same_as": 3},
                                   {"prompt_index": 11, "id": "p11", "same_as": 5}]
        assert (s["records_expected"], s["records_total"], s["records_missing"]) == (16, 14, 2)
        assert not s["complete"]
        broken.clear()
        again = generate(str(prompts), str(out), base_url=f"{url}/v1", **kw)
    assert again["requests"] == 1 and seen["question 6"] == 2 and sum(seen.values()) == 9  # only the failed one
    assert again["complete"] and again["records_total"] == again["records_expected"] == 16
    assert again["records_missing"] == 0 and again["duplicate_prompts"] == 4
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 16 and len({r["key"] for r in recs}) == 16
    # a repeated prompt's records are its first line's
    assert {(r["id"], r["prompt_index"]) for r in recs if r["messages"][0]["content"] == "question 3"} == {("p3", 3)}
    assert json.loads((tmp_path / "t.summary.json").read_text()) == again


def test_failures_after_all_retries_are_listed_and_asked_again(teacher_dir, tmp_path):
    from bayeskd.teachers.server import running_server

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Line {i}"}) + "\n" for i in range(12)))
    kw = dict(endpoint="completions", max_tokens=3, seed=4)
    with running_server(teacher_dir, name="teacher", fail_rate=0.5, fault_seed=3) as url:
        s = _gen(prompts, tmp_path / "t.jsonl", url, max_retries=0, **kw)  # no retries: some must fail
    assert 0 < s["requests_failed"] < 12 and not s["complete"]
    failed = [json.loads(x) for x in (tmp_path / "t.failed.jsonl").read_text().splitlines()]
    assert len(failed) == s["requests_failed"] and all("HTTP" in f["error"] for f in failed)
    with running_server(teacher_dir, name="teacher") as url:
        again = _gen(prompts, tmp_path / "t.jsonl", url, **kw)
    assert again["complete"] and again["requests"] == s["requests_failed"]
    assert (tmp_path / "t.failed.jsonl").read_text() == ""


def test_cli_generate_names_a_bad_prompt_line(tmp_path):
    from click.testing import CliRunner

    from bayeskd.cli import main

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    res = CliRunner().invoke(main, ["generate", "--prompts", str(bad), "--out", str(tmp_path / "t.jsonl"),
                                    "--model", "m", "--base-url", "http://127.0.0.1:9/v1"])
    assert res.exit_code != 0 and "p.jsonl:2" in res.output and "'prompt' must be a string" in res.output


# ---------------------------------------------------------------------------------------------------- teacher tokenizer

def test_serve_teacher_reports_its_tokenizer_and_generate_writes_it(server, teacher_dir, tiny_tokenizer, tmp_path):
    """Issue 27 item 3: serve-teacher sends its tokenizer's fingerprint (`bayeskd_tokenizer`, beside the OpenAI
    fields); generate writes it into every record with logprobs (over HTTP and with the local backend), so a
    student with that tokenizer keeps the teacher's own tokens."""
    import httpx

    from bayeskd.data import load_teacher_records, tokenize_records
    from bayeskd.core.sparse import tokenizer_fingerprint
    from bayeskd.teachers.generate import generate

    fp = tokenizer_fingerprint(tiny_tokenizer)
    for path, body in (("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("completions", {"prompt": "hi"})):
        r = httpx.post(f"{server}/{path}", json={"model": "teacher", "max_tokens": 2, **body}, timeout=60)
        assert r.status_code == 200 and r.json()["bayeskd_tokenizer"] == fp
    prompts = _prompts(tmp_path / "p.jsonl")
    s = _gen(prompts, tmp_path / "t.jsonl", server, n=2, top_logprobs=2, seed=5)
    assert s["complete"] and s["teacher_tokenizer"] == fp
    records, _ = load_teacher_records(tmp_path / "t.jsonl")
    assert records and all(r["teacher_tokenizer"] == fp for r in records)
    report = tokenize_records(records, tiny_tokenizer).report
    assert report.no_fingerprint == report.other_fingerprint == 0 and report.teacher_tokens > 0
    plain = _prompts(tmp_path / "plain.jsonl", n=2, chat=False)
    _gen(plain, tmp_path / "c.jsonl", server, endpoint="completions", top_logprobs=1, seed=5)
    generate(str(plain), str(tmp_path / "hf.jsonl"), model=teacher_dir, backend="hf", endpoint="completions",
             top_logprobs=1, seed=5, max_tokens=8, progress=False)
    for out in ("c.jsonl", "hf.jsonl"):  # the completions endpoint, and the local backend without a server
        assert {json.loads(x).get("teacher_tokenizer") for x in (tmp_path / out).read_text().splitlines()} == {fp}
    text = _gen(prompts, tmp_path / "text.jsonl", server, seed=5)  # no logprobs: nothing for a tokenizer to name
    assert text["teacher_tokenizer"] is None
    assert not any("teacher_tokenizer" in json.loads(x) for x in (tmp_path / "text.jsonl").read_text().splitlines())


def test_teacher_tokenizer_names_the_tokenizer_of_an_api_teacher(server, tiny_tokenizer, tiny_tokenizer_dir, tmp_path,
                                                                 caplog):
    """An API (a stub here) reports no tokenizer: its records carry none, so their tokenizer is unknown (students
    re-tokenize them, with a warning), unless `generate --teacher-tokenizer` names it. An output holds the logprobs
    of one tokenizer: resuming with another (or none) is refused, before any request where the name says it; a
    name the teacher contradicts is refused too."""
    import logging

    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from bayeskd.cli import main
    from bayeskd.data import load_teacher_records, tokenize_records
    from bayeskd.core.sparse import tokenizer_fingerprint
    from bayeskd.teachers.generate import GenerateError, generate
    from bayeskd.teachers.server import running_app

    async def answer(text: str, n: int, times: int):
        return [f"answer {i} to {text}" for i in range(n)]

    app, seen = _stub_chat_app(answer)
    fp = tokenizer_fingerprint(tiny_tokenizer)
    bigger = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)  # the student's vocabulary and one token more
    bigger.add_tokens(["<tool>"])
    bigger.save_pretrained(tmp_path / "bigger")
    assert tokenizer_fingerprint(bigger) != fp
    few, more = _prompts(tmp_path / "few.jsonl", n=2, chat=False), _prompts(tmp_path / "more.jsonl", n=3, chat=False)
    unnamed, named = tmp_path / "unnamed.jsonl", tmp_path / "named.jsonl"
    kw = dict(model="stub", top_logprobs=1, progress=False, backoff=0.01)
    with running_app(app) as url:
        s = generate(str(few), str(unnamed), base_url=f"{url}/v1", **kw)
        assert s["complete"] and s["teacher_tokenizer"] is None
        records, _ = load_teacher_records(unnamed)
        assert all("logprobs" in r and "teacher_tokenizer" not in r for r in records)
        with caplog.at_level(logging.WARNING, logger="bayeskd.data"):
            report = tokenize_records(records, tiny_tokenizer).report
        assert (report.no_fingerprint, report.teacher_tokens) == (2, 0)
        assert sum("generate --teacher-tokenizer" in m for m in caplog.messages) == 1
        res = CliRunner().invoke(main, ["generate", "--prompts", str(few), "--out", str(named), "--model", "stub",
                                        "--base-url", f"{url}/v1", "--top-logprobs", "1", "--quiet",
                                        "--teacher-tokenizer", tiny_tokenizer_dir])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["teacher_tokenizer"] == fp
        records, _ = load_teacher_records(named)
        assert len(records) == 2 and all(r["teacher_tokenizer"] == fp for r in records)
        assert tokenize_records(records, tiny_tokenizer).report.teacher_tokens == 2
        asked = sum(seen.values())
        for out, name, why in ((named, str(tmp_path / "bigger"), f"of tokenizer {fp[:12]}"),
                               (unnamed, tiny_tokenizer_dir, "of an unnamed tokenizer")):
            with pytest.raises(GenerateError, match=f"holds records whose logprobs are {why}.*another --out"):
                generate(str(more), str(out), base_url=f"{url}/v1", teacher_tokenizer=name, **kw)
        assert sum(seen.values()) == asked  # refused before any request
        before = named.read_bytes()
        with pytest.raises(GenerateError, match="this run's are of an unnamed tokenizer"):
            generate(str(more), str(named), base_url=f"{url}/v1", **kw)  # known only from the answer
        assert named.read_bytes() == before  # nothing of it written
        again = generate(str(more), str(named), base_url=f"{url}/v1", teacher_tokenizer=tiny_tokenizer_dir, **kw)
        assert again["complete"] and again["records_written"] == 1 and again["teacher_tokenizer"] == fp
    with pytest.raises(GenerateError, match="the teacher reports"):  # serve-teacher knows its own tokenizer
        _gen(few, tmp_path / "served.jsonl", server, top_logprobs=1, teacher_tokenizer=str(tmp_path / "bigger"))
    assert not (tmp_path / "served.jsonl").exists() or not (tmp_path / "served.jsonl").read_text()


def test_read_done_light_and_order_file_stream_whole_lines(tmp_path):
    """Resuming reads each record cut to what it needs (its logprobs dropped, their presence kept); the output is
    put in prompt/sample order by copying its lines as written (equal keys in their order), a torn tail cut first."""
    from bayeskd.teachers.generate import order_file

    out = tmp_path / "t.jsonl"
    recs = [{"key": f"k{p}/{s}", "prompt_index": p, "sample_index": s, "response": "é x", "teacher_tokenizer": "fp",
             "logprobs": [{"token": "é", "bytes": [195, 169], "logprob": -0.5}]} for p, s in
            ((2, 0), (0, 1), (1, 0), (0, 0), (2, 1))]
    recs[2].pop("logprobs")
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in recs]
    out.write_text("".join(lines) + '{"key": "k9/0", "prompt_', encoding="utf-8")  # killed mid-write
    light = read_done(out, light=True)
    assert light[0] == {"key": "k2/0", "prompt_index": 2, "sample_index": 0, "teacher_tokenizer": "fp",
                        "logprobs": None}
    assert ["logprobs" in r for r in light] == [True, True, False, True, True]
    assert out.read_text(encoding="utf-8") == "".join(lines)  # the torn tail cut
    order_file(out)
    assert out.read_text(encoding="utf-8") == "".join(lines[i] for i in (3, 1, 2, 0, 4))
    assert read_done(out) == [recs[i] for i in (3, 1, 2, 0, 4)]
