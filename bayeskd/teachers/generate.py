"""The job behind `bayeskd generate`: prompts in, teacher records out, from an OpenAI-compatible API or a local
model, resumable and exactly once.

Every prompt is one request for `n` samples; sample i of a prompt gets the record key sha256(prompt, generation
settings) + "/i", and the request a seed derived from (seed, that hash), so a rerun, a retry or a resumed run asks
for exactly the same thing. Lines with the same prompt (text or messages; the settings are the run's) are one
prompt: they share their keys, so it is asked once (its records carry the first line's `prompt_index` and `id`) and
the summary counts and names the repeats. Records are appended to the output and flushed as they complete; a rerun
reads the keys already there and asks only for the rest. A torn last line (a crash mid-write) is cut off. Requests
that fail after all retries go to `<out>.failed.jsonl` beside the output (and are asked again by the next run);
empty (or whitespace-only) responses go to `<out>.empty.jsonl` (the teacher's answer, but rarely wanted for
training); with `keep_empty` they stay in the output, as they are samples of the teacher too (leaving them out
biases the first tokens of every estimate; `load_teacher_records` takes them since they carry their
`finish_reason`); an answer with no text that did not end itself (nothing generated) is always set apart.

Records: `prompt` + `response` (completions endpoint) or chat `messages` ending with the assistant's answer
(chat endpoint); `finish_reason`; `model`, `settings`, `key`, `prompt_index`, `sample_index`, the prompt's `id`;
`usage`; with `top_logprobs` k > 0, `logprobs`: per generated token {token, bytes, logprob, top_logprobs: [{token,
bytes, logprob}]}, and `teacher_tokenizer`, the fingerprint of the tokenizer those tokens are of, where it is known:
reported by the teacher (`bayeskd serve-teacher`, the hf backend) or named by `teacher_tokenizer` (for APIs, which
report none). Without it a record's tokenizer is unknown, and students re-tokenize its text and use its
log-probabilities as lower bounds (`bayeskd.data.same_tokenizer`). The records with logprobs of one output are of
one tokenizer: a resumed run whose teacher tokenizer differs is refused. OpenAI's -9999 placeholder ("not in the
top k") is dropped, never read as a probability.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bayeskd.data import NATURAL_END, TEACHER_TOKENIZER, DataError, load_prompts, load_tokenizer
from bayeskd.core.sparse import tokenizer_fingerprint
from bayeskd.integrity import atomic_write_bytes, atomic_write_json
from bayeskd.job_config import job_config, setting
from bayeskd.teachers.clients import (FATAL, UNREACHABLE, Answer, HFBackend, OpenAIBackend, RateLimiter,
                                     chat_messages, completion_prompt)
from bayeskd.locks import locks_output

logger = logging.getLogger(__name__)

OPENAI_MAX_TOP_LOGPROBS = 20
ENDPOINTS = ("chat", "completions")
BACKENDS = ("openai", "hf")


class GenerateError(RuntimeError):
    """The run cannot go on (server unreachable, key refused, settings rejected); the message says what to do."""


@dataclass
class GenerateSettings:
    """What the teacher is asked; part of every request key (changing any of them asks again)."""
    model: str
    endpoint: str = "chat"
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = 0
    stop: list[str] | None = None
    system: str | None = None
    top_logprobs: int = 0

    def __post_init__(self):
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got {self.n}, {self.max_tokens}")
        if not 0 <= self.top_logprobs:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


# ---------------------------------------------------------------------------------------------------- requests

def request_key(prompt: dict[str, Any], settings: GenerateSettings) -> str:
    """sha256 of the prompt (text or messages) and the settings: the same question always has the same key."""
    what = {"prompt": prompt.get("prompt"), "messages": prompt.get("messages"), "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def request_seed(prompt: dict[str, Any], settings: GenerateSettings) -> int | None:
    """The seed of one request: a function of the run's seed, the prompt and the settings other than the model's
    name, so it never depends on the order or the retries, and a local model and its server get the same one."""
    if settings.seed is None:
        return None
    key = request_key(prompt, replace(settings, model=""))
    return int(hashlib.sha256(f"{settings.seed}/{key}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------- output

RESUME_FIELDS = ("key", "prompt_index", "sample_index", TEACHER_TOKENIZER)  # what a resumed job reads of a record


def read_done(path: Path, what: str = "output", light: bool = False) -> list[dict[str, Any]]:
    """The records already in a JSONL output, read a line at a time; a torn last line (no newline, or not JSON) is
    cut off the file. Any other bad line is an error naming it (the file was changed by something else). `light`:
    each record cut to what resuming needs (`RESUME_FIELDS`, and a `logprobs` key, its value dropped, where the
    record has log-probabilities), so 1 M tokens of records with top-20 log-probabilities take MBs, not GBs."""
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    keep = 0  # bytes of whole, good lines
    bad: tuple[int, ValueError] | None = None  # a broken complete line: a torn write if it is the last one
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            if bad is not None or not line.endswith(b"\n"):
                break  # a line after a broken one (raised below), or a torn tail
            if line.strip():
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or "key" not in rec:
                        raise ValueError("a record without its 'key'")
                except ValueError as e:
                    bad = (i, e)
                    continue
                if light:
                    rec = {**{k: rec[k] for k in RESUME_FIELDS if k in rec},
                           **({"logprobs": None} if "logprobs" in rec else {})}
                records.append(rec)
            keep += len(line)
        else:
            line = b""
    if bad is not None and line:  # not the last line: someone else changed the file
        raise DataError(f"{path}:{bad[0]}: not a generate record ({bad[1]}); the {what} was changed by something "
                        "else. Move it away to start over") from bad[1]
    if keep < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return records


class RecordWriter:
    """Appends JSON lines and flushes each, so a killed run loses at most the line being written."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def side_files(out: Path) -> tuple[Path, Path, Path]:
    """(failed, empty, summary) beside the output, named after it: two outputs in one folder never share them."""
    return (out.with_name(f"{out.stem}.failed.jsonl"), out.with_name(f"{out.stem}.empty.jsonl"),
            out.with_name(f"{out.stem}.summary.json"))


def order_file(path: Path) -> None:
    """Rewrite a JSONL output (whole lines: `read_done` first) in (prompt_index, sample_index) order, its lines
    copied as written, a line at a time: never all of it in memory."""
    from bayeskd.integrity import atomic_path

    spans = []
    with open(path, "rb") as f:
        start = 0
        for line in f:
            if line.strip():
                rec = json.loads(line)
                spans.append(((rec["prompt_index"], rec["sample_index"]), start, len(line)))
            start += len(line)
    spans.sort(key=lambda s: s[0])  # (stable: equal keys keep their order)
    with atomic_path(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as out:
        for _, start, size in spans:
            src.seek(start)
            out.write(src.read(size))


# ---------------------------------------------------------------------------------------------------- the job

@dataclass
class _Counts:
    requests: int = 0
    done: int = 0
    failed: int = 0
    retries: int = 0
    records: int = 0
    empty: int = 0
    empty_kept: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)  # the keys of the records appended to the output


class TeacherTokenizer:
    """The tokenizer of the records' logprobs: the one named (`teacher_tokenizer`) or else the one the teacher
    reports, which must be the tokenizer of the records with logprobs already in the output (`held`)."""

    def __init__(self, out: Path, named: str | None, held: set[str | None]):
        self.out, self.named, self.held = out, named, held

    @staticmethod
    def _which(fp: str | None) -> str:
        return f"tokenizer {fp[:12]}…" if fp else "an unnamed tokenizer (no --teacher-tokenizer)"

    def check(self, fp: str | None) -> None:
        if self.held and self.held != {fp}:
            raise GenerateError(
                f"{self.out} holds records whose logprobs are of {', '.join(sorted(map(self._which, self.held)))}, "
                f"but this run's are of {self._which(fp)}; the records of one output must be of one tokenizer. "
                "Resume with the same teacher and --teacher-tokenizer, or write to another --out")

    def of(self, reported: str | None) -> str | None:
        """The fingerprint for a reply's records (GenerateError where it contradicts the named one or the output)."""
        if self.named and reported and reported != self.named:
            raise GenerateError(f"--teacher-tokenizer names {self._which(self.named)}, but the teacher reports "
                                f"{self._which(reported)}; drop --teacher-tokenizer (the teacher's report is used)")
        fp = self.named or reported
        self.check(fp)
        self.held = {fp}
        return fp


def _record(prompt: dict[str, Any], p: int, i: int, key: str, answer: Answer, s: GenerateSettings,
            usage: dict[str, int], tokenizer: str | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"key": f"{key}/{i}"}
    if "id" in prompt:
        rec["id"] = prompt["id"]
    if s.endpoint == "chat":
        rec["messages"] = chat_messages(prompt, s.system) + [{"role": "assistant", "content": answer.text}]
    else:
        rec["prompt"], rec["response"] = completion_prompt(prompt, s.system), answer.text
    rec.update(finish_reason=answer.finish_reason, model=s.model, prompt_index=p, sample_index=i,
               settings=asdict(s), usage=usage)
    if answer.logprobs is not None:
        if tokenizer is not None:
            rec[TEACHER_TOKENIZER] = tokenizer
        rec["logprobs"] = answer.logprobs
    return rec


@dataclass
class APIClientConfig:
    """How a job talks to an OpenAI-compatible API (`generate` and `score` share it): the key, how many requests at
    once and per minute, retries and their backoff, and the output's order."""
    api_key_env: str = setting("OPENAI_API_KEY", "Environment variable holding the API key (the key is never written "
                               "anywhere).")
    concurrency: int = setting(8, "Requests in flight at once.", min=1)
    requests_per_minute: float | None = setting(None, "Rate limit: requests started per minute.", min=0,
                                                min_open=True)
    tokens_per_minute: float | None = setting(None, "Rate limit: tokens per minute.", min=0, min_open=True)
    max_retries: int = setting(6, "Retries of a failed request (rate limits, server errors, timeouts) before it is "
                               "set apart in OUT.failed.jsonl.", min=0)
    timeout: float = setting(120.0, "Seconds per request.", min=0, min_open=True)
    backoff: float = setting(0.5, "Retry delay in seconds: backoff × 2^attempt, jittered by ×0.5-1.5 (a server's "
                             "Retry-After wins).", min=0)
    ordered: bool = setting(False, "Rewrite the output in input order at the end (default: completion order; every "
                            "record carries its key).")


@dataclass
class GenerateConfig(APIClientConfig):
    """The `generate` job's settings, its one config: every field is a `bayeskd generate` option
    (`bayeskd.cli_config.config_options`), so each default is written here once. The inputs (prompts, output, the
    teacher's model, endpoint URL and tokenizer) are the job's arguments."""
    backend: str = setting("openai", "openai: any OpenAI-compatible API; hf: a local transformers model (--model "
                           "PATH).", choices=BACKENDS)
    endpoint: str = setting("chat", "chat: /v1/chat/completions (prompts as messages); completions: /v1/completions "
                            "(plain prompts).", choices=ENDPOINTS)
    n: int = setting(1, "Samples per prompt.", min=1)
    temperature: float = setting(1.0, "Sampling temperature.", min=0)
    top_p: float = setting(1.0, "Nucleus sampling: the smallest set of tokens holding this much probability.", min=0,
                           max=1, min_open=True)
    max_tokens: int = setting(256, "Longest answer, in the teacher's tokens.", min=1)
    seed: int | None = setting(0, "Each request's seed derives from it.")
    stop: list[str] | None = setting(None, "Stop string (repeatable).")
    system: str | None = setting(None, "System message put before each prompt.")
    top_logprobs: int = setting(0, "Top-k log-probabilities per generated token (0: text only; OpenAI allows at most "
                                "20).", min=0)
    keep_empty: bool = setting(False, "Keep blank answers (whitespace only, or the teacher ending at once) in the "
                               "output: they are samples of the teacher too (default: set apart in "
                               "OUT.empty.jsonl).")
    max_prompts: int | None = setting(None, "Use only the first N prompts.", min=1)
    device: str | None = setting(None, "torch device for --backend hf.")
    max_batch: int = setting(1, "--backend hf: decode up to this many samples of the requests in flight together "
                             "(at most --concurrency requests; 1: one request at a time, bit-exact; more: tokens "
                             "reproducible, log-probabilities to their low bits).", min=1)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.concurrency < 1 or self.max_retries < 0:
            raise ValueError(f"concurrency must be >= 1 and max_retries >= 0, got {self.concurrency}, "
                             f"{self.max_retries}")


@locks_output(file=True)
def generate(prompts: str, out: str, *, model: str, base_url: str | None = None,
             teacher_tokenizer: str | None = None, config: GenerateConfig | None = None, split: str = "train",
             skip_bad: bool = False, progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Ask the teacher `model` for `n` samples per prompt of `prompts` and append teacher records to `out`.

    backend "openai": any OpenAI-compatible server at `base_url` (the API key read from the environment variable
    `api_key_env`, never written anywhere); "hf": `model` is a local transformers checkpoint. Resumable and
    exactly once (see the module docstring); `ordered` rewrites the output in input order at the end.
    `teacher_tokenizer`: the teacher's tokenizer (a local directory or a hub name) for a teacher that does not
    report it (APIs): its fingerprint goes into every record with logprobs, so a student of that tokenizer keeps
    the teacher's tokens and uses its log-probabilities exactly; one contradicting the teacher's report is refused.
    The settings: `config` (a `GenerateConfig`) or `settings`, its fields (n, temperature, max_tokens, ...).
    Writes `<out>.summary.json` beside `out` (teacher.jsonl: teacher.summary.json) and returns it."""
    cfg = job_config(GenerateConfig, config, settings, "generate")
    backend, endpoint, n, temperature, top_p = cfg.backend, cfg.endpoint, cfg.n, cfg.temperature, cfg.top_p
    max_tokens, seed, stop, system, top_logprobs = cfg.max_tokens, cfg.seed, cfg.stop, cfg.system, cfg.top_logprobs
    api_key_env, concurrency, max_retries, timeout, backoff = (cfg.api_key_env, cfg.concurrency, cfg.max_retries,
                                                               cfg.timeout, cfg.backoff)
    requests_per_minute, tokens_per_minute = cfg.requests_per_minute, cfg.tokens_per_minute
    ordered, keep_empty, max_prompts, device = cfg.ordered, cfg.keep_empty, cfg.max_prompts, cfg.device
    if top_logprobs > OPENAI_MAX_TOP_LOGPROBS and backend == "openai":
        if base_url is None or "api.openai.com" in base_url:
            raise ValueError(f"top_logprobs={top_logprobs}: OpenAI returns at most {OPENAI_MAX_TOP_LOGPROBS} "
                             "alternatives per token")
        logger.warning("top_logprobs=%d: OpenAI allows at most %d; %s must allow more (vLLM: --max-logprobs)",
                       top_logprobs, OPENAI_MAX_TOP_LOGPROBS, base_url)
    settings = GenerateSettings(model=model, endpoint=endpoint, n=n, temperature=temperature, top_p=top_p,
                                max_tokens=max_tokens, seed=seed, stop=list(stop) if stop else None, system=system,
                                top_logprobs=top_logprobs)
    records_in, report = load_prompts(prompts, split=split, skip_bad=skip_bad)
    if max_prompts is not None:
        records_in = records_in[:max_prompts]
    if endpoint == "completions":
        for p, rec in enumerate(records_in):
            if "messages" in rec:
                raise DataError(f"{prompts}: prompt {p} is chat 'messages'; use --endpoint chat")
    out_path = Path(out)
    failed_path, empty_path, summary_path = side_files(out_path)
    in_out = read_done(out_path, light=True)
    existing = in_out + read_done(empty_path, "empty list", light=True)
    done = {r["key"] for r in existing}
    named = tokenizer_fingerprint(load_tokenizer(teacher_tokenizer)) if teacher_tokenizer is not None else None
    tokenizers = TeacherTokenizer(out_path, named, {r.get(TEACHER_TOKENIZER) for r in existing if "logprobs" in r})
    if named is not None and top_logprobs > 0:
        tokenizers.check(named)  # before any request: a resumed run with another tokenizer costs nothing
    elif named is not None:
        logger.warning("--teacher-tokenizer names the tokenizer of the records' logprobs; without --top-logprobs "
                       "there are none, and it is not written")
    keys = [request_key(rec, settings) for rec in records_in]
    # a repeated prompt has the same keys as its first line: its answers would be paid for, then dropped as done
    first: dict[str, int] = {}
    duplicates = [p for p, k in enumerate(keys) if first.setdefault(k, p) != p]
    if duplicates:
        p = duplicates[0]
        logger.warning("%s: %d prompt(s) repeat an earlier one (e.g. prompt %d%s is prompt %d); each distinct prompt "
                       "is asked once", prompts, len(duplicates), p,
                       f" (id {records_in[p]['id']!r})" if "id" in records_in[p] else "", first[keys[p]])
    todo = [p for p, k in enumerate(keys) if first[k] == p and any(f"{k}/{i}" not in done for i in range(n))]
    counts = _Counts(requests=len(todo))
    t0 = time.perf_counter()
    if backend == "openai" and cfg.max_batch > 1:
        logger.warning("--max-batch applies to --backend hf; an API server batches by itself (serve-teacher: "
                       "--max-batch)")
    client = (OpenAIBackend(base_url, api_key_env, timeout) if backend == "openai"
              else HFBackend(model, device, max_batch=cfg.max_batch))
    failures: list[dict[str, Any]] = []
    try:
        asyncio.run(_run(client, records_in, keys, todo, done, settings, counts, failures, out_path, empty_path,
                         concurrency, RateLimiter(requests_per_minute, tokens_per_minute), max_retries, backoff,
                         progress, seed, keep_empty, tokenizers))
    finally:
        # what failed this run, for the user and the next run (which asks for them again anyway)
        atomic_write_bytes(failed_path, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures).encode())
    # The output is the records read at the start and those appended since (the output is locked): not read
    # again, which costs as much as writing it, unless it is rewritten in order.
    if ordered:
        order_file(out_path)
    written_keys = {r["key"] for r in in_out}.union(counts.written)
    # complete: every expected record is in the output or set aside as blank; else records_missing says how many
    expected = {f"{k}/{i}" for k in first for i in range(n)}
    set_aside = expected & {r["key"] for r in read_done(empty_path, "empty list", light=True)}
    missing = len(expected - set_aside - written_keys)
    seconds = time.perf_counter() - t0
    summary = {
        "out": str(out_path), "prompts": len(records_in), "skipped_prompts": int(report.skipped),
        "distinct_prompts": len(first), "duplicate_prompts": len(duplicates),
        "duplicates": [{"prompt_index": p, **({"id": records_in[p]["id"]} if "id" in records_in[p] else {}),
                        "same_as": first[keys[p]]} for p in duplicates[:10]],
        "requests": counts.requests, "requests_done": counts.done, "requests_failed": counts.failed,
        "retries": counts.retries, "records_written": counts.records, "records_total": len(in_out) + counts.records,
        "records_expected": len(expected), "records_missing": missing, "empty": counts.empty,
        "empty_total": len(set_aside), "empty_kept": counts.empty_kept,
        "errors": counts.errors,
        "prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens,
        "seconds": round(seconds, 3),
        "completion_tokens_per_second": round(counts.completion_tokens / seconds, 1) if seconds > 0 else None,
        "complete": missing == 0, "backend": backend, "base_url": client.base_url,
        "api_key_env": api_key_env if backend == "openai" else None, "ordered": bool(ordered),
        "settings": asdict(settings), "failed_file": str(failed_path) if failures else None,
        "teacher_tokenizer": next(iter(tokenizers.held)) if len(tokenizers.held) == 1 else None,
    }
    atomic_write_json(summary_path, summary)
    return summary


async def ask_with_retries(ask: Any, classify: Any, limiter: RateLimiter, cost: float, max_retries: int,
                           backoff: float, jitter: random.Random, counts: Any, fatal: list[Exception],
                           retried: Any = None, started: bool = False) -> tuple[Any, str | None]:
    """`await ask()` within the rate budget, retried as `classify` says (a server's Retry-After, else backoff ×
    2^attempt jittered, at most 60 s): (the answer, ""), or (None, the last error) once retries are spent or the
    error is fatal, or (None, None) when the run stops: `fatal` holds an error (another request's), or this one
    appends one (a fatal error, or the server unreachable, before any request succeeded, `counts.done` 0 and not
    `started`: the settings or the URL are wrong). Counts each error by type in `counts.errors` and each retry in
    `counts.retries`, calling `retried()` after it."""
    error = ""
    for attempt in range(max_retries + 1):
        if fatal:
            return None, None
        await limiter.acquire(cost)
        try:
            return await ask(), ""
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is classified: retried, recorded or fatal
            kind, wait, error = classify(e)
            counts.errors[type(e).__name__] = counts.errors.get(type(e).__name__, 0) + 1
            gone = kind == UNREACHABLE and attempt >= min(2, max_retries)
            if counts.done == 0 and not started and (kind == FATAL or gone):
                fatal.append(GenerateError(error))  # nothing worked yet: the settings or the URL are wrong
                return None, None
            if kind == FATAL or attempt == max_retries:
                break
            counts.retries += 1
            if retried is not None:
                retried()
            delay = wait if wait is not None else backoff * 2 ** attempt * (0.5 + jitter.random())
            await asyncio.sleep(min(delay, 60.0))
    return None, error


async def _run(client, prompts, keys, todo, done, s: GenerateSettings, counts: _Counts, failures, out_path: Path,
               empty_path: Path, concurrency: int, limiter: RateLimiter, max_retries: int, backoff: float,
               progress: bool, seed: int | None, keep_empty: bool, tokenizers: TeacherTokenizer) -> None:
    from tqdm.auto import tqdm

    writer, empties = RecordWriter(out_path), RecordWriter(empty_path)
    sem = asyncio.Semaphore(concurrency)
    jitter = random.Random(0 if seed is None else seed)  # backoff jitter, reproducible
    bar = tqdm(total=len(todo), desc="generate", unit="req", disable=not progress)
    started = time.perf_counter()
    fatal: list[GenerateError] = []

    def postfix() -> None:
        rate = counts.completion_tokens / max(time.perf_counter() - started, 1e-9)
        # refresh=False: the bar redraws at its own pace (mininterval), not once per request
        bar.set_postfix(done=counts.done, failed=counts.failed, retried=counts.retries, tok_s=f"{rate:.0f}",
                        refresh=False)

    async def one(p: int) -> None:
        prompt, key = prompts[p], keys[p]
        cost = len(json.dumps(prompt.get("prompt") or prompt.get("messages"))) / 4 + s.max_tokens * s.n
        async with sem:
            reply, error = await ask_with_retries(lambda: client.ask(prompt, s, request_seed(prompt, s)),
                                                  client.classify, limiter, cost, max_retries, backoff, jitter,
                                                  counts, fatal, retried=postfix)
            if error is None:
                return
            if reply is not None:
                usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
                try:  # checked before any record of the reply is written
                    fp = tokenizers.of(reply.tokenizer) if any(a.logprobs is not None for a in reply.answers) else None
                except GenerateError as e:
                    fatal.append(e)
                    return
                for i, answer in enumerate(reply.answers):
                    rec = _record(prompt, p, i, key, answer, s, usage, fp)
                    if rec["key"] in done:
                        continue  # written by an earlier run (a request is asked again as a whole)
                    blank = not answer.text.strip()
                    if blank and not (keep_empty and (answer.text or answer.finish_reason in NATURAL_END)):
                        empties.write(rec)
                        counts.empty += 1
                    else:
                        writer.write(rec)
                        counts.records += 1
                        counts.written.append(rec["key"])
                        counts.empty_kept += blank
                    done.add(rec["key"])
                counts.done += 1
                counts.prompt_tokens += reply.prompt_tokens
                counts.completion_tokens += reply.completion_tokens
                bar.update(1)
                postfix()
                return
        counts.failed += 1
        failures.append({"key": key, "prompt_index": p, **({"id": prompt["id"]} if "id" in prompt else {}),
                         "error": error})
        bar.update(1)
        postfix()

    try:
        await asyncio.gather(*(one(p) for p in todo))
    finally:
        bar.close()
        writer.close()
        empties.close()
        await client.close()
    if fatal:
        raise fatal[0]
