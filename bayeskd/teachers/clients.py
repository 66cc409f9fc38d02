"""Clients of a teacher for `bayeskd generate`: the OpenAI-compatible API (official `openai` SDK) and a local
transformers model, each answering one request (n samples of one prompt) and saying how a failure should be
handled (retried, fatal, or the server unreachable); the log-probability formats of both endpoints turned into
the record format; a requests/tokens-per-minute limiter.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from bayeskd.data import DataError
from bayeskd.record_checks import FINGERPRINT
from bayeskd.token_bytes import token_name_bytes

NOT_IN_TOP = -9999.0  # OpenAI's placeholder log-probability for "not among the top k"


def chat_messages(prompt: dict[str, Any], system: str | None) -> list[dict[str, str]]:
    msgs = list(prompt["messages"]) if "messages" in prompt else [{"role": "user", "content": prompt["prompt"]}]
    if system is not None and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def completion_prompt(prompt: dict[str, Any], system: str | None) -> str:
    if "messages" in prompt:
        raise DataError("chat 'messages' prompts need --endpoint chat (the completions endpoint takes text)")
    return prompt["prompt"] if system is None else f"{system}\n\n{prompt['prompt']}"


@dataclass
class Answer:
    """One sample of a request, whatever the backend."""
    text: str
    finish_reason: str | None
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class Reply:
    answers: list[Answer]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokenizer: str | None = None  # the fingerprint of the teacher's tokenizer, where the teacher reports it


def reported_tokenizer(response: Any) -> str | None:
    """The tokenizer fingerprint an answer reports (`bayeskd_tokenizer`, sent by `bayeskd serve-teacher`; other
    servers send none). A malformed one is a malformed response (retried), never written into records."""
    fp = getattr(response, "bayeskd_tokenizer", None)
    if fp is not None and not (isinstance(fp, str) and FINGERPRINT.fullmatch(fp)):
        raise ValueError(f"'bayeskd_tokenizer' must be a tokenizer fingerprint (64 hex digits), got {fp!r:.70}")
    return fp


# ---------------------------------------------------------------------------------------------------- logprobs

def _entry(token: str, token_bytes: list[int] | bytes | None, logprob: float | None) -> dict[str, Any]:
    b = list(token_bytes) if token_bytes is not None else list(token_name_bytes(token))
    lp = None if logprob is None or logprob <= NOT_IN_TOP else float(logprob)
    return {"token": token, "bytes": b, "logprob": lp}


def chat_logprobs(content: list[Any] | None) -> list[dict[str, Any]] | None:
    """Record logprobs from a chat choice's `logprobs.content` (OpenAI objects or dicts)."""
    if content is None:
        return None
    out = []
    for t in content:
        t = t if isinstance(t, dict) else t.model_dump()
        top = [_entry(a["token"], a.get("bytes"), a["logprob"]) for a in (t.get("top_logprobs") or [])]
        out.append({**_entry(t["token"], t.get("bytes"), t["logprob"]),
                    "top_logprobs": [a for a in top if a["logprob"] is not None]})
    return out


def completion_logprobs(lp: Any) -> list[dict[str, Any]] | None:
    """Record logprobs from a completions choice's legacy `logprobs` (tokens, token_logprobs, top_logprobs and,
    from bayeskd serve-teacher, token_bytes)."""
    if lp is None:
        return None
    lp = lp if isinstance(lp, dict) else lp.model_dump()
    if lp.get("content"):  # serve-teacher also sends the chat format, which keeps every alternative's bytes
        return chat_logprobs(lp["content"])
    tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
    tops, token_bytes = lp.get("top_logprobs") or [None] * len(tokens), lp.get("token_bytes") or [None] * len(tokens)
    out = []
    for tok, val, top, tb in zip(tokens, values, tops, token_bytes):
        alts = [_entry(a, None, v) for a, v in sorted((top or {}).items(), key=lambda kv: -kv[1])]
        out.append({**_entry(tok, tb, val), "top_logprobs": [a for a in alts if a["logprob"] is not None]})
    return out


# ---------------------------------------------------------------------------------------------------- backends

RETRYABLE = "retryable"
UNREACHABLE = "unreachable"  # retried, but before any success it soon means the server is not there
FATAL = "fatal"


class OpenAIBackend:
    """The official `openai` SDK's AsyncOpenAI; its own retries are off (ours honour Retry-After and count)."""

    def __init__(self, base_url: str | None, api_key_env: str, timeout: float):
        import openai

        self.openai = openai
        self.base_url = base_url or "https://api.openai.com/v1"
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env)
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key or "EMPTY", timeout=timeout,
                                         max_retries=0)

    async def ask(self, prompt: dict[str, Any], s: Any, seed: int | None) -> Reply:
        common: dict[str, Any] = {"model": s.model, "n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                                  "max_tokens": s.max_tokens, "stop": s.stop}
        if seed is not None:
            common["seed"] = seed
        if s.endpoint == "chat":
            if s.top_logprobs:
                common.update(logprobs=True, top_logprobs=s.top_logprobs)
            r = await self.client.chat.completions.create(messages=chat_messages(prompt, s.system), **common)
            answers = [Answer(c.message.content or "", c.finish_reason,
                              chat_logprobs(c.logprobs.content if c.logprobs is not None else None)
                              if s.top_logprobs else None) for c in sorted(r.choices, key=lambda c: c.index)]
        else:
            if s.top_logprobs:
                common["logprobs"] = s.top_logprobs
            r = await self.client.completions.create(prompt=completion_prompt(prompt, s.system), **common)
            answers = [Answer(c.text or "", c.finish_reason, completion_logprobs(c.logprobs) if s.top_logprobs
                              else None) for c in sorted(r.choices, key=lambda c: c.index)]
        if len(answers) != s.n:
            raise ValueError(f"asked for n={s.n} samples, the server returned {len(answers)}")
        usage = r.usage
        return Reply(answers, int(getattr(usage, "prompt_tokens", 0) or 0),
                     int(getattr(usage, "completion_tokens", 0) or 0), reported_tokenizer(r))

    def classify(self, e: BaseException) -> tuple[str, float | None, str]:
        """(retryable or fatal, the server's Retry-After in seconds or None, a message for the user)."""
        o = self.openai
        if isinstance(e, o.APIStatusError):
            retry_after = _retry_after(e.response.headers) if e.response is not None else None
            msg = _server_message(e)
            if isinstance(e, (o.AuthenticationError, o.PermissionDeniedError)):
                return FATAL, None, (f"{self.base_url} refused the API key (HTTP {e.status_code}: {msg}); set a valid "
                                      f"key in the environment variable {self.api_key_env}")
            if e.status_code == 429 or e.status_code >= 500 or e.status_code == 408:
                return RETRYABLE, retry_after, f"HTTP {e.status_code}: {msg}"
            return FATAL, None, f"{self.base_url} answered HTTP {e.status_code}: {msg}"
        if isinstance(e, o.APIConnectionError):  # also timeouts and connections dropped mid-body
            return UNREACHABLE, None, f"cannot reach {self.base_url} ({type(e).__name__}: {e})"
        if isinstance(e, (o.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError, TypeError)):
            return RETRYABLE, None, f"malformed response: {type(e).__name__}: {e}"
        return FATAL, None, f"{type(e).__name__}: {e}"

    async def close(self) -> None:
        await self.client.close()


class HFBackend:
    """A local transformers model (`bayeskd.teachers.hf.HFTeacher`), one request at a time in a worker thread, or
    with `max_batch` > 1 the requests in flight decoded together (`bayeskd.teachers.batching`)."""

    def __init__(self, model: str, device: str | None = None, max_batch: int = 1, batch_wait: float = 0.005):
        from bayeskd.core.sparse import tokenizer_fingerprint
        from bayeskd.teachers.hf import HFTeacher

        self.teacher = HFTeacher(model, device=device)
        self.fingerprint = tokenizer_fingerprint(self.teacher.tokenizer)
        self.base_url = f"hf:{model}"
        self._lock = asyncio.Lock()
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self._batcher: Any = None
        self._executor: Any = None

    async def ask(self, prompt: dict[str, Any], s: Any, seed: int | None) -> Reply:
        kw = dict(n=s.n, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=seed or 0,
                  stop=s.stop, top_logprobs=s.top_logprobs, logprobs=s.top_logprobs > 0)
        if s.endpoint == "chat":
            kw["messages"] = chat_messages(prompt, s.system)
        else:
            kw["prompt"] = completion_prompt(prompt, s.system)
        if self.max_batch > 1:
            gens = await self._batched().submit(kw)
        else:
            async with self._lock:
                gens = await asyncio.to_thread(self.teacher.complete, **kw)
        answers = [Answer(g.text, g.finish_reason, [t.to_json() for t in g.tokens] if s.top_logprobs else None)
                   for g in gens]
        return Reply(answers, sum(g.prompt_tokens for g in gens[:1]), sum(g.completion_tokens for g in gens),
                     self.fingerprint)

    def _batched(self) -> Any:
        if self._batcher is None:
            from concurrent.futures import ThreadPoolExecutor

            from bayeskd.teachers.batching import Batcher

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
            self._batcher = Batcher(self.teacher, self._executor, self.max_batch, self.batch_wait)
            self._batcher.start()
        return self._batcher

    def classify(self, e: BaseException) -> tuple[str, float | None, str]:
        return FATAL, None, f"{type(e).__name__}: {e}"

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._batcher = self._executor = None


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                return None  # an HTTP date: fall back to our backoff
    return None


def _server_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(e, "message", e))


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets as token buckets (None: unlimited). Tokens are counted
    before the answer (the prompt's characters / 4 plus max_tokens x n), as the servers' limiters do."""

    def __init__(self, rpm: float | None, tpm: float | None):
        self.buckets = [{"kind": kind, "limit": float(x), "level": float(x), "at": time.monotonic()}
                        for kind, x in (("requests", rpm), ("tokens", tpm)) if x]

    async def acquire(self, tokens: float) -> None:
        for b in self.buckets:
            cost = 1.0 if b["kind"] == "requests" else min(float(tokens), b["limit"])  # never more than a full bucket
            while True:
                now = time.monotonic()
                b["level"] = min(b["limit"], b["level"] + (now - b["at"]) * b["limit"] / 60.0)
                b["at"] = now
                if b["level"] >= cost:
                    b["level"] -= cost
                    break
                await asyncio.sleep((cost - b["level"]) * 60.0 / b["limit"])


