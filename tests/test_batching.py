"""Batched decoding (`HFTeacher.complete_batch`, `serve-teacher --max-batch`, `generate --backend hf --max-batch`):
every request's samples are those it gets alone (same tokens, finish reasons and top-k; log-probabilities equal up
to the low bits a batched matmul changes), stop rules hold per row in a mixed batch, faults with batching still
answer every request exactly once, and `--max-batch 1` stays bit-exact.

Servers run on 127.0.0.1 at a free port and always stop; every HTTP call has a timeout.
"""
import asyncio
import json

import httpx
import pytest
from conftest import save_tiny_llama

from bayeskd.teachers import HFTeacher
from bayeskd.teachers.server import create_app, running_app, running_server

TIMEOUT = 60.0
LOGPROB_TOL = 1e-5  # measured: |Δ| ≤ 1e-6 between batch 1 and batch 16 on CPU fp32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("batching") / "teacher", tiny_tokenizer, seed=3, layers=2)


@pytest.fixture(scope="module")
def teacher(model_dir) -> HFTeacher:
    return HFTeacher(model_dir, device="cpu")


def _same(alone, batched) -> None:
    """A request's batched Generations are its unbatched ones: tokens, text, reasons and top-k ids exactly, the
    log-probabilities to LOGPROB_TOL."""
    assert len(alone) == len(batched)
    for a, b in zip(alone, batched):
        assert (a.token_ids, a.text, a.finish_reason, a.completion_tokens, a.prompt_tokens) == (
            b.token_ids, b.text, b.finish_reason, b.completion_tokens, b.prompt_tokens)
        assert (a.tokens is None) == (b.tokens is None)
        for x, y in zip(a.tokens or [], b.tokens or []):
            assert (x.token, x.bytes) == (y.token, y.bytes)
            assert x.logprob == pytest.approx(y.logprob, abs=LOGPROB_TOL)
            assert [t[:2] for t in x.top] == [t[:2] for t in y.top]
            assert [t[2] for t in x.top] == pytest.approx([t[2] for t in y.top], abs=LOGPROB_TOL)


def test_a_batched_request_gets_its_unbatched_samples(teacher):
    """Prompts of different lengths (left padding), n > 1, greedy and nucleus rows, with and without top-k, and
    different lengths (finished rows leave the batch) decoded together."""
    reqs = [dict(prompt="The os module", n=3, max_tokens=12, seed=1, top_logprobs=4),
            dict(prompt="a", max_tokens=20, seed=2, temperature=0.0, logprobs=True),
            dict(prompt="Question 7: what does module seven return when it is called?", max_tokens=5, seed=3,
                 temperature=0.7, top_p=0.8, top_logprobs=2),
            dict(prompt="import sys", max_tokens=16, seed=4),  # text only
            dict(prompt="Item 12 of the list", n=2, max_tokens=9, seed=-5, temperature=1.3, top_logprobs=1)]
    batched = teacher.complete_batch(reqs)
    for r, b in zip(reqs, batched):
        _same(teacher.complete(**r), b)
    # which requests share a batch changes no request's samples
    for r, b in zip(reqs[::-1], teacher.complete_batch(reqs[::-1])):
        _same(teacher.complete(**r), b)


def test_stop_rules_per_row_in_a_mixed_batch(model_dir):
    """EOS, max_tokens and stop strings end their own rows only, with the reasons and cuts `complete` gives."""
    teacher = HFTeacher(model_dir, device="cpu")
    greedy = teacher.complete("The list type", max_tokens=12, temperature=0.0)[0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 12
    teacher.eos_ids = set(teacher.eos_ids) | {greedy.token_ids[4]}  # this row must end at its step 5 by EOS
    sampled = teacher.complete("Entry 3 says", max_tokens=16, seed=8)[0]
    stop = sampled.text[len(sampled.text) // 2:][:3]
    assert stop.strip() and stop in sampled.text
    reqs = [dict(prompt="The list type", max_tokens=12, temperature=0.0, logprobs=True),  # EOS
            dict(prompt="Entry 3 says", max_tokens=16, seed=8, stop=[stop, "\x00never"], top_logprobs=2),  # stop
            dict(prompt="Entry 3 says", max_tokens=3, seed=8),  # max_tokens
            dict(prompt="x" * 300, max_tokens=8),  # too long for the model: its own error, the others answered
            dict(prompt="Entry 4 says", max_tokens=30, seed=9, n=2)]  # runs on after the others ended
    batched = teacher.complete_batch(reqs)
    eos, cut, short, too_long, long = batched
    assert isinstance(too_long, ValueError) and "maximum context length" in str(too_long)
    assert eos[0].finish_reason == "stop" and eos[0].token_ids == greedy.token_ids[:4]
    assert eos[0].completion_tokens == 5 and len(eos[0].tokens) == 4
    assert cut[0].finish_reason == "stop" and stop not in cut[0].text and sampled.text.startswith(cut[0].text)
    assert short[0].finish_reason == "length" and short[0].token_ids == sampled.token_ids[:3]
    for r, b in zip(reqs, batched):
        if not isinstance(b, Exception):
            _same(teacher.complete(**r), b)


def _post_all(url: str, bodies: list[dict]) -> list[dict]:
    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            async def one(body):
                r = await client.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(b) for b in bodies))
    return asyncio.run(run())


def test_server_batches_concurrent_requests_and_max_batch_1_is_bit_exact(teacher):
    bodies = [{"model": "t", "prompt": f"Question {i}: what does module {i} return?" + " more" * (i % 4),
               "max_tokens": 6 + i % 5, "seed": i, "logprobs": 3, "n": 1 + (i % 3 == 0)} for i in range(12)]
    bodies[5]["stop"] = ["e"]
    answers = {}
    for max_batch in (1, 8):
        app = create_app(teacher, "t", max_batch=max_batch, batch_wait=0.05)
        with running_app(app) as url:
            answers[max_batch] = _post_all(url, bodies)
        state = app.state.teacher
        if max_batch == 1:
            assert state.batcher is None  # today's path: one request at a time
    for b, one, many in zip(bodies, answers[1], answers[8]):
        alone = teacher.complete(b["prompt"], n=b["n"], max_tokens=b["max_tokens"], seed=b["seed"], top_logprobs=3,
                                 stop=b.get("stop"))
        # --max-batch 1: the answer of `complete`, bit for bit
        assert [c["logprobs"]["content"] for c in one["choices"]] == [[t.to_json() for t in g.tokens] for g in alone]
        for c1, c8 in zip(one["choices"], many["choices"]):
            assert (c1["text"], c1["finish_reason"], c1["logprobs"]["tokens"]) == (
                c8["text"], c8["finish_reason"], c8["logprobs"]["tokens"])
            assert c1["logprobs"]["token_logprobs"] == pytest.approx(c8["logprobs"]["token_logprobs"],
                                                                     abs=LOGPROB_TOL)
        assert one["usage"] == many["usage"]


def test_batched_server_runs_fewer_batches_than_requests(teacher):
    app = create_app(teacher, "t", max_batch=16, batch_wait=0.2)
    bodies = [{"model": "t", "prompt": f"Item {i}", "max_tokens": 4, "seed": i} for i in range(12)]
    with running_app(app) as url:
        _post_all(url, bodies)
        batcher = app.state.teacher.batcher
        assert batcher.rows == 12 and batcher.batches < 12
        # a request the model cannot answer fails alone, with 400, inside a batch
        async def mixed():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                return await asyncio.gather(
                    client.post(f"{url}/v1/completions", json={"model": "t", "prompt": "x" * 300, "max_tokens": 8}),
                    client.post(f"{url}/v1/completions", json={"model": "t", "prompt": "ok", "max_tokens": 4}))
        bad, good = asyncio.run(mixed())
        assert bad.status_code == 400 and "maximum context length" in bad.json()["error"]["message"]
        assert good.status_code == 200


def _gen(prompts, out, url, **kw):
    from bayeskd.teachers.generate import generate

    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.01)
    return generate(str(prompts), str(out), model="teacher", base_url=url, **kw)


def _by_key(path) -> dict[str, dict]:
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    by_key = {r["key"]: r for r in recs}
    assert len(by_key) == len(recs), "a key written twice"
    return by_key


def _same_records(a: dict[str, dict], b: dict[str, dict]) -> None:
    """Records compared by key: the same keys, and per key the same record but for the log-probabilities' low bits
    (batched runs are reproducible in their tokens, not in the last bits of their log-probabilities)."""
    assert a.keys() == b.keys()
    for key, ra in a.items():
        rb = b[key]
        lpa, lpb = ra.pop("logprobs", None), rb.pop("logprobs", None)
        assert ra == rb
        assert (lpa is None) == (lpb is None)
        for x, y in zip(lpa or [], lpb or []):
            assert (x["token"], x["bytes"]) == (y["token"], y["bytes"])
            assert x["logprob"] == pytest.approx(y["logprob"], abs=LOGPROB_TOL)
            assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]


def test_faults_with_batching_answer_every_request_once(model_dir, tmp_path):
    """serve-teacher --max-batch 8 --fail-rate 0.3 --drop-rate 0.1 against a fault-free --max-batch 8 server:
    every request exactly once, the same records by key (tokens and text exactly, log-probabilities to their low
    bits, since batch composition follows arrival times)."""
    n = 48
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Item {i} of the list"}) + "\n" for i in range(n)))
    kw = dict(endpoint="completions", max_tokens=6, seed=5, concurrency=16, max_retries=12, top_logprobs=2,
              keep_empty=True)
    with running_server(model_dir, name="teacher", max_batch=8) as url:
        clean = _gen(prompts, tmp_path / "clean.jsonl", url, **kw)
    with running_server(model_dir, name="teacher", max_batch=8, fail_rate=0.3, drop_rate=0.1, fault_seed=2) as url:
        faulty = _gen(prompts, tmp_path / "faulty.jsonl", url, **kw)
    assert clean["complete"] and faulty["complete"] and faulty["retries"] > 0.2 * n
    assert faulty["errors"].get("APIConnectionError", 0) > 0 and faulty["errors"].get("RateLimitError", 0) > 0
    clean_recs, faulty_recs = _by_key(tmp_path / "clean.jsonl"), _by_key(tmp_path / "faulty.jsonl")
    assert len(faulty_recs) == n
    _same_records(clean_recs, faulty_recs)
    with running_server(model_dir, name="teacher") as url:  # and the unbatched server's records, by key
        _gen(prompts, tmp_path / "one.jsonl", url, **kw)
    _same_records(_by_key(tmp_path / "one.jsonl"), _by_key(tmp_path / "clean.jsonl"))


def test_generate_backend_hf_batches_to_the_same_records(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Entry {i} says"}) + "\n" for i in range(20)))
    from bayeskd.teachers.generate import generate

    kw = dict(backend="hf", endpoint="completions", max_tokens=8, n=2, seed=3, top_logprobs=3, concurrency=16,
              progress=False, keep_empty=True)
    one = generate(str(prompts), str(tmp_path / "one.jsonl"), model=model_dir, **kw)
    many = generate(str(prompts), str(tmp_path / "many.jsonl"), model=model_dir, max_batch=16, **kw)
    assert one["complete"] and many["complete"] and many["records_total"] == 40
    _same_records(_by_key(tmp_path / "one.jsonl"), _by_key(tmp_path / "many.jsonl"))


def test_requests_joining_a_running_batch_get_their_unbatched_samples(teacher):
    """Continuous batching (`HFTeacher.decoding()`): requests admitted between decoding steps, beside rows already
    half-way (a longer cache: the newcomers are padded on the left) and after others left, get `complete`'s
    samples; a request the model cannot answer comes back at once as its error."""
    first = [dict(prompt="The os module", n=2, max_tokens=10, seed=1, top_logprobs=3),
             dict(prompt="a", max_tokens=4, seed=2, temperature=0.0, logprobs=True)]
    later = [dict(prompt="Question 7: what does module seven return when it is called?", max_tokens=9, seed=3,
                  temperature=0.7, top_p=0.8, top_logprobs=2),
             dict(prompt="x" * 300, max_tokens=8),
             dict(prompt="import sys", max_tokens=6, seed=4, stop=["e"], n=3)]
    last = [dict(prompt="Item 12 of the list", max_tokens=7, seed=-5, temperature=1.3, top_logprobs=1)]
    decoding = teacher.decoding()
    done = dict(decoding.step(list(enumerate(first))))
    for _ in range(3):
        done.update(decoding.step())
    assert decoding.rows == 2  # the greedy row has ended (4 tokens), the n=2 request runs on
    done.update(decoding.step([(2 + i, r) for i, r in enumerate(later)]))
    assert isinstance(done[3], ValueError) and "maximum context length" in str(done[3])
    for _ in range(6):
        done.update(decoding.step())
    done.update(decoding.step([(5, last[0])]))
    while decoding.rows:
        done.update(decoding.step())
    reqs = first + later + last
    assert sorted(done) == list(range(len(reqs)))
    for i, r in enumerate(reqs):
        if i != 3:
            _same(teacher.complete(**r), done[i])


def test_batcher_admits_requests_into_the_running_batch(teacher):
    """Requests arriving while a batch decodes join it (one batch for all of them), and get their samples."""
    from concurrent.futures import ThreadPoolExecutor

    from bayeskd.teachers.batching import Batcher

    reqs = [dict(prompt=f"Entry {i} says", max_tokens=48 + i, seed=i, top_logprobs=2) for i in range(6)]

    async def run():
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = Batcher(teacher, pool, max_batch=4, wait=0.0)
            batcher.start()
            asked = []
            for r in reqs:
                asked.append(asyncio.ensure_future(batcher.submit(r)))
                await asyncio.sleep(0.002)  # arrive while the batch runs
            out = await asyncio.gather(*asked)
            await batcher.close()
            return out, batcher

    out, batcher = asyncio.run(run())
    assert batcher.rows == 6 and batcher.batches == 1
    for r, b in zip(reqs, out):
        _same(teacher.complete(**r), b)


def test_slab_cache_rows_join_leave_and_grow_in_place(teacher):
    """The `Decoding` cache's slab layer against plain per-row lists of states: rows joining (a wider newcomer,
    more rows than its room), steps written in place past the buffer's end, finished rows replaced by the last
    ones, columns trimmed; every shown cell a state or zero padding, right-aligned."""
    import torch

    from bayeskd.teachers.hf import _keep_layer_rows, _slab_cache

    layer = _slab_cache(teacher.model.config, rows=2).layers[0]
    gen = torch.Generator().manual_seed(0)
    rows: list[list[torch.Tensor]] = []  # per row its states [H, D], oldest first

    def states(b, length):
        x = torch.randn(b, 2, length, 3, generator=gen)
        return x, -x

    def join(b, length):
        k, v = states(b, length)
        layer.join(k, v)
        rows.extend([k[i, :, j] for j in range(length)] for i in range(b))

    def step():
        k, v = states(len(rows), 1)
        layer.update(k, v)
        for i, r in enumerate(rows):
            r.append(k[i, :, 0])

    def check():
        width = layer.keys.shape[2]
        assert layer.keys.shape[0] == len(rows) and width >= max(len(r) for r in rows)
        for i, r in enumerate(rows):
            want = torch.stack([torch.zeros(2, 3)] * (width - len(r)) + r, dim=1)
            assert torch.equal(layer.keys[i], want) and torch.equal(layer.values[i], -want)

    join(2, 3)
    check()
    for _ in range(20):  # past the first buffer's columns
        step()
    check()
    join(1, 30)  # wider than the rows so far: they are padded on the left
    join(3, 2)  # beyond the rows' room
    check()
    step()
    keep = [1, 3, 5]  # rows 0, 2 and 4 end: rows 3 and 5 move into places 0 and 2
    order = [3, 1, 5]
    _keep_layer_rows(layer, torch.tensor(order), torch.tensor([0, 2]), torch.tensor([3, 5]))
    rows[:] = [rows[b] for b in order]
    assert sorted(order) == keep
    check()
    first = layer.keys.shape[2] - max(len(r) for r in rows)
    layer.trim(first)
    check()
    step()
    check()
    assert layer.start > 0  # room on the left: a wider newcomer widens the view in place
    buffer = layer.k
    join(1, layer.keys.shape[2] + 1)
    assert layer.k is buffer
    check()


def test_llama_fast_step_matches_the_models_forward(teacher, monkeypatch):
    """`Decoding` steps a Llama through `_llama_step` (the model's modules without its wrappers); the model's own
    forward, which every other architecture takes, gives the same samples (identical logits on our CPU check)."""
    from bayeskd.teachers import hf

    reqs = [dict(prompt="The os module", n=2, max_tokens=10, seed=1, top_logprobs=3),
            dict(prompt="Question 7: what does module seven return when it is called?", max_tokens=9, seed=3,
                 temperature=0.7, top_p=0.8, top_logprobs=2),
            dict(prompt="a", max_tokens=6, seed=2, temperature=0.0, logprobs=True)]
    decoding = teacher.decoding()
    fast = dict(decoding.step(list(enumerate(reqs))))
    assert decoding.fast
    while decoding.rows:
        fast.update(decoding.step())
    monkeypatch.setattr(hf, "_llama_step_fits", lambda model, cache: False)
    slow = teacher.complete_batch(reqs)
    for i, s in enumerate(slow):
        _same(s, fast[i])
