"""Scored on-policy targets: the teacher server's log-probabilities of the student's samples (echo + logprobs k,
`bayeskd.teachers.score`'s client), as evidence rows for the student's tokens, cached so that no sample is asked
twice.

`SampleScorer.evidence(prompts, responses)` turns each sample into text (the bytes of its tokens: byte-less
special tokens by name in the prompt, a leading BOS dropped because the server adds its own; none in the response,
where a byte-less token ends the evidence), asks the server for the samples not in the cache, and aligns the
teacher's tokens of each response to the sampled tokens by bytes (`bayeskd.posterior.evidence.evidence_rows`: a
teacher that tokenizes the text otherwise is aligned as any cross-tokenizer record is; exact entries where the
server reports the student's tokenizer). One `Evidence` row per sampled token; a row the alignment cannot cover
(the EOS, past a special token, a sample the teacher could not score) has none, and the trainer's conditioning
leaves the plain posterior there (`bayeskd.core.condition.condition`).

The cache (`cache`, a JSONL, one line per answered request: the scored tokens, or the reason a sample cannot be
scored) is appended and flushed as the answers arrive; a sample's key is `score_key` of its prompt and response
text and the settings (teacher model, k), so a resumed run, which samples the same texts, asks nothing twice.
`budget`: the most scoring requests (one per sample; the probe and retries not counted) over the cache's life,
the cache's entries included; once spent, samples not in the cache get no evidence (plain posterior targets, as
an unscored run gives them) and `stats["over_budget"]` counts them: a run that outlives its budget goes on as a
posterior run, the same way when resumed. A request failing after all retries is counted (`failed`) and gives no
evidence; it is not cached, so a later run asks it again. A fatal error (auth, the server gone before any answer)
stops the run with `ScoreError`, one line.

Overlap: `submit` starts the requests in a background thread and returns at once, so the trainer builds the rest of
its batch (the prior's rows at the samples, the next micro-batch's samples) while the server answers; `.result()`
waits for the answers. One scoring is in flight at a time (a submit first waits for the one before it reads the
cache), so no sample is asked twice and the budget counts exactly as without overlap.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bayeskd.data import TEACHER_TOKENIZER, TokenizedData
from bayeskd.posterior.evidence import Evidence, StudentVocab, evidence_rows
from bayeskd.teachers.clients import RateLimiter
from bayeskd.teachers.generate import RecordWriter, ask_with_retries, read_done
from bayeskd.teachers.score import (PROBE_TEXT, EchoScorer, ScoreConfig, ScoreError, ScoreSettings, Skip,
                                    probe_problem, response_part, score_key)

logger = logging.getLogger(__name__)

CACHE = "onpolicy_scores.jsonl"  # in the distill output directory (one per rank: onpolicy_scores.rank<r>.jsonl)


def cache_name(rank: int, world_size: int) -> str:
    return CACHE if world_size <= 1 else f"onpolicy_scores.rank{rank}.jsonl"


@dataclass
class _Tally:  # what ask_with_retries counts
    retries: int = 0
    done: int = 0
    errors: dict = field(default_factory=dict)


class SampleScorer:
    """The teacher at the OpenAI-compatible `base_url` (model `model`) scoring the student's samples with `top_k`
    alternatives per token (0: the sampled token's log-probability only), cached in `cache` (see the module
    docstring). `tokenizer`: the student's. Retries, timeout and concurrency as `bayeskd score`'s (`ScoreConfig`).
    `stats`: requests (answered or failed, this process), cached (samples answered from the cache), scored_tokens
    (response tokens the teacher scored, this process), skipped (by reason), failed, retries and errors (by
    type), over_budget, empty (samples without a response token to score), seconds (that the trainer waited on
    scoring: the requests overlap the building of its batches)."""

    def __init__(self, base_url: str, model: str, tokenizer, cache: str | Path, *, top_k: int = 20,
                 budget: int | None = None, settings: ScoreConfig | None = None):
        if top_k < 0 or (budget is not None and budget < 0):
            raise ValueError(f"top_k and budget must be >= 0, got {top_k}, {budget}")
        self.base_url, self.settings = base_url, ScoreSettings(model=model, top_logprobs=int(top_k))
        self.cfg = settings or ScoreConfig()
        self.tokenizer, self.vocab = tokenizer, StudentVocab(tokenizer)
        self.cache = Path(cache)
        self.known = {r["key"]: r for r in read_done(self.cache, "on-policy score cache")}
        self.budget = budget
        self.probed: str | None = None
        self.stats: dict[str, Any] = {"requests": 0, "cached": 0, "scored_tokens": 0, "skipped": {}, "failed": 0,
                                      "retries": 0, "errors": {}, "over_budget": 0, "empty": 0, "seconds": 0.0}
        self._writer: RecordWriter | None = None
        self._pool: ThreadPoolExecutor | None = None  # the thread the requests run in (overlap)
        self._inflight: Future | None = None
        bos = getattr(tokenizer, "bos_token_id", None)
        self._bos = int(bos) if bos is not None else None

    # ------------------------------------------------------------------------------------------------ the server
    def probe(self) -> str:
        """Ask the server one tiny echo request (once); ScoreError with its reason, one line, if it cannot score."""
        if self.probed is None:
            self.probed = asyncio.run(self._probe())
        return self.probed

    async def _probe(self) -> str:
        scorer = EchoScorer(self.base_url, self.cfg.api_key_env, self.cfg.timeout)
        where, s = f"the server at {scorer.base_url}", self.settings
        fatal: list[Exception] = []
        try:
            got, error = await ask_with_retries(lambda: scorer.ask(PROBE_TEXT, s), scorer.classify,
                                                RateLimiter(None, None), len(PROBE_TEXT) / 4, self.cfg.max_retries,
                                                self.cfg.backoff, random.Random(0), _Tally(), fatal)
        finally:
            await scorer.close()
        why = probe_problem(got) if got is not None else str(fatal[0]) if fatal else error
        if why is not None:
            raise ScoreError(f"{where} cannot score the student's samples (probe: echo: true, logprobs: "
                             f"{s.top_logprobs}, max_tokens: 0): {why}".replace("\n", " "))
        return f"{where} scores (echo with logprobs)"

    def spent(self) -> int:
        """Scoring requests counted against the budget: the cache's answers and this process's failed ones."""
        return len(self.known) + int(self.stats["failed"])

    # ------------------------------------------------------------------------------------------------ the samples
    def _text(self, ids: Sequence[int], prompt: bool) -> str:
        table, out = self.vocab.table, []
        for n, t in enumerate(ids):
            b = table[t]
            if not b and prompt and not (n == 0 and t == self._bos):  # a special token of the prompt, by name
                b = str(self.tokenizer.convert_ids_to_tokens(int(t))).encode()
            out.append(b)
        return b"".join(out).decode("utf-8", "replace")

    def evidence(self, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor]) -> Evidence:
        """The teacher's evidence at every sampled token (one row per token of each response, in order)."""
        return self.submit(prompts, responses).result()

    def _wait(self) -> None:
        """Wait for the scoring in flight (its ScoreError raised here)."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.result()

    def submit(self, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor]) -> "PendingEvidence":
        """Ask the server for the samples not in the cache, in the background (module docstring, "Overlap");
        `.result()` of the returned object is `evidence`'s."""
        t0 = time.perf_counter()
        self._wait()
        self.probe()
        p_ids = [[int(x) for x in p.tolist()] for p in prompts]
        r_ids = [[int(x) for x in r.tolist()] for r in responses]
        texts = [(self._text(p, True), self._text(r, False)) for p, r in zip(p_ids, r_ids)]
        keys = [score_key({"prompt": p, "response": r}, self.settings) for p, r in texts]
        st = self.stats
        todo: list[int] = []
        for i, ((_, r), key) in enumerate(zip(texts, keys)):
            if not r:
                st["empty"] += 1
            elif key in self.known:
                st["cached"] += 1
            elif key in (keys[j] for j in todo):
                continue  # asked once for the batch
            elif self.budget is not None and self.spent() + len(todo) >= self.budget:
                if not st["over_budget"]:
                    logger.warning("on-policy scoring: the budget of %d requests is spent; the student's samples "
                                   "not yet scored get posterior targets from here on", self.budget)
                st["over_budget"] += 1
            else:
                todo.append(i)
        if todo:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="bayeskd-score")
            self._inflight = self._pool.submit(asyncio.run, self._ask([texts[i] for i in todo],
                                                                       [keys[i] for i in todo]))
        st["seconds"] += time.perf_counter() - t0
        return PendingEvidence(self, texts, keys, p_ids, r_ids, self._inflight if todo else None)

    def _evidence(self, texts: list[tuple[str, str]], keys: list[str], p_ids: list[list[int]],
                  r_ids: list[list[int]], future: Future | None) -> Evidence:
        """The evidence rows of submitted samples, once their answers (`future`) are in."""
        t0 = time.perf_counter()
        if future is not None:
            if self._inflight is future:
                self._inflight = None
            future.result()
        st = self.stats
        records = []
        for (p, r), key in zip(texts, keys):
            got = self.known.get(key) if r else None
            rec = {"prompt": p, "response": r, "logprobs": got.get("logprobs") if got else None}
            if got and got.get(TEACHER_TOKENIZER):
                rec[TEACHER_TOKENIZER] = got[TEACHER_TOKENIZER]
            records.append(rec)
        ids = [np.asarray(p + r, np.int32) for p, r in zip(p_ids, r_ids)]
        tokenized = TokenizedData(ids, [np.arange(len(x)) >= len(p) for x, p in zip(ids, p_ids)],
                                  np.asarray([len(p) for p in p_ids], np.int32), self.vocab.fingerprint,
                                  len(self.vocab.table))
        ev, _ = evidence_rows(records, tokenized, self.tokenizer, vocab=self.vocab)
        st["seconds"] += time.perf_counter() - t0
        return ev

    async def _ask(self, texts: list[tuple[str, str]], keys: list[str]) -> None:
        scorer = EchoScorer(self.base_url, self.cfg.api_key_env, self.cfg.timeout)
        limiter, jitter, tally = RateLimiter(None, None), random.Random(0), _Tally()
        fatal: list[Exception] = []
        sem = asyncio.Semaphore(self.cfg.concurrency)
        if self._writer is None:
            self._writer = RecordWriter(self.cache)
        st, s = self.stats, self.settings

        async def one(prompt: str, response: str, key: str) -> None:
            text = prompt + response
            st["requests"] += 1
            async with sem:
                got, error = await ask_with_retries(lambda: scorer.scored(text, s), scorer.classify, limiter,
                                                    len(text) / 4, self.cfg.max_retries, self.cfg.backoff, jitter,
                                                    tally, fatal, started=True)
            if error is None:  # the run stops (another request's fatal error)
                return
            if got is None:
                st["failed"] += 1
                logger.warning("on-policy scoring: a request failed after %d retries (%s); that sample gets "
                               "posterior targets", self.cfg.max_retries, error)
                return
            entry: dict[str, Any] = {"key": key, "prompt": prompt, "response": response}
            try:
                if got.text != text:
                    raise Skip("mismatch", "the server echoed another text than the one sent")
                lps = response_part(got.logprobs, prompt, response)
            except Skip as e:
                entry.update(skipped=e.args[0], detail=e.args[1])
                st["skipped"][e.args[0]] = st["skipped"].get(e.args[0], 0) + 1
            else:
                entry.update(settings={"model": s.model, "top_logprobs": s.top_logprobs}, logprobs=lps)
                if got.tokenizer is not None:
                    entry[TEACHER_TOKENIZER] = got.tokenizer
                st["scored_tokens"] += len(lps)
            self._writer.write(entry)
            self.known[key] = entry

        try:
            await asyncio.gather(*(one(p, r, k) for (p, r), k in zip(texts, keys)))
        finally:
            await scorer.close()
            st["retries"] += tally.retries  # what the server's faults cost (a fault-free run retries none)
            for name, n in tally.errors.items():
                st["errors"][name] = st["errors"].get(name, 0) + n
        if fatal:
            raise ScoreError(f"scoring the student's samples at {scorer.base_url}: {fatal[0]}".replace("\n", " "))

    def close(self) -> None:
        """Wait for the scoring in flight (its answers cached; an error in it is the caller's to have seen) and
        close the cache."""
        try:
            if self._inflight is not None:
                self._inflight.exception()
                self._inflight = None
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def summary(self) -> dict[str, Any]:
        st = dict(self.stats)
        st["seconds"] = round(st["seconds"], 4)
        return {"base_url": self.base_url, "model": self.settings.model, "top_k": self.settings.top_logprobs,
                "budget": self.budget, "cache": str(self.cache), "cache_entries": len(self.known),
                "probe": self.probed, **st}


@dataclass
class PendingEvidence:
    """Samples submitted to a `SampleScorer`: `result()` waits for the server's answers and returns their
    evidence rows (one per sampled token, response after response)."""
    scorer: SampleScorer
    texts: list[tuple[str, str]]
    keys: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    future: Future | None  # the requests in flight for them (None: all answered from the cache, or none to ask)

    def result(self) -> Evidence:
        return self.scorer._evidence(self.texts, self.keys, self.prompt_ids, self.response_ids, self.future)
