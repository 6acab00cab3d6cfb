"""Training jobs: labelled examples in, a served task out, trained in the background.

A job is queued (bounded queue), then run in a worker process (server/training_worker.py) by one of
`max_jobs` runner threads, then published through the catalog exactly like an upload (validated, stored
durably, swapped in atomically). Every state change is recorded in the job store, so every replica and a
restarted server can answer for it. The runner heartbeats its jobs; a job whose server stopped (no
heartbeat for STALE_AFTER seconds, or any unfinished job when a single-writer store is reopened) is
marked failed with that reason, never silently lost. Cancelling ends the worker process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from recast_core.data import LabelledTexts
from server.catalog import TaskCatalog
from server.errors import JobFinished, Overloaded, ServerError, UnknownJob
from server.metrics import Metrics
from server.stores.jobs import JobStore
from server.task_ids import qualify
from server.training_worker import WorkerSpec, run

log = logging.getLogger(__name__)

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
HEARTBEAT = 2.0  # seconds between heartbeats of a server's unfinished jobs
STALE_AFTER = 30.0  # an unfinished job without a heartbeat this long lost its server
SAVE_EVERY = 1.0  # seconds between recorded progress updates


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _age(stamp: str) -> float:
    return (datetime.now(UTC) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()


@dataclass(frozen=True)
class Job:
    job_id: str
    tenant: str
    task_id: str
    state: State
    created: str
    updated: str  # the heartbeat of an unfinished job
    owner: str  # the server process running it
    examples: int
    labels: list[str]
    options: dict[str, Any]
    phase: str = "queued"
    progress: float = 0.0
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    cancel_requested: bool = False

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in known})


@dataclass(eq=False)
class _Work:
    """A job of this server; `job` changes only under `lock`, and never again once `ended`."""

    job: Job
    data: LabelledTexts
    process: Any = None  # the worker process while it runs
    cancelled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: bool = False


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
    ) -> None:
        self.store, self.catalog, self.metrics = store, catalog, metrics
        self.bank_dir, self.bank_fingerprint = bank_dir, bank_fingerprint
        self.max_queued, self.threads, self.nice, self.idle_priority = (
            max_queued,
            threads,
            nice,
            idle_priority,
        )
        self.owner = uuid.uuid4().hex[:12]
        self._queue: deque[_Work] = deque()
        self._active: dict[str, _Work] = {}  # queued and running jobs of this server
        self._cond = threading.Condition()
        self._stopping = False
        self._context = mp.get_context("spawn")
        self._recover()
        self._threads = [
            threading.Thread(target=self._runner, name=f"job-runner-{i}", daemon=True)
            for i in range(max_jobs)
        ]
        self._threads.append(threading.Thread(target=self._heartbeat, name="job-heartbeat", daemon=True))
        for thread in self._threads:
            thread.start()

    # the API's side

    def submit(self, tenant: str, task_id: str, data: LabelledTexts, options: dict[str, Any]) -> Job:
        """Queue a job (data and options already validated); Overloaded when the queue is full."""
        qualify(tenant, task_id)
        now = _now()
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
            if len(self._queue) >= self.max_queued:
                raise Overloaded(
                    f"{len(self._queue)} training jobs are already waiting; retry later", retry_after=30
                )
            self.store.put(job.to_record())
            work = _Work(job, data)
            self._queue.append(work)
            self._active[job.job_id] = work
            self._cond.notify()
        self._count("queued")
        log.info("training job queued", extra=self._fields(job))
        return job

    def get(self, tenant: str, job_id: str) -> Job:
        """The job, if `tenant` owns it (another tenant's job is as unknown as a missing one)."""
        record = self.store.get(job_id)
        if record is None or record.get("tenant") != tenant:
            raise UnknownJob(f"no job {job_id[:64]!r}")
        return self._checked(Job.from_record(record))

    def list(self, tenant: str, limit: int = 50) -> list[Job]:
        return [self._checked(Job.from_record(r)) for r in self.store.list(tenant, limit)]

    def cancel(self, tenant: str, job_id: str) -> Job:
        """Cancel a queued or running job; JobFinished if it already ended."""
        job = self.get(tenant, job_id)
        if job.final:
            raise JobFinished(f"job {job_id} already {job.state}")
        with self._cond:
            work = self._active.get(job_id)
            if work is not None and work in self._queue:  # not started: just drop it
                self._queue.remove(work)
                del self._active[job_id]
                return self._end(work, "cancelled", error="cancelled before it started")
        if work is not None:  # running here: end the worker; the runner records the outcome
            work.cancelled.set()
            if work.process is not None:
                work.process.terminate()
            return self._wait_final(job_id, job)
        # running on another replica: ask it (its heartbeat reads the request)
        requested = replace(job, cancel_requested=True)
        self.store.put(requested.to_record())
        return requested

    def close(self) -> None:
        """Stop: queued and running jobs of this server are ended and recorded as failed."""
        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            running = [w for w in self._active.values() if w not in queued]
            self._cond.notify_all()
        for work in queued:
            self._end(work, "failed", error="the server stopped before the job started")
            self._active.pop(work.job.job_id, None)
        for work in running:
            work.cancelled.set()
            if work.process is not None:
                work.process.terminate()
        for thread in self._threads:
            thread.join(timeout=10)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # the runner's side

    def _runner(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                work = self._queue.popleft()
            try:
                self._run(work)
            except Exception as exc:  # recorded, and the runner keeps going
                log.exception("training job crashed", extra=self._fields(work.job))
                self._end(work, "failed", error=f"internal error: {type(exc).__name__}")
            finally:
                with self._cond:
                    self._active.pop(work.job.job_id, None)

    def _run(self, work: _Work) -> None:
        job = self._update(work, save=True, state="running", phase="loading", started=_now())
        log.info("training job started", extra=self._fields(job))
        spec = WorkerSpec(
            self.bank_dir,
            self.bank_fingerprint,
            work.data.texts,
            work.data.labels,
            job.options,
            self.threads,
            self.nice,
            self.idle_priority,
        )
        parent, child = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run, args=(spec, child), name=f"train-{job.job_id[:8]}", daemon=True
        )
        work.process = process
        process.start()
        child.close()
        outcome: tuple[Any, ...] | None = None
        saved = time.monotonic()
        try:
            while outcome is None:
                if work.cancelled.is_set():
                    break
                if not parent.poll(0.5):
                    if not process.is_alive() and not parent.poll(0):
                        break
                    continue
                try:
                    message = parent.recv()
                except EOFError:
                    break
                if message[0] == "progress":
                    _, phase, done, total = message
                    share = done / total if total else 0.0
                    save = time.monotonic() - saved >= SAVE_EVERY
                    self._update(work, save=save, phase=phase, progress=_overall(phase, share))
                    saved = time.monotonic() if save else saved
                else:
                    outcome = message
        finally:
            if outcome is None or process.is_alive():
                process.terminate()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
            parent.close()
        if work.cancelled.is_set() and (outcome is None or outcome[0] != "succeeded"):
            if self._stopping:
                self._end(work, "failed", error="the server stopped while the job ran")
            else:
                self._end(work, "cancelled", error="cancelled while it ran")
            return
        if outcome is None:
            self._end(work, "failed", error=f"the training process exited (code {process.exitcode})")
            return
        if outcome[0] == "failed":
            self._end(work, "failed", error=str(outcome[1]))
            return
        _, artifact, summary = outcome
        try:
            entry = self.catalog.upload(qualify(job.tenant, job.task_id), artifact)
        except ServerError as exc:
            self._end(work, "failed", error=f"training succeeded but publishing failed: {exc.message}")
            return
        result = {
            "version": entry.version,
            "val_accuracy": summary.get("val_accuracy"),
            "probe_val_accuracy": summary.get("probe_val_accuracy"),
            "train_examples": summary.get("train_examples"),
            "val_examples": summary.get("val_examples"),
            "epochs_run": summary.get("epochs_run"),
            "seconds": summary.get("seconds"),
        }
        self._update(work, phase="done", progress=1.0)
        self._end(work, "succeeded", result=result)

    def _heartbeat(self) -> None:
        while not self._stopping:
            time.sleep(HEARTBEAT)
            with self._cond:
                active = list(self._active.values())
            for work in active:
                try:
                    stored = self.store.get(work.job.job_id)
                    if stored is not None and stored.get("cancel_requested") and not work.cancelled.is_set():
                        work.cancelled.set()  # asked through another replica
                        with self._cond:
                            queued = work in self._queue
                            if queued:
                                self._queue.remove(work)
                                self._active.pop(work.job.job_id, None)
                        if queued:
                            self._end(work, "cancelled", error="cancelled before it started")
                        elif work.process is not None:
                            work.process.terminate()
                        continue
                    self._update(work, save=True)
                except ServerError as exc:  # the store is down: try again on the next beat
                    log.warning(
                        "job heartbeat failed", extra={"job_id": work.job.job_id, "error": exc.message}
                    )

    # records

    def _recover(self) -> None:
        """Mark the unfinished jobs of servers that stopped as failed (all of them for a single writer)."""
        for record in self.store.list(None, 10_000):
            job = Job.from_record(record)
            if not job.final and (self.store.single_writer or _age(job.updated) > STALE_AFTER):
                self._finish(job, "failed", error="the server running the job stopped before it finished")

    def _checked(self, job: Job) -> Job:
        """`job`, or failed if its server stopped heartbeating it."""
        if not job.final and job.owner != self.owner and _age(job.updated) > STALE_AFTER:
            return self._finish(job, "failed", error="the server running the job stopped before it finished")
        return job

    def _update(self, work: _Work, *, save: bool = False, **changes: Any) -> Job:
        """Change this server's job (recorded when `save`); nothing changes once it ended."""
        with work.lock:
            if not work.ended:
                work.job = replace(work.job, **changes)
                if save:
                    work.job = self._save(work.job)
            return work.job

    def _end(
        self, work: _Work, state: State, *, error: str | None = None, result: dict[str, Any] | None = None
    ) -> Job:
        with work.lock:
            if not work.ended:
                work.ended = True
                work.job = self._finish(work.job, state, error=error, result=result)
            return work.job

    def _save(self, job: Job) -> Job:
        job = replace(job, updated=_now())
        self.store.put(job.to_record())
        return job

    def _finish(
        self, job: Job, state: State, *, error: str | None = None, result: dict[str, Any] | None = None
    ) -> Job:
        done = replace(job, state=state, finished=_now(), error=error, result=result)
        done = self._save(done)
        self._count(state)
        log.info("training job " + state, extra=self._fields(done) | ({"error": error} if error else {}))
        return done

    def _wait_final(self, job_id: str, job: Job, timeout: float = 15.0) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.store.get(job_id)
            if record is not None and record.get("state") in FINAL:
                return Job.from_record(record)
            time.sleep(0.1)
        return job

    def _count(self, state: str) -> None:
        if self.metrics is not None:
            self.metrics.jobs.labels(state=state).inc()

    @staticmethod
    def _fields(job: Job) -> dict[str, Any]:
        return {"job_id": job.job_id, "tenant": job.tenant, "task_id": job.task_id, "examples": job.examples}


def _overall(phase: str, share: float) -> float:
    """One progress number for the whole job: loading 5 %, embedding and probe 15 %, training 80 %."""
    start, width = {"loading": (0.0, 0.05), "embedding": (0.05, 0.15), "training": (0.2, 0.8)}.get(
        phase, (0.0, 0.0)
    )
    return round(min(1.0, start + width * share), 4)
