"""Requests decoded together: an asyncio queue in front of a running `HFTeacher.decoding()` batch, shared by
`bayeskd serve-teacher --max-batch N` and `bayeskd generate --backend hf --max-batch N`.

Callers `await batcher.submit(request)` (a dict of `HFTeacher.complete`'s arguments). Idle, one loop waits for the
first request, then up to `wait` seconds for more until `max_batch` rows wait (a request counts its n samples; one
larger than `max_batch` runs alone), and starts the batch in the caller's one-thread executor. Batching is
continuous: the batch (`HFTeacher.decoding()`) runs one decoding step per executor call, and between steps the
requests that arrived meanwhile join it as far as rows are free, while rows that finished have left it, so the
model does not wait for a whole batch to end, nor for the answers to be sent and the next requests to come. The
worker queues each next step itself (requests come in through a locked queue, answers go out through
`call_soon_threadsafe`), so no step waits for the event loop, which may be busy writing answers; anything else
sent to that executor (scoring) runs between two steps.

What batching keeps and what it does not: every sample still draws its uniforms from its own generator
(`row_seed(seed, i)`) with its own settings and stop rules, so which requests share a batch changes no sample's
random numbers. The logits differ from unbatched ones in their low bits (padded, batched matmuls sum in another
order: |Δ log-probability| ≤ ~1e-6 on CPU fp32), and which requests share a batch depends on arrival times, so
batched answers are reproducible in their tokens (a token changes only where a uniform falls within that much of
a boundary of the sampling CDF) but not in the last bits of their log-probabilities. `max_batch` 1 does not come
here: the server keeps its one-request-at-a-time path, bit for bit.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from concurrent.futures import Executor
from typing import Any

log = logging.getLogger(__name__)


class Batcher:
    """Collects `complete` requests and decodes them, at most `max_batch` rows at a time, in a running
    `teacher.decoding()` batch that requests join and leave between steps (see the module docstring). `start()`
    inside the running event loop, `await close()` at the end."""

    def __init__(self, teacher: Any, executor: Executor, max_batch: int, wait: float = 0.005):
        if max_batch < 1 or wait < 0:
            raise ValueError(f"need max_batch >= 1 and wait >= 0 (got {max_batch}, {wait})")
        self.teacher, self.executor, self.max_batch, self.wait = teacher, executor, max_batch, wait
        # Shared with the worker thread, under `lock`: the requests waiting to join (in order) and the running ones.
        self.lock = threading.Lock()
        self.waiting: collections.deque[tuple[dict[str, Any], asyncio.Future]] = collections.deque()
        self.active: dict[int, asyncio.Future] = {}
        self.closed = False
        self.arrived: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0  # how many batches started from idle, and the rows admitted (tests, benchmarks)
        self.rows = 0
        self._key = 0

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.arrived = asyncio.Event()
        self.task = self.loop.create_task(self._loop(), name="bayeskd-batcher")

    async def submit(self, request: dict[str, Any]) -> Any:
        """The request's Generations; its ValueError (the request cannot be answered) or the batch's error."""
        if self.task is None:
            self.start()
        assert self.loop is not None and self.arrived is not None
        fut = self.loop.create_future()
        with self.lock:
            if self.closed:
                raise RuntimeError("the teacher stopped before answering")
            self.waiting.append((request, fut))
        self.arrived.set()
        return await fut

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        with self.lock:
            self.closed = True
            left = [fut for _, fut in self.waiting] + list(self.active.values())
            self.waiting.clear()
            self.active.clear()
        _fail(left)

    def _waiting_rows(self) -> int:
        with self.lock:
            return sum(r.get("n", 1) for r, _ in self.waiting)

    async def _loop(self) -> None:
        """Idle: wait for a request, then up to `wait` for more (until `max_batch` rows wait); then the worker runs
        the batch step after step until no row is left and none waits, and this waits for the next request."""
        assert self.loop is not None and self.arrived is not None
        while True:
            while not self.waiting:
                self.arrived.clear()
                if not self.waiting:
                    await self.arrived.wait()
            deadline = self.loop.time() + self.wait
            while self._waiting_rows() < self.max_batch:
                left = deadline - self.loop.time()
                if left <= 0:
                    break
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            ended = self.loop.create_future()
            self.batches += 1
            try:
                self.executor.submit(self._step, self.teacher.decoding(self.max_batch), ended)
            except RuntimeError as e:  # the executor is shut down
                with self.lock:
                    left = [fut for _, fut in self.waiting]
                    self.waiting.clear()
                _fail(left, e)
                continue
            await ended

    def _step(self, decoding: Any, ended: asyncio.Future) -> None:
        """(In the worker.) One decoding step: the waiting requests that fit join, the rows step, the answers that
        ended go to their callers; then the next step is queued behind whatever else the executor was given (so
        scoring runs between two steps), or, with no row left and none waiting, the batch ends. The event loop
        only hands requests in and answers out: the steps never wait for it."""
        try:
            new = []
            with self.lock:
                room = self.max_batch - decoding.rows
                while self.waiting and not self.closed:
                    request, fut = self.waiting[0]
                    n = request.get("n", 1)
                    if n > room and (decoding.rows or new):  # one larger than max_batch runs alone
                        break
                    self.waiting.popleft()
                    self.active[self._key] = fut
                    new.append((self._key, request))
                    self._key += 1
                    self.rows += n
                    room -= n
            try:
                done = decoding.step(new)
            except Exception as e:  # noqa: BLE001 - a model failure fails the running requests, not the batcher
                log.exception("batched generation failed")
                with self.lock:
                    failed = list(self.active.values())
                    self.active.clear()
                self._send([(fut, e) for fut in failed])
                self._send_end(ended)
                return
            with self.lock:
                answers = [(self.active.pop(k), res) for k, res in done if k in self.active]
                more = not self.closed and (decoding.rows > 0 or bool(self.waiting))
            self._send(answers)
            if more:
                self.executor.submit(self._step, decoding, ended)
            else:
                self._send_end(ended)
        except BaseException as e:  # the executor shut down, or a bug: fail what runs, and end the batch
            with self.lock:
                failed = list(self.active.values())
                self.active.clear()
            self._send([(fut, e) for fut in failed])
            self._send_end(ended)
            if not isinstance(e, Exception):
                raise

    def _send(self, answers: list[tuple[asyncio.Future, Any]]) -> None:
        if answers:
            self._call(_settle, answers)

    def _send_end(self, ended: asyncio.Future) -> None:
        self._call(_settle, [(ended, None)])

    def _call(self, fn: Any, *args: Any) -> None:
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(fn, *args)


def _settle(answers: list[tuple[asyncio.Future, Any]]) -> None:
    """(In the event loop.) Each future's result, or its exception; a future already done (its caller went away,
    its connection closed) is left alone."""
    for fut, res in answers:
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


def _fail(futures: list[asyncio.Future], error: BaseException | None = None) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(RuntimeError("the teacher stopped before answering") if error is None else error)
