"""`bayeskd serve-teacher`: any local causal LM behind an OpenAI-compatible HTTP API, with log-probabilities and
token bytes (what `transformers serve` refuses), so tests and the lab reach their teacher over HTTP as users do.

Endpoints: `/health`, `/v1/models`, `/v1/chat/completions`, `/v1/completions` (no streaming). Answers follow the
OpenAI formats. `/v1/completions` also scores: with `echo` its text and `logprobs` start with the prompt's (every
prompt token's log-probability given the ones before it, the first None, and its top alternatives, by teacher
forcing in one forward pass; `max_tokens: 0` generates nothing), and vLLM's `prompt_logprobs: k` adds per choice
the prompt's [None, {token id: {logprob, rank, decoded_token}}, ...], as `bayeskd score` asks; completions' legacy `logprobs` also carry `token_bytes` (per token its UTF-8 bytes) and `content`
(the chat format's lossless entries), since the legacy dict of alternatives keys them by text, where two tokens
may collide. Every answer also carries `bayeskd_tokenizer`, the fingerprint of the model's tokenizer
(`bayeskd.core.sparse.tokenizer_fingerprint`; an extra top-level field real APIs lack), which `generate` writes into
its records as `teacher_tokenizer`, so a student with this tokenizer knows the tokens are its own. Errors use
OpenAI's JSON error shape. Model work runs in one worker thread, one request at a time, and every request's answer
depends only on (request, seed) (see `teachers/hf.py`), so faults and retries never change the data. With
`max_batch` N > 1 the generation requests waiting together (up to N samples) are decoded as one batch
(`teachers/batching.py`): the same samples' random numbers, log-probabilities equal up to their low bits, so the
tokens are reproducible but not the last bits of the log-probabilities (see there); scoring stays one at a time.

Fault injection for tests and drills: request k (counted per app, from 0, on the two completion endpoints)
draws its faults from `random.Random(f"{fault_seed}:{k}")`: after `delay` seconds, with probability `fail_rate`
it is refused, by 429 with `Retry-After: 0` and 500 in turn; otherwise with probability `drop_rate` the answer is
computed and the connection closed halfway through the body (the client sees an incomplete read).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hmac
import itertools
import logging
import os
import random
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from bayeskd.core.sparse import tokenizer_fingerprint
from bayeskd.teachers.batching import Batcher
from bayeskd.teachers.hf import Generation, HFTeacher, Scored, TokenLogprob

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Parameters clients send that change nothing here; any other unknown parameter must be absent or neutral.
_IGNORED = {"user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls"}
_NEUTRAL = {"best_of": 1, "response_format": {"type": "text"}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    n: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = False
    max_tokens: int | None = Field(None, ge=0)  # 0: no generation, with echo (scoring)
    prompt_logprobs: int | None = Field(None, ge=0)  # vLLM's extension


class _APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = (
            status, message, param, code, type_, headers)


def _error_response(e: _APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


# Set inside a deliberately dropped response, so uvicorn's error line about it ("returned without completing
# response", logged in the same task) is replaced by our own warning instead of reading like a bug.
_DROPPING: contextvars.ContextVar[bool] = contextvars.ContextVar("bayeskd_dropping", default=False)


class _QuietDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_DROPPING.get() and "without completing response" in record.getMessage())


_uvicorn_log = logging.getLogger("uvicorn.error")
if not any(isinstance(f, _QuietDrops) for f in _uvicorn_log.filters):
    _uvicorn_log.addFilter(_QuietDrops())


class _DroppedResponse(Response):
    """Sends the status, a Content-Length for the whole body and half of it, then returns: the server closes the
    connection with the body incomplete."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        _DROPPING.set(True)
        log.warning("injected fault: closing the connection halfway through the answer")
        body = bytes(self.body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body[:len(body) // 2], "more_body": True})


def _text_content(message: dict[str, Any], i: int) -> dict[str, str]:
    """A chat message with its content as one string (OpenAI allows a list of text parts)."""
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
        raise _APIError(400, f"messages[{i}].role must be a string", param=f"messages[{i}].role")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _APIError(400, f"messages[{i}].content: only text parts are supported",
                                param=f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise _APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                        param=f"messages[{i}].content")
    return {"role": role, "content": content}


class _App:
    """The state behind one app: the teacher, its worker thread, the limits and the fault counters."""

    def __init__(self, teacher: HFTeacher, model_name: str, fail_rate: float, drop_rate: float, delay: float,
                 fault_seed: int, max_n: int, max_top_logprobs: int, max_batch: int = 1, batch_wait: float = 0.005):
        for name, rate in (("fail_rate", fail_rate), ("drop_rate", drop_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (got {rate})")
        if max_batch < 1 or batch_wait < 0:
            raise ValueError(f"need max_batch >= 1 and batch_wait >= 0 (got {max_batch}, {batch_wait})")
        if delay < 0 or max_n < 1 or max_top_logprobs < 0:
            raise ValueError(f"need delay >= 0, max_n >= 1, max_top_logprobs >= 0 (got {delay}, {max_n}, "
                             f"{max_top_logprobs})")
        self.teacher, self.name = teacher, model_name
        self.fingerprint = tokenizer_fingerprint(teacher.tokenizer)
        self.fail_rate, self.drop_rate, self.delay, self.fault_seed = fail_rate, drop_rate, delay, fault_seed
        self.max_n, self.max_top_logprobs = max_n, max_top_logprobs
        self.requests = itertools.count()
        self.failures = 0
        self.created = int(time.time())
        self.executor: ThreadPoolExecutor | None = None
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.batcher: Batcher | None = None  # max_batch > 1, while the app runs

    async def faults(self) -> bool:
        """Apply this request's delay and refusal (raised as an _APIError); True when its answer must be dropped."""
        k = next(self.requests)
        rng = random.Random(f"{self.fault_seed}:{k}")
        fail, drop = rng.random() < self.fail_rate, rng.random() < self.drop_rate
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if fail:
            self.failures += 1
            if self.failures % 2 == 1:
                raise _APIError(429, f"injected fault (request {k}): rate limited, retry", type_="rate_limit_error",
                                code="rate_limit_exceeded", headers={"Retry-After": "0"})
            raise _APIError(500, f"injected fault (request {k}): internal server error", type_="server_error")
        return drop

    def check(self, req: _Request, k: int, k_param: str) -> tuple[int, float, float, list[str]]:
        """The request's (n, temperature, top_p, stop) after checking what this server serves and allows."""
        if req.model != self.name:
            raise _APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.name}'",
                            param="model", code="model_not_found")
        if req.stream:
            raise _APIError(400, "stream=true is not supported by bayeskd serve-teacher", param="stream")
        for key, value in (req.model_extra or {}).items():
            if key not in _IGNORED and value not in (None, False, 0, "", [], {}) and _NEUTRAL.get(key) != value:
                raise _APIError(400, f"unsupported parameter '{key}' (bayeskd serve-teacher)", param=key)
        n = req.n or 1
        if n > self.max_n:
            raise _APIError(400, f"n must be at most {self.max_n} on this server (got {n})", param="n")
        if k > self.max_top_logprobs:
            raise _APIError(400, f"{k_param} must be at most {self.max_top_logprobs} on this server (got {k})",
                            param=k_param)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        temperature = 1.0 if req.temperature is None else req.temperature
        return n, temperature, 1.0 if req.top_p is None else req.top_p, stop

    async def run(self, fn: Any, **kwargs: Any) -> Any:
        """`fn(**kwargs)` in the worker thread; the teacher's ValueErrors (context too long, ...) become 400."""
        assert self.executor is not None, "the app is not started (lifespan)"
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, **kwargs))
        except ValueError as e:
            raise _APIError(400, str(e)) from e
        except Exception as e:  # noqa: BLE001 - any model failure is the server's, said in OpenAI's shape
            log.exception("generation failed")
            raise _APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error") from e

    async def answer(self, prompts: list[dict[str, Any]], max_tokens: int | None, default_max: int | None,
                     **settings: Any) -> list[list[Generation]]:
        """Per prompt its n samples: one request at a time in the worker (max_batch 1, today's path, bit for bit),
        or each prompt a request to the batcher."""
        if self.batcher is None:
            return await self.run(self.generate, prompts=prompts, max_tokens=max_tokens, default_max=default_max,
                                  **settings)
        asked = [self.batcher.submit({**p, "max_tokens": max_tokens or default_max, **settings}) for p in prompts]
        try:
            return list(await asyncio.gather(*asked))
        except ValueError as e:
            raise _APIError(400, str(e)) from e
        except Exception as e:  # noqa: BLE001 - as in run()
            raise _APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error") from e

    def generate(self, prompts: list[dict[str, Any]], max_tokens: int | None, default_max: int | None,
                 **settings: Any) -> list[list[Generation]]:
        """(In the worker.) Per prompt its n samples; max_tokens None: `default_max`, or else the rest of the
        model's context (vLLM's default for chat)."""
        out = []
        for p in prompts:
            mt = max_tokens or default_max
            if mt is None:
                used = len(self.teacher.encode_prompt(**p))
                mt = max(1, (self.teacher.max_positions or 2048) - used)
            out.append(self.teacher.complete(**p, max_tokens=mt, **settings))
        return out

    def usage(self, gens: list[list[Generation]]) -> dict[str, int]:
        prompt = sum(g[0].prompt_tokens for g in gens if g)
        completion = sum(x.completion_tokens for g in gens for x in g)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """The legacy completions `logprobs` of one choice (its tokens: echoed prompt tokens, then generated ones),
    plus `token_bytes` and the lossless `content`. An echoed first token has no log-probability (None)."""
    offsets, done = [], b""
    for t in tokens:
        offsets.append(len(done.decode("utf-8", errors="ignore")))
        done += t.bytes
    tops: list[dict[str, float] | None] = []
    for t in tokens:
        top: dict[str, float] = {}
        for tok, _b, lp in t.top:
            top.setdefault(tok, lp)  # two tokens with one text: the dict keeps the larger; `content` keeps both
        tops.append(top if t.logprob is not None else None)  # OpenAI's and vLLM's first echoed token: None
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": offsets, "token_bytes": [list(t.bytes) for t in tokens],
            "content": [t.to_json() for t in tokens]}


def _prompt_logprobs(teacher: HFTeacher, scored: Scored, k: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs` of one prompt: None for the first token, then per token {token id: {logprob, rank,
    decoded_token}} for the token itself and its k largest alternatives."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for t, tok, rank, top in list(zip(scored.ids, scored.tokens, scored.ranks, scored.top_ids))[1:]:
        entries = {str(a): {"logprob": v, "rank": r + 1, "decoded_token": teacher.token_str(a)}
                   for r, (a, v) in enumerate(top[:k])}
        entries.setdefault(str(t), {"logprob": tok.logprob, "rank": rank, "decoded_token": tok.token})
        out.append(entries)
    return out


def create_app(teacher: HFTeacher, model_name: str, *, fail_rate: float = 0.0, drop_rate: float = 0.0,
               delay: float = 0.0, fault_seed: int = 0, max_n: int = 16, max_top_logprobs: int = 20,
               api_key: str | None = None, max_batch: int = 1, batch_wait: float = 0.005) -> FastAPI:
    """The OpenAI-compatible app serving `teacher` as `model_name` (see the module docstring for the faults).
    `api_key`: when set, /v1 requests must carry it as a Bearer token (401 otherwise, as OpenAI answers).
    `max_batch`: up to this many samples of waiting requests decoded together (1: one request at a time);
    `batch_wait`: seconds the batcher waits for more requests before it starts a batch that is not full."""
    state = _App(teacher, model_name, fail_rate, drop_rate, delay, fault_seed, max_n, max_top_logprobs, max_batch,
                 batch_wait)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        if state.max_batch > 1:
            state.batcher = Batcher(teacher, state.executor, state.max_batch, state.batch_wait)
            state.batcher.start()
        try:
            yield
        finally:
            if state.batcher is not None:
                await state.batcher.close()
                state.batcher = None
            state.executor.shutdown(wait=True, cancel_futures=True)
            state.executor = None

    app = FastAPI(title="bayeskd serve-teacher", lifespan=lifespan)
    app.state.teacher = state

    if api_key is not None:
        @app.middleware("http")
        async def _check_key(request: Any, call_next: Any) -> Response:
            given = request.headers.get("authorization", "")
            if request.url.path.startswith("/v1") and not hmac.compare_digest(given, f"Bearer {api_key}"):
                return _error_response(_APIError(401, "Incorrect API key provided", type_="invalid_request_error",
                                                 code="invalid_api_key"))
            return await call_next(request)

    @app.exception_handler(_APIError)
    async def _api_error(_request: Any, e: _APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Any, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        if any(err.get("type") == "json_invalid" for err in errors):
            err = next(err for err in errors if err.get("type") == "json_invalid")
            detail = (err.get("ctx") or {}).get("error", err.get("msg"))
            return _error_response(_APIError(400, f"the request body is not valid JSON: {detail}"))
        where = [".".join(str(x) for x in err.get("loc", ())[1:]) or "body" for err in errors]
        problems = "; ".join(f"{w}: {err.get('msg')}" for w, err in zip(where, errors))
        return _error_response(_APIError(400, f"invalid request: {problems}", param=where[0] if where else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Any, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(_APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": state.created, "owned_by": "bayeskd"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise _APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                            param="model", code="model_not_found")
        return model_card()

    def reply(body: dict[str, Any], drop: bool) -> Response:
        return _DroppedResponse(JSONResponse(body).body) if drop else JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Response:
        drop = await state.faults()
        k = req.top_logprobs or 0
        n, temperature, top_p, stop = state.check(req, k, "top_logprobs")
        if k > 0 and not req.logprobs:
            raise _APIError(400, "logprobs must be true when top_logprobs is given", param="logprobs")
        messages = [_text_content(m, i) for i, m in enumerate(req.messages)]
        gens = await state.answer([{"messages": messages}], max_tokens=req.max_completion_tokens or req.max_tokens,
                                  default_max=None, n=n, temperature=temperature, top_p=top_p, seed=_seed(req.seed),
                                  stop=stop, top_logprobs=k, logprobs=bool(req.logprobs))
        choices = [{"index": i, "message": {"role": "assistant", "content": g.text},
                    "finish_reason": g.finish_reason,
                    "logprobs": {"content": [t.to_json() for t in g.tokens or []]} if req.logprobs else None}
                   for i, g in enumerate(gens[0])]
        return reply({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                      "model": model_name, "choices": choices, "usage": state.usage(gens),
                      "bayeskd_tokenizer": state.fingerprint}, drop)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        drop = await state.faults()
        k, pk = req.logprobs, req.prompt_logprobs
        n, temperature, top_p, stop = state.check(req, max(k or 0, pk or 0), "logprobs" if (k or 0) >= (pk or 0)
                                                  else "prompt_logprobs")
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        if max_tokens == 0 and not req.echo:
            raise _APIError(400, "max_tokens=0 generates nothing: give echo=true to score the prompt",
                            param="max_tokens")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise _APIError(400, "prompt must not be an empty list", param="prompt")
        scored: list[Scored] = []
        if req.echo or pk is not None:  # teacher forcing over the prompt, one forward pass each
            scored = [await state.run(teacher.score, prompt=p, top_logprobs=max(k or 0, pk or 0)) for p in prompts]
        if max_tokens == 0:
            gens = [[Generation("", [], "length", len(s.ids), 0, []) for _ in range(n)] for s in scored]
        else:
            gens = await state.answer([{"prompt": p} for p in prompts], max_tokens=max_tokens, default_max=16, n=n,
                                      temperature=temperature, top_p=top_p, seed=_seed(req.seed), stop=stop,
                                      top_logprobs=k or 0, logprobs=k is not None)

        def choice(j: int, i: int, g: Generation) -> dict[str, Any]:
            c: dict[str, Any] = {"index": j * n + i, "text": prompts[j] + g.text if req.echo else g.text,
                                 "finish_reason": g.finish_reason, "logprobs": None}
            if k is not None:
                echoed = [_cut_top(t, k) for t in scored[j].tokens] if req.echo else []
                c["logprobs"] = _completion_logprobs(echoed + (g.tokens or []))
            if pk is not None:
                c["prompt_logprobs"] = _prompt_logprobs(teacher, scored[j], pk)
            return c

        # OpenAI's order: prompt j's samples are choices j*n .. j*n+n-1.
        choices = [choice(j, i, g) for j, per_prompt in enumerate(gens) for i, g in enumerate(per_prompt)]
        return reply({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                      "model": model_name, "choices": choices, "usage": state.usage(gens),
                      "bayeskd_tokenizer": state.fingerprint}, drop)

    return app


def _cut_top(t: TokenLogprob, k: int) -> TokenLogprob:
    """A scored token with only its k largest alternatives (the prompt was scored for the larger of logprobs and
    prompt_logprobs)."""
    return TokenLogprob(t.token, t.bytes, t.logprob, t.top[:k])


def _seed(seed: int | None) -> int:
    """The request's seed; without one, a fresh random seed (an unseeded API request is not reproducible)."""
    return int(seed) if seed is not None else random.SystemRandom().randrange(1 << 63)


def _default_name(teacher: HFTeacher) -> str:
    return os.path.basename(os.path.normpath(teacher.path)) or teacher.path


def _as_teacher(model_or_teacher: HFTeacher | str | os.PathLike, device: str | None) -> HFTeacher:
    if isinstance(model_or_teacher, HFTeacher):
        return model_or_teacher
    return HFTeacher(model_or_teacher, device=device)


def serve_teacher(model: HFTeacher | str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
                  name: str | None = None, device: str | None = None, log_level: str = "info",
                  **opts: Any) -> None:
    """Serve `model` (a checkpoint path or an HFTeacher) until interrupted (the `serve-teacher` job). `opts` are
    create_app's (fail_rate, drop_rate, delay, fault_seed, max_n, max_top_logprobs, max_batch, batch_wait)."""
    import uvicorn

    teacher = _as_teacher(model, device)
    name = name or _default_name(teacher)
    if host not in LOOPBACK:
        log.warning("serving on %s: anyone who can reach this address can use the model", host)
    app = create_app(teacher, name, **opts)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {teacher.path} as model {name!r} at http://{shown}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@contextlib.contextmanager
def running_server(model_or_teacher: HFTeacher | str | os.PathLike, *, host: str = "127.0.0.1",
                   port: int | None = None, name: str | None = None, device: str | None = None,
                   log_level: str = "warning", startup_timeout: float = 60.0, **opts: Any) -> Iterator[str]:
    """A serve-teacher in a background thread for the length of a `with`: yields its base URL
    ("http://127.0.0.1:PORT/v1"; port None: a free one, bound before the server starts so no other process can
    take it) once /health answers, and always stops the server on exit, also on error."""
    teacher = _as_teacher(model_or_teacher, device)
    app = create_app(teacher, name or _default_name(teacher), **opts)
    with running_app(app, host=host, port=port, log_level=log_level, startup_timeout=startup_timeout) as url:
        yield f"{url}/v1"


@contextlib.contextmanager
def running_app(app: Any, *, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
                startup_timeout: float = 60.0, name: str = "serve-teacher") -> Iterator[str]:
    """Any ASGI `app` with a /health route, served by uvicorn in a background thread for the length of a `with`;
    yields "http://HOST:PORT" and always stops the server on exit (tests use it for stub servers too)."""
    import httpx
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    try:
        sock.bind((host, port or 0))
        bound = sock.getsockname()[1]
        url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"{name}:{bound}",
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + startup_timeout
        while True:
            if not thread.is_alive():
                raise RuntimeError(f"{name} at {url} stopped while starting (see the log above)")
            if server.started:
                try:
                    if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} at {url} did not answer /health within {startup_timeout:.0f} s")
            time.sleep(0.02)
        yield url
    finally:
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=15)
            if thread.is_alive():  # a request still running past the grace period: stop without waiting
                server.force_exit = True
                thread.join(timeout=5)
        sock.close()
