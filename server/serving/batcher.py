"""Cross-task dynamic batching: requests of any tasks and tenants wait briefly, then run in one forward.

    outputs = await batcher.submit(request)      (awaited by the request handler)
    vectors = await batcher.embed(request)       (an embed request: its (texts, H) unit embeddings)

A batch closes when it holds `max_batch_texts` texts, or `max_batch_tokens` tokens counted after padding
(texts x the longest text, for requests tokenized at the edge), or its oldest request has waited
`max_wait` seconds.
One forward runs at a time, in a worker thread, while the next batch fills.

Fair sharing between tenants:
- Admission: a tenant may hold at most its fair share of the queue, `max_queue_texts / (tenants
  waiting, itself included)`, so a tenant that floods leaves room for the others; a request beyond it is
  refused at once with Overloaded (429, Retry-After), never parked; a tenant with nothing waiting may
  always queue one request of up to `max_queue_texts` texts. The whole queue is capped at twice
  `max_queue_texts` (the shares shrink as tenants arrive, while texts already admitted stay queued).
- Batch filling: round-robin over the tenants waiting, one whole request per tenant per round, the tenant
  with the oldest waiting request first, so no tenant waits behind another's backlog and none starves.

Failure isolation: `forward(requests)` answers each request with its outputs or with the exception that
request alone caused. If the forward itself raises, the batch is split in halves and each half is run
again, down to single requests, so that only the request at fault gets the error; its traceback is
logged once. A request whose client went away before its batch ran is dropped; once running, its result
is discarded.
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

import torch

from recast_core.task_model import Prediction
from server.errors import NotReady, Overloaded, ServerError
from server.ids import split_stored_id
from server.metrics import Metrics
from server.serving.predictor import Answer, Result, TaskRequest

log = logging.getLogger("server.batcher")  # the logger name of its lines as they always were
__all__ = ["Batcher", "Forward", "Result"]
Forward = Callable[[Sequence[TaskRequest]], list[Result]]
QUEUE_HARD_CAP = 2  # the whole queue never exceeds this many times max_queue_texts


@dataclass(eq=False)
class _Pending:
    request: TaskRequest
    tenant: str
    future: asyncio.Future[Answer]
    enqueued: float

    @property
    def texts(self) -> int:
        return len(self.request.texts)

    @property
    def longest(self) -> int:
        return self.request.longest or 0

    @property
    def tokens(self) -> int:
        return self.texts * self.longest


class Batcher:
    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_texts: int,
        max_wait: float,
        max_queue_texts: int,
        max_batch_tokens: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.forward = forward
        self.max_batch_texts, self.max_wait, self.max_queue_texts = max_batch_texts, max_wait, max_queue_texts
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self._queues: dict[str, deque[_Pending]] = {}  # tenant -> its waiting requests, oldest first
        self._tenant_texts: dict[str, int] = {}  # tenant -> texts it has waiting
        self._pending_texts = 0
        self._pending_tokens = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="recast-forward")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._inflight: list[_Pending] = []
        self._seconds_per_text = 0.01  # running estimate, for Retry-After

    @property
    def queued_texts(self) -> int:
        return self._pending_texts

    def queued_texts_of(self, tenant: str) -> int:
        return self._tenant_texts.get(tenant, 0)

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
        _fail(self._drain(), NotReady("the server is shutting down", retry_after=1))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: TaskRequest) -> list[Prediction]:
        """A classify request's predictions, in input order."""
        answer = await self._queued(request)
        if not isinstance(answer, list):
            raise ServerError(f"a {request.kind} request was answered with {type(answer).__name__}")
        return answer

    async def embed(self, request: TaskRequest) -> torch.Tensor:
        """An embed request's (texts, H) float32 L2-normalised embeddings, in input order."""
        answer = await self._queued(request)
        if not isinstance(answer, torch.Tensor):
            raise ServerError(f"a {request.kind} request was answered with {type(answer).__name__}")
        return answer

    async def _queued(self, request: TaskRequest) -> Answer:
        if self._closed:
            raise NotReady("the server is shutting down", retry_after=1)
        tenant = split_stored_id(request.entry.task_id)[0]
        texts = len(request.texts)
        self._admit(tenant, texts)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(tenant, deque()).append(_Pending(request, tenant, future, time.monotonic()))
        self._tenant_texts[tenant] = self._tenant_texts.get(tenant, 0) + texts
        self._pending_texts += texts
        self._pending_tokens += texts * (request.longest or 0)
        self._gauge()
        self._wakeup.set()
        return await future

    def _admit(self, tenant: str, texts: int) -> None:
        """Overloaded unless `tenant` may queue `texts` more texts now (its fair share; the hard cap)."""
        waiting = len(self._queues) + (0 if tenant in self._queues else 1)
        share = max(self.max_queue_texts // waiting, 1)
        held = self._tenant_texts.get(tenant, 0)
        if held + texts <= share and self._pending_texts + texts <= QUEUE_HARD_CAP * self.max_queue_texts:
            return
        if (
            held == 0
            and texts <= self.max_queue_texts
            and self._pending_texts + texts <= QUEUE_HARD_CAP * self.max_queue_texts
        ):
            return  # a tenant with nothing waiting may always queue one request (it may exceed the share)
        if self.metrics is not None:
            self.metrics.rejected.inc()
        wait = max(1.0, math.ceil(max(held, 1) * waiting * self._seconds_per_text))
        raise Overloaded(
            f"the request queue is full for this tenant ({held} of its texts waiting, its share is {share} "
            f"while {waiting} tenants wait); retry later",
            retry_after=wait,
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queues:
                if self._closed:
                    return
                continue
            deadline = self._oldest() + self.max_wait
            while (
                not self._closed
                and self._pending_texts < self.max_batch_texts
                and (self.max_batch_tokens is None or self._pending_tokens < self.max_batch_tokens)
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
            if self._queues or self._closed:
                self._wakeup.set()

    def _oldest(self) -> float:
        return min(queue[0].enqueued for queue in self._queues.values())

    def _take(self) -> list[_Pending]:
        """Whole requests, round-robin over tenants (oldest first each round), within the batch's text and
        padded-token budgets (the first request always: one larger than a budget still runs, alone)."""
        self._drop_abandoned()
        batch: list[_Pending] = []
        texts = longest = 0
        budget = self.max_batch_tokens
        while self._queues:
            progressed = False
            for tenant in sorted(self._queues, key=lambda t: self._queues[t][0].enqueued):
                queue = self._queues[tenant]
                head = queue[0]
                widest = max(longest, head.longest)
                if batch and (
                    texts + head.texts > self.max_batch_texts
                    or (budget is not None and (texts + head.texts) * widest > budget)
                ):
                    continue
                queue.popleft()
                self._unqueue(head)
                batch.append(head)
                texts, longest = texts + head.texts, widest
                progressed = True
            if not progressed or texts >= self.max_batch_texts:
                break
        self._gauge()
        return batch

    def _drop_abandoned(self) -> None:
        """Forget requests whose client went away before their batch ran (their futures are cancelled)."""
        for tenant in list(self._queues):
            queue = self._queues[tenant]
            for pending in [p for p in queue if p.future.done()]:
                queue.remove(pending)
                self._unqueue(pending)
            if not queue:
                self._queues.pop(tenant, None)

    def _unqueue(self, pending: _Pending) -> None:
        self._pending_texts -= pending.texts
        self._pending_tokens -= pending.tokens
        left = self._tenant_texts.get(pending.tenant, 0) - pending.texts
        if left > 0:
            self._tenant_texts[pending.tenant] = left
        else:
            self._tenant_texts.pop(pending.tenant, None)
        queue = self._queues.get(pending.tenant)
        if queue is not None and not queue:
            del self._queues[pending.tenant]

    def _drain(self) -> list[_Pending]:
        pending = [p for queue in self._queues.values() for p in queue]
        self._queues.clear()
        self._tenant_texts.clear()
        self._pending_texts = self._pending_tokens = 0
        self._gauge()
        return pending

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        requests = [r.request for r in batch]
        texts = sum(r.texts for r in batch)
        start = time.perf_counter()
        self._inflight = batch
        try:
            results = await loop.run_in_executor(self._executor, self._isolated, requests)
        finally:
            self._inflight = []
        seconds = time.perf_counter() - start
        self._seconds_per_text = 0.8 * self._seconds_per_text + 0.2 * seconds / max(1, texts)
        if self.metrics is not None:
            self.metrics.batch_texts.observe(texts)
            for r in batch:
                self.metrics.texts.labels(r.request.kind).inc(r.texts)
            self.metrics.batch_tasks.observe(len({r.request.entry.cache_key for r in batch}))
            self.metrics.forward_seconds.observe(seconds)
        for r, result in zip(batch, results, strict=True):
            if r.future.done():
                continue
            if isinstance(result, BaseException):
                r.future.set_exception(result)
            else:
                r.future.set_result(result)

    def _isolated(self, requests: Sequence[TaskRequest]) -> list[Result]:
        """forward(requests); if it raises, each half again, so an error reaches only the request at fault."""
        try:
            results = self.forward(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"forward answered {len(results)} requests of {len(requests)}")
            return results
        except Exception as exc:
            if len(requests) == 1:
                request = requests[0]
                log.error(
                    "forward failed for one request",
                    exc_info=exc,
                    extra={"task_id": request.entry.task_id, "texts": len(request.texts)},
                )
                if self.metrics is not None:
                    self.metrics.forward_failures.inc()
                return [ServerError("the forward failed for this request; see the server log")]
            log.warning(
                "batched forward failed; retrying its requests in parts",
                extra={"requests": len(requests), "error": f"{type(exc).__name__}: {str(exc)[:200]}"},
            )
            middle = len(requests) // 2
            return self._isolated(requests[:middle]) + self._isolated(requests[middle:])

    def _supervise(self, task: asyncio.Task[None]) -> None:
        """The batching loop ended: normal at stop; otherwise a bug, and no request may wait forever."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("the batcher stopped unexpectedly", exc_info=task.exception())
        self._closed = True
        error = NotReady("the batcher stopped; the server must be restarted", retry_after=5)
        _fail(self._inflight, error)
        _fail(self._drain(), error)

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
