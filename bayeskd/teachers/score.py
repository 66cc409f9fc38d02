"""The job behind `bayeskd score`: (prompt, response) texts in, the teacher's log-probabilities of each response's
tokens out, from an OpenAI-compatible completions API, resumable and exactly once (`generate`'s machinery).

Scoring asks `/v1/completions` with `echo: true, logprobs: k, max_tokens: 0` for the text prompt + response: the
server echoes it with every token's log-probability given the tokens before it and the k most likely alternatives
(teacher forcing; vLLM, SGLang and `bayeskd serve-teacher` answer it; OpenAI's chat API cannot, see docs/design.md,
"Scoring with a teacher"). The response's tokens are the ones after the prompt, split by their bytes. A probe at
the start (one tiny echo request) decides whether the server can score; the job refuses with its reason otherwise.

Output records have `generate`'s shape (`prompt`, `response`, the input's `finish_reason` and `id`, `model`,
`settings`, `key`, `prompt_index` (the input line), `sample_index` 0, `usage`, `logprobs`: per response token {token,
bytes, logprob, top_logprobs}, and `teacher_tokenizer` where the teacher reports it (serve-teacher) or
`teacher_tokenizer` names it), plus `source_key`, the input record's own `key` where it had one. So
`load_teacher_records` / `tokenize_records` / the evidence rows take them unchanged, and align the teacher's tokens
to any student's by bytes. The key of a record is sha256(prompt, response, the input's `key` and `id`, settings):
two samples with one text but their own keys are scored each. Records are appended and flushed as they complete; a
rerun asks only for the keys not yet in the output or in `<out>.skipped.jsonl`, the records that cannot be scored,
each with its reason: an empty response (no token to score; never asked), text the server answers with another
text than the one sent, tokens that do not spell it, or a teacher token spanning the end of the prompt and the start
of the response (the teacher tokenizes the whole text, and merged the two there). Requests failing after all
retries go to `<out>.failed.jsonl` (asked again by the next run); `<out>.summary.json` says what happened.

Only `prompt`/`response` records are scored (chat `messages` need the teacher's chat template, which the
completions endpoint does not apply).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bayeskd.core.sparse import tokenizer_fingerprint
from bayeskd.data import TEACHER_TOKENIZER, DataError, load_teacher_records, load_tokenizer
from bayeskd.integrity import atomic_write_bytes, atomic_write_json
from bayeskd.job_config import job_config, setting
from bayeskd.locks import locks_output
from bayeskd.teachers.clients import OpenAIBackend, RateLimiter, completion_logprobs, reported_tokenizer
from bayeskd.teachers.generate import (APIClientConfig, GenerateError, RecordWriter, TeacherTokenizer,
                                       ask_with_retries, order_file, read_done, side_files)

PROBE_TEXT = "Hello world"


class ScoreError(GenerateError):
    """The server cannot score (the probe's reason), or the run cannot go on; the message says why."""


@dataclass
class ScoreSettings:
    """What the teacher is asked; part of every record's key (changing any of them asks again)."""
    model: str
    top_logprobs: int = 5

    def __post_init__(self):
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


@dataclass
class ScoreConfig(APIClientConfig):
    """The `score` job's settings: every field is a `bayeskd score` option. The inputs (records, output, the
    teacher's model, endpoint URL and tokenizer) are the job's arguments."""
    top_logprobs: int = setting(5, "Top-k alternatives per response token (0: the token's own log-probability only; "
                                "vLLM allows --max-logprobs, 20 by default).", min=0)
    max_records: int | None = setting(None, "Score only the first N records.", min=1)

    def __post_init__(self):
        if self.concurrency < 1 or self.max_retries < 0:
            raise ValueError(f"concurrency must be >= 1 and max_retries >= 0, got {self.concurrency}, "
                             f"{self.max_retries}")


def score_key(rec: dict[str, Any], settings: ScoreSettings) -> str:
    """sha256 of the texts, the input record's own key and id, and the settings."""
    what = {"prompt": rec["prompt"], "response": rec["response"], "key": rec.get("key"), "id": rec.get("id"),
            "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------- the client

@dataclass
class Scoring:
    """A server's answer to one echo request: the text it echoed, its tokens in the record format (None when it
    sent no logprobs), its prompt token count and the tokenizer it reports."""
    text: str
    logprobs: list[dict[str, Any]] | None
    prompt_tokens: int = 0
    tokenizer: str | None = None


class EchoScorer:
    """Scores texts at an OpenAI-compatible `/v1/completions` (echo, logprobs, max_tokens 0) through
    `clients.OpenAIBackend` (its SDK client, error classes and retries)."""

    def __init__(self, base_url: str | None, api_key_env: str, timeout: float):
        self.backend = OpenAIBackend(base_url, api_key_env, timeout)
        self.base_url, self.classify = self.backend.base_url, self.backend.classify

    async def ask(self, text: str, s: ScoreSettings) -> Scoring:
        r = await self.backend.client.completions.create(model=s.model, prompt=text, echo=True,
                                                         logprobs=s.top_logprobs, max_tokens=0)
        if not r.choices:
            raise ValueError("the answer has no choices")
        c = min(r.choices, key=lambda c: c.index)
        usage = getattr(r.usage, "prompt_tokens", 0) or 0
        return Scoring(c.text or "", completion_logprobs(c.logprobs), int(usage), reported_tokenizer(r))

    async def scored(self, text: str, s: ScoreSettings) -> Scoring:
        """`ask`, where an answer without logprobs is malformed (retried), after the probe said it has them."""
        got = await self.ask(text, s)
        if got.logprobs is None:
            raise ValueError("the answer has no logprobs")
        return got

    async def close(self) -> None:
        await self.backend.close()


def probe_problem(got: Scoring) -> str | None:
    """Why an answer to the probe shows the server cannot score, or None."""
    if got.logprobs is None:
        return "its answer has no logprobs"
    if got.text != PROBE_TEXT:
        return f"echo did not return the prompt (sent {PROBE_TEXT!r}, got {got.text[:60]!r})"
    if not any(e["logprob"] is not None for e in got.logprobs):
        return "no token of the prompt has a log-probability"
    return None


class Skip(Exception):
    """A record that cannot be scored: (reason, detail)."""


def response_part(entries: list[dict[str, Any]], prompt: str, response: str) -> list[dict[str, Any]]:
    """The entries of the response's tokens among the scored tokens of prompt + response, split by bytes. Leading
    tokens before the text (a BOS without bytes, or one spelled by its name) are passed over. `Skip` where the
    tokens do not spell the text, or one spans the end of the prompt."""
    text = (prompt + response).encode("utf-8")
    pieces = [bytes(e["bytes"]) for e in entries]
    joined = b"".join(pieces)
    ends, at = [], 0
    for b in pieces:
        at += len(b)
        ends.append(at)
    lead = len(joined) - len(text)
    if lead < 0 or not joined.endswith(text) or (lead and lead not in ends):
        d = next((i for i, (a, b) in enumerate(zip(joined[max(lead, 0):], text)) if a != b), min(len(joined), len(text)))
        raise Skip("mismatch", f"the teacher's tokens spell {joined[max(lead, 0):][max(d - 20, 0):d + 20]!r} where the "
                   f"text sent has {text[max(d - 20, 0):d + 20]!r} (first difference at byte {d})")
    cut = lead + len(prompt.encode("utf-8"))
    for i, (b, end) in enumerate(zip(pieces, ends)):
        start = end - len(b)
        if start < cut < end:
            raise Skip("boundary", f"the teacher's token {entries[i]['token']!r} spans the end of the prompt and the "
                       "start of the response (it tokenizes the whole text, and merged the two there)")
        if start >= cut and b:
            return entries[i:]
    raise Skip("empty", "the response has no tokens to score")


# ---------------------------------------------------------------------------------------------------- the job

@dataclass
class _Counts:
    requests: int = 0
    done: int = 0
    failed: int = 0
    retries: int = 0
    records: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


def _record(src: dict[str, Any], p: int, key: str, s: ScoreSettings, got: Scoring, lps: list[dict[str, Any]],
            tokenizer: str | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"key": key}
    if "id" in src:
        rec["id"] = src["id"]
    rec["prompt"], rec["response"] = src["prompt"], src["response"]
    if "finish_reason" in src:
        rec["finish_reason"] = src["finish_reason"]
    rec.update(model=s.model, prompt_index=p, sample_index=0, settings=asdict(s),
               usage={"prompt_tokens": got.prompt_tokens, "completion_tokens": 0})
    if "key" in src:
        rec["source_key"] = src["key"]
    if tokenizer is not None:
        rec[TEACHER_TOKENIZER] = tokenizer
    rec["logprobs"] = lps
    return rec


def _skipped(src: dict[str, Any], p: int, key: str, reason: str, detail: str) -> dict[str, Any]:
    return {"key": key, "prompt_index": p, **({"id": src["id"]} if "id" in src else {}),
            **({"source_key": src["key"]} if "key" in src else {}), "reason": reason, "detail": detail}


@locks_output(file=True)
def score(records: str, out: str, *, model: str, base_url: str | None = None, teacher_tokenizer: str | None = None,
          config: ScoreConfig | None = None, split: str = "train", skip_bad: bool = False, progress: bool = True,
          **settings: Any) -> dict[str, Any]:
    """Score the responses of `records` (teacher records or {prompt, response} lines) with the teacher `model` at
    the OpenAI-compatible server `base_url` and append teacher records with the response tokens' logprobs to
    `out` (see the module docstring). A probe first: a server that cannot score is refused (ScoreError with its
    reason) before anything is written. `teacher_tokenizer`: as `generate`'s, for servers that do not report it.
    The settings: `config` (a `ScoreConfig`) or `settings`, its fields. Writes `<out>.summary.json` beside `out`
    and returns it."""
    cfg = job_config(ScoreConfig, config, settings, "score")
    s = ScoreSettings(model=model, top_logprobs=cfg.top_logprobs)
    rows, report = load_teacher_records(records, split=split, skip_bad=skip_bad)
    if cfg.max_records is not None:
        rows = rows[:cfg.max_records]
    for p, rec in enumerate(rows):
        if "messages" in rec:
            raise DataError(f"{records}: record {p} is chat 'messages'; score takes 'prompt'/'response' records (the "
                            "completions endpoint applies no chat template)")
    out_path = Path(out)
    failed_path, _, summary_path = side_files(out_path)
    skipped_path = out_path.with_name(f"{out_path.stem}.skipped.jsonl")
    existing = read_done(out_path, light=True)
    done = {r["key"] for r in existing} | {r["key"] for r in read_done(skipped_path, "skipped list", light=True)}
    named = tokenizer_fingerprint(load_tokenizer(teacher_tokenizer)) if teacher_tokenizer is not None else None
    tokenizers = TeacherTokenizer(out_path, named, {r.get(TEACHER_TOKENIZER) for r in existing if "logprobs" in r})
    if named is not None:
        tokenizers.check(named)  # before any request
    keys = [score_key(rec, s) for rec in rows]
    first: dict[str, int] = {}
    duplicates = [p for p, k in enumerate(keys) if first.setdefault(k, p) != p]
    todo = [p for p, k in enumerate(keys) if first[k] == p and k not in done]
    counts = _Counts()
    t0 = time.perf_counter()
    scorer = EchoScorer(base_url, cfg.api_key_env, cfg.timeout)
    failures: list[dict[str, Any]] = []
    try:
        probe = asyncio.run(_run(scorer, rows, keys, todo, done, s, counts, failures, out_path, skipped_path, cfg,
                                 tokenizers, progress))
    finally:
        atomic_write_bytes(failed_path, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures).encode())
    written = read_done(out_path, light=True)
    if cfg.ordered:
        order_file(out_path)
    skipped_keys = {r["key"] for r in read_done(skipped_path, "skipped list", light=True)}
    missing = len(set(first) - skipped_keys - {r["key"] for r in written})
    seconds = time.perf_counter() - t0
    summary = {
        "out": str(out_path), "records_in": len(rows), "skipped_input": int(report.skipped),
        "distinct_records": len(first), "duplicate_records": len(duplicates), "probe": probe,
        "requests": counts.requests, "requests_done": counts.done, "requests_failed": counts.failed,
        "retries": counts.retries, "records_written": counts.records, "records_total": len(written),
        "records_expected": len(first), "records_missing": missing, "skipped": counts.skipped,
        "skipped_total": len(skipped_keys & set(first)), "errors": counts.errors,
        "prompt_tokens": counts.prompt_tokens, "response_tokens": counts.response_tokens,
        "seconds": round(seconds, 3), "complete": missing == 0, "base_url": scorer.base_url,
        "api_key_env": cfg.api_key_env, "ordered": bool(cfg.ordered), "settings": asdict(s),
        "failed_file": str(failed_path) if failures else None,
        "skipped_file": str(skipped_path) if skipped_keys else None,
        "teacher_tokenizer": next(iter(tokenizers.held)) if len(tokenizers.held) == 1 else None,
    }
    atomic_write_json(summary_path, summary)
    return summary


async def _run(scorer: EchoScorer, rows, keys, todo, done, s: ScoreSettings, counts: _Counts, failures,
               out_path: Path, skipped_path: Path, cfg: ScoreConfig, tokenizers: TeacherTokenizer,
               progress: bool) -> str:
    """Probe, then score `todo`; returns what the probe found (the run raises ScoreError where it cannot score)."""
    from tqdm.auto import tqdm

    limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
    jitter = random.Random(0)  # backoff jitter, reproducible
    fatal: list[Exception] = []
    writer = skips = None
    where = f"the server at {scorer.base_url}"
    try:
        if not todo:
            return "not run: nothing to score"
        probe_counts = _Counts()
        got, error = await ask_with_retries(lambda: scorer.ask(PROBE_TEXT, s), scorer.classify, limiter,
                                            len(PROBE_TEXT) / 4, cfg.max_retries, cfg.backoff, jitter, probe_counts,
                                            fatal)
        counts.retries, counts.errors = probe_counts.retries, dict(probe_counts.errors)
        why = probe_problem(got) if got is not None else str(fatal[0]) if fatal else error
        if why is not None:
            raise ScoreError(f"{where} cannot score (probe: echo: true, logprobs: {s.top_logprobs}, max_tokens: 0): "
                             f"{why}" if got is None else
                             f"{where} does not return prompt log-probabilities with echo: {why}")
        writer, skips = RecordWriter(out_path), RecordWriter(skipped_path)
        sem = asyncio.Semaphore(cfg.concurrency)
        bar = tqdm(total=len(todo), desc="score", unit="rec", disable=not progress)

        def skip(p: int, reason: str, detail: str) -> None:
            skips.write(_skipped(rows[p], p, keys[p], reason, detail))
            counts.skipped[reason] = counts.skipped.get(reason, 0) + 1
            done.add(keys[p])

        async def one(p: int) -> None:
            src, key = rows[p], keys[p]
            if not src["response"]:
                skip(p, "empty", "the response is empty: no token to score")
                bar.update(1)
                return
            text = src["prompt"] + src["response"]
            counts.requests += 1
            async with sem:
                got, error = await ask_with_retries(lambda: scorer.scored(text, s), scorer.classify, limiter,
                                                    len(text) / 4, cfg.max_retries, cfg.backoff, jitter, counts,
                                                    fatal, started=True)  # the probe succeeded
                if error is None:
                    return
                if got is not None:
                    try:
                        if got.text != text:
                            d = next((i for i, (a, b) in enumerate(zip(got.text, text)) if a != b),
                                     min(len(got.text), len(text)))
                            raise Skip("mismatch", f"the server echoed another text than the one sent (first "
                                       f"difference at character {d}: {got.text[d:d + 20]!r}, sent {text[d:d + 20]!r})")
                        lps = response_part(got.logprobs, src["prompt"], src["response"])
                    except Skip as e:
                        skip(p, *e.args)
                    else:
                        try:
                            fp = tokenizers.of(got.tokenizer)
                        except GenerateError as e:
                            fatal.append(e)
                            return
                        if key not in done:
                            writer.write(_record(src, p, key, s, got, lps, fp))
                            counts.records += 1
                            counts.response_tokens += len(lps)
                            done.add(key)
                    counts.done += 1
                    counts.prompt_tokens += got.prompt_tokens
                    bar.update(1)
                    return
            counts.failed += 1
            failures.append({"key": key, "prompt_index": p, **({"id": src["id"]} if "id" in src else {}),
                             "error": error})
            bar.update(1)

        try:
            await asyncio.gather(*(one(p) for p in todo))
        finally:
            bar.close()
    finally:
        for f in (writer, skips):
            if f is not None:
                f.close()
        await scorer.close()
    if fatal:
        raise fatal[0]
    return f"{where} scores (echo with logprobs)"
