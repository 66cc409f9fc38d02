"""`bayeskd score`: a teacher's log-probabilities of given texts (echo with logprobs), against `serve-teacher`
(loopback, a free port, always stopped) and stub servers: the model's own teacher-forced numbers, generate's
evidence for the same tokens, resume, faults, servers that cannot score, texts that cannot be scored."""
import json
import time

import pytest
import torch

from bayeskd.teachers.score import Skip, response_part


def _e(tok: str, b: bytes, lp=-1.0):
    return {"token": tok, "bytes": list(b), "logprob": lp, "top_logprobs": []}


def test_response_part_splits_by_bytes():
    toks = [_e("<bos>", b"", None), _e("Hi", b"Hi"), _e(" there", b" there"), _e("!", b"!")]
    assert response_part(toks, "Hi", " there!") == toks[2:]
    named = [_e("<s>", b"<s>", None)] + toks[1:]  # a BOS spelled by its name (vLLM's token strings)
    assert response_part(named, "Hi", " there!") == named[2:]
    assert response_part(toks, "", "Hi there!") == toks[1:]  # no prompt: every token is the response's
    with pytest.raises(Skip, match="spans the end of the prompt") as e:
        response_part(toks, "Hi th", "ere!")
    assert e.value.args[0] == "boundary"
    with pytest.raises(Skip, match="first difference at byte 3") as e:
        response_part(toks, "Hi", " where!")
    assert e.value.args[0] == "mismatch"
    with pytest.raises(Skip) as e:
        response_part(toks, "Hi there!", "")
    assert e.value.args[0] == "empty"


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("score") / "teacher", tiny_tokenizer, seed=11)


@pytest.fixture(scope="module")
def counted(teacher_dir):
    """serve-teacher as `running_server` runs it, with a count of the texts asked at /v1/completions."""
    from bayeskd.teachers.hf import HFTeacher
    from bayeskd.teachers.server import create_app, running_app

    app = create_app(HFTeacher(teacher_dir, device="cpu"), "teacher")
    asked: list[str] = []

    @app.middleware("http")
    async def count(request, call_next):
        if request.url.path == "/v1/completions":
            asked.append(json.loads(await request.body())["prompt"])
        return await call_next(request)

    with running_app(app) as url:
        yield f"{url}/v1", asked


@pytest.fixture
def server(counted):
    return counted[0]


def _texts(path, n=6):
    rows = [{"prompt": f"Question {i}: what does module {i} return?", "response": f" It returns item {i}, or None.",
             "id": f"q{i}", "finish_reason": "stop"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(records, out, url, **kw):
    from bayeskd.teachers.score import score

    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.01)
    return score(str(records), str(out), model="teacher", base_url=url, **kw)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_scores_are_the_models_teacher_forced_logprobs(server, teacher_dir, tiny_tokenizer, tmp_path):
    from bayeskd.core.sparse import tokenizer_fingerprint
    from bayeskd.teachers.hf import HFTeacher
    from bayeskd.token_bytes import token_bytes_table

    s = _score(_texts(tmp_path / "in.jsonl"), tmp_path / "t.jsonl", server, top_logprobs=4, ordered=True)
    assert s["complete"] and s["records_total"] == 6 and s["skipped"] == {} and "scores" in s["probe"]
    assert s["teacher_tokenizer"] == tokenizer_fingerprint(tiny_tokenizer)
    model = HFTeacher(teacher_dir, device="cpu").model
    table = token_bytes_table(tiny_tokenizer)
    for r in _lines(tmp_path / "t.jsonl"):
        assert r["teacher_tokenizer"] == s["teacher_tokenizer"] and r["id"].startswith("q")
        ids = tiny_tokenizer(r["prompt"] + r["response"])["input_ids"]
        n_prompt = len(tiny_tokenizer(r["prompt"])["input_ids"])
        assert ids[:n_prompt] == tiny_tokenizer(r["prompt"])["input_ids"]  # no merge at the boundary here
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        assert len(r["logprobs"]) == len(ids) - n_prompt
        for j, e in zip(range(n_prompt, len(ids)), r["logprobs"]):
            assert bytes(e["bytes"]) == table[ids[j]]
            assert e["logprob"] == pytest.approx(logp[j - 1, ids[j]].item(), abs=1e-5)
            v, i = torch.topk(logp[j - 1], 4)
            assert [bytes(a["bytes"]) for a in e["top_logprobs"]] == [table[x] for x in i.tolist()]
            assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(v.tolist(), abs=1e-5)
        assert b"".join(bytes(e["bytes"]) for e in r["logprobs"]) == r["response"].encode()


def test_echo_and_prompt_logprobs_on_the_server(server, teacher_dir, tiny_tokenizer):
    """serve-teacher's /v1/completions: echo (with and without generation) and vLLM's prompt_logprobs."""
    import httpx

    body = {"model": "teacher", "prompt": "Hello world", "echo": True, "max_tokens": 0, "logprobs": 2,
            "prompt_logprobs": 1}
    c = httpx.post(f"{server}/completions", json=body, timeout=60).json()["choices"][0]
    ids = tiny_tokenizer("Hello world")["input_ids"]
    lp = c["logprobs"]
    assert c["text"] == "Hello world" and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:]) and lp["text_offset"][-1] == len("Hello worl")
    pl = c["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(ids)
    for j in range(1, len(ids)):
        own = pl[j][str(ids[j])]
        assert own["logprob"] == pytest.approx(lp["token_logprobs"][j], abs=1e-6) and own["rank"] >= 1
        assert min(x["rank"] for x in pl[j].values()) == 1
    gen = httpx.post(f"{server}/completions", json={**body, "max_tokens": 3, "seed": 1, "prompt_logprobs": None},
                     timeout=60).json()["choices"][0]
    plain = httpx.post(f"{server}/completions", json={"model": "teacher", "prompt": "Hello world", "max_tokens": 3,
                                                      "seed": 1, "logprobs": 2}, timeout=60).json()["choices"][0]
    assert gen["text"] == "Hello world" + plain["text"]
    assert gen["logprobs"]["tokens"] == lp["tokens"] + plain["logprobs"]["tokens"]
    r = httpx.post(f"{server}/completions", json={"model": "teacher", "prompt": "x", "max_tokens": 0}, timeout=60)
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_scored_records_give_generates_evidence(server, tiny_tokenizer, tmp_path):
    """generate's records scored again: where the teacher's sampled tokens are the ones it gets by tokenizing the
    text, the scored record's evidence (load_teacher_records, tokenize_records, evidence_rows) is generate's own."""
    import numpy as np

    from bayeskd.data import load_teacher_records, tokenize_records
    from bayeskd.posterior.evidence import evidence_rows
    from bayeskd.teachers.generate import generate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Item {i} of the list is"}) + "\n" for i in range(8)))
    generate(str(prompts), str(tmp_path / "g.jsonl"), model="teacher", base_url=server, endpoint="completions",
             n=4, max_tokens=3, top_logprobs=3, seed=2, ordered=True, progress=False)
    s = _score(tmp_path / "g.jsonl", tmp_path / "s.jsonl", server, top_logprobs=3)
    n_gen = len(_lines(tmp_path / "g.jsonl"))  # (blank answers are set apart by generate)
    assert s["records_written"] + sum(s["skipped"].values()) == n_gen > 24 and set(s["skipped"]) <= {"boundary"}
    gen = {r["key"]: r for r in _lines(tmp_path / "g.jsonl")}
    same = []
    for r in _lines(tmp_path / "s.jsonl"):
        g = gen[r["source_key"]]
        assert (r["prompt"], r["response"], r["finish_reason"]) == (g["prompt"], g["response"], g["finish_reason"])
        if [t["bytes"] for t in r["logprobs"]] == [t["bytes"] for t in g["logprobs"]]:
            same.append((g, r))
    assert len(same) >= 3, len(same)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(g) + "\n" for g, _ in same))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for _, r in same))
    evs = []
    for f in ("a.jsonl", "b.jsonl"):
        recs, _ = load_teacher_records(tmp_path / f)
        tok = tokenize_records(recs, tiny_tokenizer)
        assert tok.report.teacher_tokens == len(same)
        evs.append(evidence_rows(recs, tok, tiny_tokenizer)[0])
    a, b = evs
    assert a.has.sum() > 0 and (a.indices == b.indices).all() and (a.lower == b.lower).all()
    assert not a.lower.any() and (a.chosen == b.chosen).all()
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_resume_asks_only_for_the_rest(counted, tmp_path):
    url, asked = counted
    texts = _texts(tmp_path / "in.jsonl", n=8)
    _score(texts, tmp_path / "full.jsonl", url, ordered=True)
    out = tmp_path / "t.jsonl"
    before = len(asked)
    first = _score(texts, out, url, max_records=3)
    assert first["requests"] == 3 and len(asked) - before == 1 + 3  # the probe, then the three
    with open(out, "a") as f:
        f.write('{"key": "torn')  # a crash mid-line
    before = len(asked)
    again = _score(texts, out, url, ordered=True)
    assert again["requests"] == 5 and again["records_written"] == 5 and len(asked) - before == 1 + 5
    assert set(asked[-5:]) == {json.loads(x)["prompt"] + json.loads(x)["response"]
                               for x in texts.read_text().splitlines()[3:]}
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    before = len(asked)
    done = _score(texts, out, url)
    assert done["requests"] == 0 and done["complete"] and len(asked) == before  # no probe either


def test_faults_every_record_once_and_the_same_bytes(teacher_dir, tmp_path):
    """serve-teacher --fail-rate 0.3 --drop-rate 0.1: the probe and every record retried through the faults, the
    output byte-identical to a fault-free run."""
    from bayeskd.teachers.server import running_server

    n = 60
    texts = tmp_path / "in.jsonl"
    texts.write_text("".join(json.dumps({"prompt": f"Item {i} of the list", "response": f" is number {i}."}) + "\n"
                             for i in range(n)))
    kw = dict(ordered=True, concurrency=8, max_retries=12, top_logprobs=3)
    with running_server(teacher_dir, name="teacher") as url:
        clean = _score(texts, tmp_path / "clean.jsonl", url, **kw)
    t = time.perf_counter()
    with running_server(teacher_dir, name="teacher", fail_rate=0.3, drop_rate=0.1, fault_seed=2) as url:
        faulty = _score(texts, tmp_path / "faulty.jsonl", url, **kw)
    assert time.perf_counter() - t < 120
    assert clean["complete"] and faulty["complete"] and clean["retries"] == 0 and faulty["retries"] > 0.2 * n
    assert faulty["retries"] < 3 * n and faulty["requests_failed"] == 0
    assert faulty["errors"].get("APIConnectionError", 0) > 0 and faulty["errors"].get("RateLimitError", 0) > 0
    assert (tmp_path / "faulty.jsonl").read_bytes() == (tmp_path / "clean.jsonl").read_bytes()
    keys = [r["key"] for r in _lines(tmp_path / "faulty.jsonl")]
    assert len(keys) == n == len(set(keys))


def _stub_app(mode: str):
    """An OpenAI-compatible completions stub: "no-echo" refuses echo (400), "no-logprobs" echoes without
    logprobs, "normalize" echoes the text with '\\r' removed (one token per character)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    asked: list[str] = []

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        asked.append(body["prompt"])
        if mode == "no-echo" and body.get("echo"):
            return JSONResponse({"error": {"message": "echo is not supported", "type": "invalid_request_error"}},
                                status_code=400)
        text = body["prompt"].replace("\r", "")
        lp = None
        if mode != "no-logprobs":
            lp = {"tokens": list(text), "token_logprobs": [None] + [-0.5] * (len(text) - 1),
                  "top_logprobs": [None] + [{ch: -0.5} for ch in text[1:]],
                  "text_offset": list(range(len(text)))}
        return JSONResponse({"id": "x", "object": "text_completion", "created": 0, "model": "stub",
                             "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": lp}],
                             "usage": {"prompt_tokens": len(text), "completion_tokens": 0, "total_tokens": 1}})

    return app, asked


def test_a_server_that_cannot_score_is_refused_by_the_probe(tmp_path):
    from click.testing import CliRunner

    from bayeskd.cli import main
    from bayeskd.teachers.score import ScoreError
    from bayeskd.teachers.server import running_app

    texts = _texts(tmp_path / "in.jsonl", n=3)
    for mode, why in (("no-echo", r"cannot score \(probe: echo: true.*HTTP 400: echo is not supported"),
                      ("no-logprobs", "does not return prompt log-probabilities with echo: its answer has no "
                                      "logprobs")):
        app, asked = _stub_app(mode)
        with running_app(app) as url:
            with pytest.raises(ScoreError, match=why) as e:
                _score(texts, tmp_path / f"{mode}.jsonl", f"{url}/v1")
            assert "\n" not in str(e.value) and url in str(e.value)
            assert len(asked) == 1  # the probe only
            assert not (tmp_path / f"{mode}.jsonl").exists() or not (tmp_path / f"{mode}.jsonl").read_text()
            res = CliRunner().invoke(main, ["score", "--records", str(texts), "--out", str(tmp_path / "c.jsonl"),
                                            "--model", "stub", "--base-url", f"{url}/v1", "--quiet"])
            assert res.exit_code == 1 and "Error: the server at" in res.output and "Traceback" not in res.output


def test_empty_responses_and_other_texts_are_counted_skips(server, tmp_path):
    from bayeskd.teachers.server import running_app

    rows = [{"prompt": "Hello", "response": " world", "id": "ok"},
            {"prompt": "Hello", "response": "", "finish_reason": "stop", "id": "empty"},
            {"prompt": "Hello", "response": " a<eos>b", "id": "special"},  # the teacher reads a special token
            {"prompt": "Hell", "response": "o world", "id": "merged"}]  # "lo" spans the boundary
    texts = tmp_path / "in.jsonl"
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = _score(texts, tmp_path / "t.jsonl", server)
    assert s["complete"] and s["records_total"] == 1 and s["requests"] == 3
    assert s["skipped"] == {"empty": 1, "mismatch": 1, "boundary": 1} and s["skipped_total"] == 3
    skipped = {r["id"]: r for r in _lines(tmp_path / "t.skipped.jsonl")}
    assert {k: v["reason"] for k, v in skipped.items()} == {"empty": "empty", "special": "mismatch",
                                                            "merged": "boundary"}
    again = _score(texts, tmp_path / "t.jsonl", server)
    assert again["requests"] == 0 and again["complete"]  # a skip is an answer: not asked again
    app, asked = _stub_app("normalize")
    (tmp_path / "cr.jsonl").write_text(json.dumps({"prompt": "a\r\nb", "response": " c"}) + "\n" +
                                       json.dumps({"prompt": "a", "response": " b"}) + "\n")
    with running_app(app) as url:
        s = _score(tmp_path / "cr.jsonl", tmp_path / "cr-out.jsonl", f"{url}/v1")
    assert s["skipped"] == {"mismatch": 1} and s["records_total"] == 1 and s["teacher_tokenizer"] is None
    assert "echoed another text" in _lines(tmp_path / "cr-out.skipped.jsonl")[0]["detail"]
    assert [e["bytes"] for e in _lines(tmp_path / "cr-out.jsonl")[0]["logprobs"]] == [[32], [98]]


def test_cli_score(server, tmp_path):
    from click.testing import CliRunner

    from bayeskd.cli import main

    texts = _texts(tmp_path / "in.jsonl", n=2)
    res = CliRunner().invoke(main, ["score", "--records", str(texts), "--out", str(tmp_path / "t.jsonl"), "--model",
                                    "teacher", "--base-url", server, "--top-logprobs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    import dataclasses

    from bayeskd.teachers.score import ScoreConfig

    options = {p.name: p for p in main.commands["score"].params}
    assert all(options[f.name].default == f.default for f in dataclasses.fields(ScoreConfig))  # options: the config
    s = json.loads(res.output)
    assert s["complete"] and s["records_total"] == 2 and "settings" not in s
    assert all(len(e["top_logprobs"]) == 2 for r in _lines(tmp_path / "t.jsonl") for e in r["logprobs"])
