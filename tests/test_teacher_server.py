"""The local teacher (`bayeskd.teachers.hf.HFTeacher`) and `bayeskd serve-teacher` (`bayeskd.teachers.server`):
reproducible samples, exact token bytes and log-probabilities, stop rules; the OpenAI-compatible server through
the official `openai` SDK, its errors, its injected faults, and that it always stops.

Every network call has a client timeout and every subprocess a wall-clock limit, so no test can hang.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import is_utf8, save_tiny_llama

from bayeskd.teachers import HFTeacher, Teacher, token_bytes_table
from bayeskd.teachers.hf import row_seed
from bayeskd.teachers.server import running_server

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 30.0  # seconds for any one HTTP call
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does os.path.join do?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("teacher") / "tiny-teacher", tiny_tokenizer, seed=0)


@pytest.fixture(scope="module")
def teacher(model_dir) -> HFTeacher:
    return HFTeacher(model_dir, device="cpu")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=TIMEOUT)


def _port(url: str) -> int:
    return int(url.split("//")[1].split("/")[0].rsplit(":", 1)[1])


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _teacher_forced_logprobs(teacher: HFTeacher, prompt_ids: list[int], gen_ids: list[int]) -> torch.Tensor:
    """[len(gen_ids), V]: log_softmax of the logits that predicted each generated token, in one plain forward."""
    ids = torch.tensor([prompt_ids + gen_ids])
    with torch.no_grad():
        logits = teacher.model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(gen_ids)], dim=-1)


# ---------------------------------------------------------------------------------------------------- token bytes

def test_token_bytes_roundtrip_byte_level(tiny_tokenizer):
    table = token_bytes_table(tiny_tokenizer)
    assert len(table) == len(tiny_tokenizer)
    assert all(table[i] == b"" for i in tiny_tokenizer.all_special_ids)
    text = "Héllo wörld — naïve café, 日本語 ☃ and\ttabs\n  spaces"
    ids = tiny_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    # The test means something only if some character is split across tokens.
    assert any(not is_utf8(table[i]) for i in ids)


def test_token_bytes_sentencepiece_byte_fallback():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁hello", "▁w", "r", "ld"]
    tok = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 1 else -5.0) for p in pieces], unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    table = token_bytes_table(hf)
    text = "hello wörld 日"
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert "<0xC3>" in hf.convert_ids_to_tokens(ids)
    # SentencePiece's first "▁" is the space its decoder strips; the bytes keep it.
    assert b"".join(table[i] for i in ids) == b" " + text.encode("utf-8")
    assert table[hf.bos_token_id] == table[hf.eos_token_id] == table[hf.unk_token_id] == b""


# ---------------------------------------------------------------------------------------------------- HFTeacher

def test_seeds_reproduce_and_samples_do_not_depend_on_n(teacher):
    a = teacher.complete("The os module", n=4, max_tokens=16, seed=11, top_logprobs=3)
    b = teacher.complete("The os module", n=4, max_tokens=16, seed=11, top_logprobs=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [[t.to_json() for t in g.tokens] for g in a] == [[t.to_json() for t in g.tokens] for g in b]
    assert len({tuple(g.token_ids) for g in a}) == 4, "the rows of one call must be different samples"
    two = teacher.complete("The os module", n=2, max_tokens=16, seed=11, top_logprobs=3)
    for x, y in zip(a[:2], two):
        assert x.text == y.text and x.token_ids == y.token_ids
        assert [t.logprob for t in x.tokens] == pytest.approx([t.logprob for t in y.tokens], abs=1e-5)
    other = teacher.complete("The os module", n=2, max_tokens=16, seed=12)
    assert [g.token_ids for g in other] != [g.token_ids for g in two]
    assert row_seed(11, 1) == 11 * 1_000_003 + 1 and 0 <= row_seed(-5, 0) < 2**63


def test_text_is_the_decode_never_stripped(teacher):
    table = teacher.token_bytes()
    for g in teacher.complete("  leading spaces ", n=4, max_tokens=24, seed=3):
        assert g.text == teacher.tokenizer.decode(g.token_ids, skip_special_tokens=True,
                                                  clean_up_tokenization_spaces=False)
        raw = b"".join(table[t] for t in g.token_ids)
        if is_utf8(raw):
            assert g.text.encode("utf-8") == raw


def test_max_tokens_is_length(teacher):
    gens = teacher.complete("abc", n=3, max_tokens=7, seed=0)
    assert all(g.finish_reason == "length" and g.completion_tokens == 7 == len(g.token_ids) for g in gens)
    assert all(g.prompt_tokens == len(teacher.encode_prompt("abc")) for g in gens)


def test_greedy_rows_agree_and_follow_the_argmax(teacher):
    gens = teacher.complete("import sys", n=3, max_tokens=10, temperature=0.0, seed=5, logprobs=True, top_logprobs=1)
    assert gens[0].token_ids == gens[1].token_ids == gens[2].token_ids
    g = gens[0]
    ref = _teacher_forced_logprobs(teacher, teacher.encode_prompt("import sys"), g.token_ids)
    assert g.token_ids == ref.argmax(-1).tolist()
    assert all(t.top[0][2] == t.logprob for t in g.tokens)


def test_logprobs_are_the_models_own_distribution(teacher):
    """Chosen-token log-probabilities equal log_softmax of the logits (recomputed teacher-forced), whatever the
    sampling temperature; the top list is the top-k of that distribution, sorted."""
    prompt = "def f(x):"
    gens = teacher.complete(prompt, n=2, max_tokens=12, temperature=0.7, top_p=0.9, seed=2, top_logprobs=5)
    table = teacher.token_bytes()
    for g in gens:
        assert len(g.tokens) == len(g.token_ids) > 0
        ref = _teacher_forced_logprobs(teacher, teacher.encode_prompt(prompt), g.token_ids)
        for j, (tid, t) in enumerate(zip(g.token_ids, g.tokens)):
            assert t.bytes == table[tid]
            assert t.logprob == pytest.approx(ref[j, tid].item(), abs=1e-4)
            values = [lp for _, _, lp in t.top]
            assert len(values) == 5 and values == sorted(values, reverse=True)
            top_v, top_i = ref[j].topk(5)
            assert values == pytest.approx(top_v.tolist(), abs=1e-4)
            assert [b for _, b, _ in t.top] == [table[i] for i in top_i.tolist()]
            assert torch.logsumexp(torch.tensor(values), 0).item() <= 1e-6
            record = t.to_json()
            assert set(record) == {"token", "bytes", "logprob", "top_logprobs"}
            assert bytes(record["bytes"]) == t.bytes and json.loads(json.dumps(record)) == record
    no_lp = teacher.complete(prompt, n=1, max_tokens=4, seed=2)
    assert no_lp[0].tokens is None


def test_eos_ends_a_sample_and_is_not_in_it(model_dir):
    t = HFTeacher(model_dir, device="cpu")
    eos = t.tokenizer.eos_token_id
    boost = torch.zeros(len(t.tokenizer))
    boost[eos] = 6.0  # EOS gets a share of a few tenths per step: samples end at different places
    t.model.lm_head.register_forward_hook(lambda _m, _i, out: out + boost)
    gens = t.complete("Hello", n=8, max_tokens=30, seed=4, logprobs=True)
    stopped = [g for g in gens if g.finish_reason == "stop"]
    assert stopped, "with a boosted EOS some sample must stop"
    for g in stopped:
        assert eos not in g.token_ids and g.completion_tokens == len(g.token_ids) + 1
        assert len(g.tokens) == len(g.token_ids)
        assert "<eos>" not in g.text


def test_stop_strings_cut_the_text(teacher):
    base = teacher.complete("The function", n=1, max_tokens=24, seed=9)[0]
    table = teacher.token_bytes()
    j = next(j for j in range(3, len(base.token_ids))
             if table[base.token_ids[j]].strip() and table[base.token_ids[j]].isascii()
             and table[base.token_ids[j]].decode().isprintable())
    stop = table[base.token_ids[j]].decode()
    cut = base.text.find(stop)
    g = teacher.complete("The function", n=1, max_tokens=24, seed=9, stop=[stop, "never-ever"], logprobs=True)[0]
    assert g.finish_reason == "stop" and g.text == base.text[:cut]
    kept = b"".join(table[t] for t in g.token_ids)
    assert g.text.encode("utf-8").startswith(kept) and len(g.tokens) == len(g.token_ids)
    assert g.token_ids == base.token_ids[:len(g.token_ids)] and g.completion_tokens <= j + 1


def test_chat_messages_use_the_template(teacher):
    ids = teacher.encode_prompt(messages=CHAT)
    text = teacher.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ids == teacher.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == teacher.tokenizer.bos_token_id
    g = teacher.complete(messages=CHAT, n=2, max_tokens=5, seed=1)
    assert g[0].prompt_tokens == len(ids) and len(g) == 2


def test_teacher_protocol_generate(teacher):
    assert isinstance(teacher, Teacher)
    out = teacher.generate(["alpha", "beta", "gamma"], max_new_tokens=6, temperature=1.0, seed=3)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    assert teacher.generate(["gamma", "alpha"], max_new_tokens=6, seed=3) == [out[2], out[0]]
    with pytest.raises(TypeError):
        teacher.generate("alpha")


def test_bad_requests_are_value_errors(teacher):
    with pytest.raises(ValueError, match="maximum context length is 256"):
        teacher.complete("x " * 300, max_tokens=8)
    with pytest.raises(ValueError):
        teacher.complete("x", n=0)
    with pytest.raises(ValueError):
        teacher.complete("x", messages=CHAT)


# ---------------------------------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def server(teacher):
    with running_server(teacher, name="tiny-teacher") as url:
        yield url
    assert _port_closed(_port(url)), "the server must be stopped after its context"


def test_health_and_models(server):
    base = server[:-len("/v1")]
    assert server.startswith("http://127.0.0.1:")
    assert httpx.get(f"{base}/health", timeout=TIMEOUT).json() == {"status": "ok", "model": "tiny-teacher"}
    assert [m.id for m in _client(server).models.list().data] == ["tiny-teacher"]
    assert _client(server).models.retrieve("tiny-teacher").id == "tiny-teacher"


def test_chat_with_logprobs_matches_the_teacher(server, teacher):
    c = _client(server)
    kw = dict(model="tiny-teacher", messages=CHAT, n=3, max_tokens=8, seed=21, temperature=0.9, logprobs=True,
              top_logprobs=4)
    r = c.chat.completions.create(**kw)
    again = c.chat.completions.create(**kw)
    direct = teacher.complete(messages=CHAT, n=3, max_tokens=8, seed=21, temperature=0.9, top_logprobs=4,
                              logprobs=True)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r.choices] == [ch.message.content for ch in again.choices]
    for ch, g in zip(r.choices, direct):
        assert ch.message.content == g.text and ch.finish_reason == g.finish_reason
        assert [t.model_dump() for t in ch.logprobs.content] == [t.to_json() for t in g.tokens]
    assert r.usage.prompt_tokens == direct[0].prompt_tokens
    assert r.usage.completion_tokens == sum(g.completion_tokens for g in direct)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    plain = c.chat.completions.create(model="tiny-teacher", messages=CHAT, max_completion_tokens=3, seed=1)
    assert plain.choices[0].logprobs is None and plain.usage.completion_tokens <= 3


def test_completions_legacy_logprobs_with_bytes(server, teacher):
    c = _client(server)
    r = c.completions.create(model="tiny-teacher", prompt=["Hello", "Goodbye"], n=2, max_tokens=6, seed=8,
                             logprobs=3, stop="\n\n")
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    for j, prompt in enumerate(["Hello", "Goodbye"]):
        direct = teacher.complete(prompt, n=2, max_tokens=6, seed=8, top_logprobs=3, stop=["\n\n"])
        for g, ch in zip(direct, r.choices[2 * j:2 * j + 2]):
            lp = ch.logprobs.model_dump()
            assert ch.text == g.text
            assert lp["tokens"] == [t.token for t in g.tokens]
            assert lp["token_logprobs"] == [t.logprob for t in g.tokens]
            assert lp["token_bytes"] == [list(t.bytes) for t in g.tokens]
            assert lp["content"] == [t.to_json() for t in g.tokens]
            assert all(max(d.values()) == t.top[0][2] for d, t in zip(lp["top_logprobs"], g.tokens))
            assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    none = c.completions.create(model="tiny-teacher", prompt="Hello", max_tokens=2, seed=8)
    assert none.choices[0].logprobs is None


def test_concurrent_requests_answer_as_alone(server, teacher):
    async def ask_all():
        async with openai.AsyncOpenAI(base_url=server, api_key="x", max_retries=0, timeout=TIMEOUT) as c:
            return await asyncio.gather(*(c.completions.create(model="tiny-teacher", prompt=f"item {i}", max_tokens=5,
                                                               seed=100 + i) for i in range(8)))

    replies = asyncio.run(ask_all())
    for i, r in enumerate(replies):
        assert r.choices[0].text == teacher.complete(f"item {i}", max_tokens=5, seed=100 + i)[0].text


def test_errors_in_openai_shape(server):
    c = _client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert "gpt-4o" in str(e.value) and "tiny-teacher" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="n must be at most 16"):
        c.chat.completions.create(model="tiny-teacher", messages=CHAT, max_tokens=2, n=17)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be at most 20"):
        c.chat.completions.create(model="tiny-teacher", messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="logprobs must be at most 20"):
        c.completions.create(model="tiny-teacher", prompt="x", max_tokens=2, logprobs=25)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.completions.create(model="tiny-teacher", prompt="x", max_tokens=400)
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'presence_penalty'"):
        c.completions.create(model="tiny-teacher", prompt="x", max_tokens=2, presence_penalty=1.0)
    r = httpx.post(f"{server}/chat/completions", content=b'{"model": "tiny-teacher", "messages": [',
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/completions", json={"model": "tiny-teacher", "prompt": "x", "n": "many"},
                   timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(f"{server}/chat/completions", json={"model": "tiny-teacher"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_fail_rate_answers_429_with_retry_after_then_500(teacher):
    with running_server(teacher, fail_rate=1.0) as url:
        c = _client(url)
        with pytest.raises(openai.RateLimitError) as e429:
            c.completions.create(model="tiny-teacher", prompt="x", max_tokens=2)
        assert e429.value.response.headers["retry-after"] == "0"
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="tiny-teacher", prompt="x", max_tokens=2)
        assert httpx.get(url[:-3] + "/health", timeout=TIMEOUT).status_code == 200  # faults spare /health


def test_faults_are_reproducible_from_the_seed(teacher):
    def statuses() -> list[int]:
        with running_server(teacher, fail_rate=0.5, fault_seed=7) as url:
            return [httpx.post(f"{url}/completions", json={"model": "tiny-teacher", "prompt": "x", "max_tokens": 1,
                                                             "seed": 0}, timeout=TIMEOUT).status_code
                    for _ in range(12)]

    first = statuses()
    assert first == statuses() and {200, 429, 500} <= set(first)


def test_drop_rate_closes_the_connection_mid_body(teacher):
    with running_server(teacher, drop_rate=1.0) as url:
        with pytest.raises(openai.APIConnectionError):
            _client(url).chat.completions.create(model="tiny-teacher", messages=CHAT, max_tokens=3)
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete|without sending complete"):
            httpx.post(f"{url}/completions", json={"model": "tiny-teacher", "prompt": "x", "max_tokens": 3},
                       timeout=TIMEOUT)


def test_delay(teacher):
    with running_server(teacher, delay=0.4) as url:
        t0 = time.monotonic()
        _client(url).completions.create(model="tiny-teacher", prompt="x", max_tokens=1)
        assert time.monotonic() - t0 >= 0.4


def test_server_stops_also_on_error(teacher):
    with pytest.raises(RuntimeError, match="boom"):
        with running_server(teacher) as url:
            port = _port(url)
            raise RuntimeError("boom")
    assert _port_closed(port)
    with socket.socket() as busy:  # a port already taken: a clear error, nothing left running
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            with running_server(teacher, port=busy.getsockname()[1]):
                pass


def test_cli_serve_teacher(model_dir):
    """`bayeskd serve-teacher` as a user runs it: answers on the port it was given, stops on SIGINT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from bayeskd.cli import main; main()", "serve-teacher", "--model", model_dir,
           "--port", str(port), "--name", "cli-teacher", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve-teacher did not come up within 120 s"
            time.sleep(0.1)
        r = _client(f"http://127.0.0.1:{port}/v1").chat.completions.create(
            model="cli-teacher", messages=CHAT, max_tokens=3, seed=0, logprobs=True, top_logprobs=2)
        assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"http://127.0.0.1:{port}/v1" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
