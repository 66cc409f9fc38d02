"""Requests decoded together: an asyncio queue in front of `HFTeacher.complete_batch`, shared by
`bayeskd serve-teacher --max-batch N` and `bayeskd generate --backend hf --max-batch N`.

Callers `await batcher.submit(request)` (a dict of `HFTeacher.complete`'s arguments). One loop takes the first
waiting request, then more until the batch holds `max_batch` rows (a request counts its n samples; one larger than
`max_batch` runs alone) or `wait` seconds have passed with none arriving, and runs the batch in the caller's
one-thread executor, so batches, and anything else sent to that executor (scoring), never overlap. A batch runs to
its end (its finished rows leave it early); requests arriving meanwhile form the next one.

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
    """Collects `complete` requests and runs them `max_batch` rows at a time through `teacher.complete_batch`
    (see the module docstring). `start()` inside the running event loop, `await close()` at the end."""

    def __init__(self, teacher: Any, executor: Executor, max_batch: int, wait: float = 0.005):
        if max_batch < 1 or wait < 0:
            raise ValueError(f"need max_batch >= 1 and wait >= 0 (got {max_batch}, {wait})")
        self.teacher, self.executor, self.max_batch, self.wait = teacher, executor, max_batch, wait
        self.held: tuple[dict[str, Any], asyncio.Future] | None = None  # the request that did not fit the last batch
        self.queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future]] | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0  # how many batches ran, and their rows (for tests and benchmarks)
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

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take()
            requests = [r for r, _ in batch]

            try:
                results = await loop.run_in_executor(self.executor, self.teacher.complete_batch, requests)
            except asyncio.CancelledError:
                _fail(batch)
                raise
            except Exception as e:  # noqa: BLE001 - a model failure fails the batch's requests, not the loop
                log.exception("batched generation failed")
                results = [e] * len(batch)
            self.batches += 1
            self.rows += sum(r.get("n", 1) for r in requests)
            for (_, fut), res in zip(batch, results):
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
