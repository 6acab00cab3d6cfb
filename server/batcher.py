"""Cross-task dynamic batching: requests of any tasks wait briefly, then run together in one forward.

    submit(entry, texts) -> outputs          (awaited by the request handler)

A batch closes when it holds `max_batch_texts` texts or its oldest request has waited `max_wait` seconds.
One forward runs at a time, in a worker thread, while the next batch fills. The queue is bounded in texts:
beyond `max_queue_texts` a request is refused at once with Overloaded (429, Retry-After), never parked.
A request whose client went away before its batch ran is dropped; once running, its result is discarded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.errors import NotReady, Overloaded
from server.metrics import Metrics
from server.predictor import Output, TaskRequest

log = logging.getLogger(__name__)
Forward = Callable[[Sequence[TaskRequest]], list[list[Output]]]


@dataclass(eq=False)
class _Pending:
    request: TaskRequest
    future: asyncio.Future[list[Output]]
    enqueued: float

    @property
    def texts(self) -> Sequence[str]:
        return self.request.texts


class Batcher:
    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_texts: int,
        max_wait: float,
        max_queue_texts: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.forward = forward
        self.max_batch_texts, self.max_wait, self.max_queue_texts = max_batch_texts, max_wait, max_queue_texts
        self.metrics = metrics
        self._pending: deque[_Pending] = deque()
        self._pending_texts = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="recast-forward")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._inflight: list[_Pending] = []
        self._seconds_per_text = 0.01  # running estimate, for Retry-After

    @property
    def queued_texts(self) -> int:
        return self._pending_texts

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="recast-batcher")
        self._task.add_done_callback(self._supervise)

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new work and answer what is queued (up to `drain_timeout` s); the rest gets NotReady."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=drain_timeout)
            except TimeoutError:
                self._task.cancel()
                log.warning("batcher stopped before the queue drained", extra={"texts": self._pending_texts})
                _fail(self._inflight, NotReady("the server is shutting down", retry_after=1))
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(NotReady("the server is shutting down", retry_after=1))
        self._pending_texts = 0
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: TaskRequest) -> list[Output]:
        if self._closed:
            raise NotReady("the server is shutting down", retry_after=1)
        if self._pending_texts + len(request.texts) > self.max_queue_texts:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            wait = max(1.0, math.ceil(self._pending_texts * self._seconds_per_text))
            raise Overloaded(
                f"the request queue is full ({self._pending_texts} texts waiting); retry later",
                retry_after=wait,
            )
        future: asyncio.Future[list[Output]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, future, time.monotonic()))
        self._pending_texts += len(request.texts)
        self._gauge()
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                if self._closed:
                    return
                continue
            deadline = self._pending[0].enqueued + self.max_wait
            while (
                not self._closed
                and self._pending_texts < self.max_batch_texts
                and (left := deadline - time.monotonic()) > 0
            ):
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=left)
                except TimeoutError:
                    break
                self._wakeup.clear()
            batch = self._take()
            if batch:
                await self._forward(loop, batch)
            if self._pending or self._closed:
                self._wakeup.set()

    def _take(self) -> list[_Pending]:
        """Whole requests, oldest first, up to max_batch_texts (at least one); skips abandoned ones."""
        batch: list[_Pending] = []
        texts = 0
        while self._pending:
            request = self._pending[0]
            if request.future.done():  # cancelled: the client went away before its batch ran
                self._pending.popleft()
                self._pending_texts -= len(request.texts)
                continue
            if batch and texts + len(request.texts) > self.max_batch_texts:
                break
            self._pending.popleft()
            self._pending_texts -= len(request.texts)
            batch.append(request)
            texts += len(request.texts)
        self._gauge()
        return batch

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        requests = [r.request for r in batch]
        texts = sum(len(r.texts) for r in batch)
        start = time.perf_counter()
        self._inflight = batch
        try:
            results = await loop.run_in_executor(self._executor, self.forward, requests)
            if len(results) != len(batch):
                raise RuntimeError(f"forward answered {len(results)} requests of {len(batch)}")
        except Exception as exc:  # one bad batch must not stop the server: its requests get the error
            log.exception("batched forward failed", extra={"texts": texts, "requests": len(batch)})
            _fail(batch, exc)
            return
        finally:
            self._inflight = []
        seconds = time.perf_counter() - start
        self._seconds_per_text = 0.8 * self._seconds_per_text + 0.2 * seconds / max(1, texts)
        if self.metrics is not None:
            self.metrics.batch_texts.observe(texts)
            self.metrics.batch_tasks.observe(len({r.request.entry.cache_key for r in batch}))
            self.metrics.forward_seconds.observe(seconds)
        for r, outputs in zip(batch, results, strict=True):
            if not r.future.done():
                r.future.set_result(outputs)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        """The batching loop ended: normal at stop; otherwise a bug, and no request may wait forever."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("the batcher stopped unexpectedly", exc_info=task.exception())
        self._closed = True
        error = NotReady("the batcher stopped; the server must be restarted", retry_after=5)
        _fail(self._inflight, error)
        _fail(list(self._pending), error)
        self._pending.clear()
        self._pending_texts = 0

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._pending_texts)


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for r in batch:
        if not r.future.done():
            r.future.set_exception(error)
