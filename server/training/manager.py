"""Training jobs: labelled examples in, a served task out, trained in the background.

A job is queued (bounded queue, shared fairly between tenants), then run in a worker process
(server/training/worker.py) by one of `max_jobs` runner threads, then published through the catalog exactly
like an upload (validated, stored durably, swapped in atomically). Every state change is recorded in the job
store, so every replica and a restarted server can answer for it.

One final state for every replica (server/training/recorder.py): records are written only by
compare-and-set on the revision read (server/stores/jobs.py). The owner (the server running the job) writes
its job while it is unfinished and heartbeats it; any server may end it once: the owner with its outcome,
another replica with `failed` when the heartbeat is older than `stale_after` (or, at start-up, any
unfinished job of a single-writer store). Whichever write lands first wins and a final record is never
written again: a replica whose write loses reads the record back and answers with it; an owner whose write
loses to a final record stops the worker, publishes nothing and keeps that record. A cancel through
another replica is a separate flag that the owner's writes return to it (heartbeat or progress save, so
within `heartbeat` seconds) and never clear.

Fair sharing and retention (server/training/queue.py): a tenant holds at most max(1, max_queued // 2) of the
`max_queued` waiting places, and a free runner starts the tenant with the fewest running jobs, then the one
that started a job least recently; finished jobs are kept `keep_seconds` (7 days) and at most
`keep_finished` (200) per tenant, pruned when a job of the tenant ends and every 10 minutes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recast_core.data import LabelledTexts
from server.errors import JobFinished, Overloaded, ServerError, UnknownJob
from server.ids import qualify
from server.metrics import Metrics
from server.stores.jobs import JobStore
from server.tasks.catalog import TaskCatalog
from server.training.messages import Failed, Succeeded
from server.training.queue import KEEP_FINISHED, KEEP_SECONDS, PRUNE_EVERY, FairJobQueue
from server.training.recorder import JobRecorder, Work, fields
from server.training.records import Job, job_result, now_stamp
from server.training.runner import run_worker
from server.training.worker import WorkerSpec, run

log = logging.getLogger("server.jobs")  # the logger name of its lines as they always were

HEARTBEAT = 2.0  # seconds between heartbeats of a server's unfinished jobs
STALE_AFTER = 30.0  # an unfinished job without a heartbeat this long lost its server


class JobManager:
    def __init__(
        self,
        store: JobStore,
        catalog: TaskCatalog,
        bank_dir: Path,
        bank_fingerprint: str,
        *,
        max_jobs: int = 1,
        max_queued: int = 8,
        threads: int = 1,
        nice: int = 10,
        idle_priority: bool = True,
        metrics: Metrics | None = None,
        worker: Callable[..., None] = run,
        heartbeat: float = HEARTBEAT,
        stale_after: float = STALE_AFTER,
        keep_finished: int = KEEP_FINISHED,
        keep_seconds: float = KEEP_SECONDS,
        backbone_dir: Path | None = None,
    ) -> None:
        self.store, self.catalog, self.metrics = store, catalog, metrics
        self.bank_dir, self.bank_fingerprint = bank_dir, bank_fingerprint
        self.backbone_dir = backbone_dir  # None: the bundled MiniLM
        self.threads, self.nice, self.idle_priority = threads, nice, idle_priority
        self.worker, self.heartbeat, self.stale_after = worker, heartbeat, stale_after
        self.keep_finished, self.keep_seconds = keep_finished, keep_seconds
        self.owner = uuid.uuid4().hex[:12]
        self.records = JobRecorder(
            store,
            self.owner,
            stale_after=stale_after,
            keep_finished=keep_finished,
            keep_seconds=keep_seconds,
            metrics=metrics,
        )
        self._queue: FairJobQueue[Work] = FairJobQueue(max_queued)
        self._active: dict[str, Work] = {}  # queued and running jobs of this server
        self._running: Counter[str] = Counter()  # running jobs per tenant
        self._cond = threading.Condition()
        self._stopping = False
        self._wake = threading.Event()
        self._context = mp.get_context("spawn")
        self.records.recover()
        self._threads = [
            threading.Thread(target=self._runner, name=f"job-runner-{i}", daemon=True)
            for i in range(max_jobs)
        ]
        self._threads.append(threading.Thread(target=self._heartbeat, name="job-heartbeat", daemon=True))
        for thread in self._threads:
            thread.start()

    # the API's side

    def submit(self, tenant: str, task_id: str, data: LabelledTexts, options: dict[str, Any]) -> Job:
        """Queue a job (data and options already validated); Overloaded when the queue (or the tenant's
        share of it) is full."""
        qualify(tenant, task_id)
        now = now_stamp()
        job = Job(
            job_id=uuid.uuid4().hex,
            tenant=tenant,
            task_id=task_id,
            state="queued",
            created=now,
            updated=now,
            owner=self.owner,
            examples=len(data),
            labels=data.classes(),
            options=options,
        )
        with self._cond:
            if self._stopping:
                raise ServerError("the server is stopping")
            refusal = self._queue.refusal(tenant)
            if refusal is not None:
                raise Overloaded(refusal, retry_after=30)
            job = Job.from_record(self.store.create(job.to_record()))
            work = Work(job, data)
            self._queue.push(work)
            self._active[job.job_id] = work
            self._cond.notify()
        self.records.count("queued")
        log.info("training job queued", extra=fields(job))
        return job

    def get(self, tenant: str, job_id: str) -> Job:
        """The job, if `tenant` owns it (another tenant's job is as unknown as a missing one)."""
        record = self.store.get(tenant, job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id[:64]!r}")
        return self.records.checked(Job.from_record(record))

    def list(self, tenant: str, limit: int = 50) -> list[Job]:
        return [self.records.checked(Job.from_record(r)) for r in self.store.list(tenant, limit)]

    def cancel(self, tenant: str, job_id: str) -> Job:
        """Cancel a queued or running job, here or on another replica; JobFinished if it already ended."""
        job = self.get(tenant, job_id)
        if job.final:
            raise JobFinished(f"job {job_id} already {job.state}")
        with self._cond:
            work = self._active.get(job_id)
            queued = work is not None and self._queue.remove(work)
        if work is not None and queued:  # not started: just drop it
            ended = self.records.end(work, "cancelled", error="cancelled before it started")
            self._release(work)
            return ended
        if work is not None:  # running here: end the worker; the runner records the outcome
            with work.lock:
                work.stop()
        elif self.store.request_cancel(tenant, job_id) is None:  # on another replica: its owner stops it
            raise UnknownJob(f"no job {job_id[:64]!r}")
        return self.records.wait_final(tenant, job_id, job)

    def close(self) -> None:
        """Stop: queued and running jobs of this server are ended and recorded as failed."""
        with self._cond:
            self._stopping = True
            queued = self._queue.drain()
            running = [w for w in self._active.values() if w.running]
            self._cond.notify_all()
        self._wake.set()
        for work in queued:
            self.records.end(work, "failed", error="the server stopped before the job started")
            self._release(work)
        for work in running:
            with work.lock:
                work.stop()
        for thread in self._threads:
            thread.join(timeout=10)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # the runner's side

    def _runner(self) -> None:
        while True:
            with self._cond:
                while not len(self._queue) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                work = self._queue.pop(self._running)
                work.running = True
                self._running[work.job.tenant] += 1
            try:
                self._run(work)
            except Exception as exc:  # recorded, and the runner keeps going
                log.exception("training job crashed", extra=fields(work.job))
                try:
                    self.records.end(work, "failed", error=f"internal error: {type(exc).__name__}")
                except Exception:
                    log.exception("cannot record a crashed training job", extra=fields(work.job))
            finally:
                with self._cond:
                    work.running = False
                    self._running[work.job.tenant] -= 1
                    self._running += Counter()  # drops tenants with none running
                self._release(work)

    def _run(self, work: Work) -> None:
        job = self.records.update(work, save=True, state="running", phase="loading", started=now_stamp())
        if work.cancelled.is_set():  # asked through another replica while it waited
            self.records.end(work, "cancelled", error="cancelled before it started")
        if work.ended:
            return
        log.info("training job started", extra=fields(job))
        spec = WorkerSpec(
            self.bank_dir,
            self.bank_fingerprint,
            work.data.texts,
            work.data.labels,
            job.options,
            self.threads,
            self.nice,
            self.idle_priority,
            self.backbone_dir,
        )

        def started(process: Any) -> None:
            with work.lock:  # published once started: a cancel can always end it
                work.process = process

        def progress(save: bool, phase: str, overall: float) -> None:
            self._progress(work, save, phase=phase, progress=overall)

        outcome, exitcode = run_worker(
            self._context,
            self.worker,
            spec,
            f"train-{job.job_id[:8]}",
            cancelled=work.cancelled,
            started=started,
            progress=progress,
        )
        if work.cancelled.is_set() and not isinstance(outcome, Succeeded):
            if self._stopping:
                self.records.end(work, "failed", error="the server stopped while the job ran")
            else:
                self.records.end(work, "cancelled", error="cancelled while it ran")
            return
        if outcome is None:
            self.records.end(work, "failed", error=f"the training process exited (code {exitcode})")
            return
        if isinstance(outcome, Failed):
            self.records.end(work, "failed", error=outcome.reason)
            return
        self.records.update(work, save=True, phase="done", progress=1.0)
        if work.ended:  # ended elsewhere meanwhile (declared failed): publish nothing
            return
        try:
            entry = self.catalog.upload(qualify(job.tenant, job.task_id), outcome.artifact)
        except ServerError as exc:
            self.records.end(work, "failed", error=f"training succeeded but publishing failed: {exc.message}")
            return
        result = job_result(entry.version, outcome.summary)
        self.records.end(work, "succeeded", result=result)

    def _progress(self, work: Work, save: bool, **changes: Any) -> None:
        try:
            self.records.update(work, save=save, **changes)
        except ServerError as exc:  # the store is away: the heartbeat records the job when it is back
            log.warning("job progress not recorded", extra={"job_id": work.job.job_id, "error": exc.message})

    def _heartbeat(self) -> None:
        pruned = time.monotonic()
        while not self._wake.wait(self.heartbeat):
            with self._cond:
                active = list(self._active.values())
            for work in active:
                try:
                    self._beat(work)
                except ServerError as exc:  # the store is down: try again on the next beat
                    log.warning(
                        "job heartbeat failed", extra={"job_id": work.job.job_id, "error": exc.message}
                    )
                except Exception:  # never the end of the heartbeats of the other jobs
                    log.exception("job heartbeat failed", extra={"job_id": work.job.job_id})
            if time.monotonic() - pruned >= PRUNE_EVERY:
                pruned = time.monotonic()
                self.records.prune(None)

    def _beat(self, work: Work) -> None:
        """Record the job (its heartbeat, or an outcome not recorded yet); act on a cancel request."""
        with work.lock:
            if not work.recorded:
                self.records.record(work)
        if work.cancelled.is_set():
            with self._cond:
                queued = self._queue.remove(work)
            if queued:
                self.records.end(work, "cancelled", error="cancelled before it started")
        self._release(work)

    def _release(self, work: Work) -> None:
        with self._cond:
            if work.recorded and not work.running:
                self._active.pop(work.job.job_id, None)
