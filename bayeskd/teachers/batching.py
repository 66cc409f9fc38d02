"""Requests decoded together: an asyncio queue in front of a running `HFTeacher.decoding()` batch, shared by
`bayeskd serve-teacher --max-batch N` and `bayeskd generate --backend hf --max-batch N`.

Callers `await batcher.submit(request)` (a dict of `HFTeacher.complete`'s arguments). Idle, one loop takes the first
waiting request, then more until the batch holds `max_batch` rows (a request counts its n samples; one larger than
`max_batch` runs alone) or `wait` seconds have passed with none arriving, and runs the batch in the caller's
one-thread executor. Batching is continuous: the batch (`HFTeacher.decoding()`) runs one decoding step per
executor call, and between steps the requests that arrived meanwhile join it as far as rows are free, while rows
that finished have left it, so the model does not wait for a whole batch to end, nor for the answers to be sent
and the next requests to come; anything else sent to that executor (scoring) runs between two steps.

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
import contextlib
import logging
from concurrent.futures import Executor
from typing import Any

log = logging.getLogger(__name__)


class Batcher:
    """Collects `complete` requests and decodes them, at most `max_batch` rows at a time, in a running
    `teacher.decoding()` batch that requests join and leave between steps (see the module docstring). `start()` inside the running event loop, `await close()` at the end."""

    def __init__(self, teacher: Any, executor: Executor, max_batch: int, wait: float = 0.005):
        if max_batch < 1 or wait < 0:
            raise ValueError(f"need max_batch >= 1 and wait >= 0 (got {max_batch}, {wait})")
        self.teacher, self.executor, self.max_batch, self.wait = teacher, executor, max_batch, wait
        self.held: tuple[dict[str, Any], asyncio.Future] | None = None  # the request that did not fit the last batch
        self.queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future]] | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0  # how many batches started from idle, and the rows admitted (tests, benchmarks)
        self.rows = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="bayeskd-batcher")

    async def submit(self, request: dict[str, Any]) -> Any:
        """The request's Generations; its ValueError (the request cannot be answered) or the batch's error."""
        if self.queue is None:
            self.start()
        assert self.queue is not None
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((request, fut))
        return await fut

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        left = [self.held] if self.held is not None else []
        while self.queue is not None and not self.queue.empty():
            left.append(self.queue.get_nowait())
        self.held = None
        _fail(left)

    async def _take(self) -> list[tuple[dict[str, Any], asyncio.Future]]:
        assert self.queue is not None
        batch = [self.held] if self.held is not None else [await self.queue.get()]
        self.held = None
        rows = batch[0][0].get("n", 1)
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + self.wait
            while rows < self.max_batch:
                if self.queue.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                else:
                    item = self.queue.get_nowait()
                n = item[0].get("n", 1)
                if rows + n > self.max_batch:
                    self.held = item  # first in the next batch
                    break
                batch.append(item)
                rows += n
        except asyncio.CancelledError:
            _fail(batch)
            raise
        return batch

    def _take_now(self, room: int) -> list[tuple[dict[str, Any], asyncio.Future]]:
        """The waiting requests that fit `room` rows, in order, without waiting (the first that does not fit is
        held, first in line)."""
        assert self.queue is not None
        batch = []
        while self.held is not None or not self.queue.empty():
            item = self.held if self.held is not None else self.queue.get_nowait()
            n = item[0].get("n", 1)
            if n > room:
                self.held = item
                break
            self.held = None
            batch.append(item)
            room -= n
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        decoding: Any = None
        active: dict[int, asyncio.Future] = {}
        key = 0
        while True:
            if not active:  # idle: wait for a request, then up to `wait` for more
                batch = await self._take()
                decoding = self.teacher.decoding()
                self.batches += 1
            else:  # running: whatever is waiting joins, as far as rows are free
                batch = self._take_now(self.max_batch - decoding.rows)
            new = []
            for request, fut in batch:
                active[key] = fut
                new.append((key, request))
                key += 1
            self.rows += sum(r.get("n", 1) for r, _ in batch)
            try:
                done = await loop.run_in_executor(self.executor, decoding.step, new)
            except asyncio.CancelledError:
                _fail([(None, f) for f in active.values()])
                raise
            except Exception as e:  # noqa: BLE001 - a model failure fails the running requests, not the loop
                log.exception("batched generation failed")
                done = [(k, e) for k in active]
            for k, res in done:
                fut = active.pop(k)
                if fut.done():  # the caller went away (its connection closed)
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)


def _fail(items: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
    for _, fut in items:
        if not fut.done():
            fut.set_exception(RuntimeError("the teacher stopped before answering"))
