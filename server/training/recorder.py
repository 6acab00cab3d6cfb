"""This server's training jobs as the job store holds them: written only by compare-and-set.

Every write is a compare-and-set on the revision read (server/stores/jobs.py), so there is one final state
for every replica: whichever write of a final record lands first wins, and a final record is never written
again. `Work` is a job of this server as it runs here; `JobRecorder` writes it, ends it, recovers the jobs
of servers that stopped, counts and logs every end and prunes finished jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from recast_core.data import LabelledTexts
from server.errors import ServerError
from server.metrics import Metrics
from server.stores.jobs import JobStore
from server.training.queue import prune_finished
from server.training.records import FINAL, Job, State, age, now_stamp

log = logging.getLogger("server.jobs")  # the job manager's logger: its messages as they always were

STOPPED = "the server running the job stopped before it finished"


@dataclass(eq=False)
class Work:
    """A job of this server. `job`, `process`, `ended` and `recorded` change only under `lock`; `job`
    never again once `ended`. It leaves the server's active jobs once `recorded` and not `running`."""

    job: Job
    data: LabelledTexts
    seq: int = 0  # queue order
    process: Any = None  # the worker process, once started
    cancelled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: bool = False  # `job` is final in memory
    recorded: bool = False  # and the store holds a final record
    running: bool = False  # a runner thread holds it

    def stop(self) -> None:
        """End the job's worker process, if it has one (under `lock`)."""
        self.cancelled.set()
        if self.process is not None:
            self.process.terminate()


def fields(job: Job) -> dict[str, Any]:
    """A job's log fields."""
    return {"job_id": job.job_id, "tenant": job.tenant, "task_id": job.task_id, "examples": job.examples}


class JobRecorder:
    """Writes the jobs of the server `owner` to `store`; ends jobs of servers silent for `stale_after` s."""

    def __init__(
        self,
        store: JobStore,
        owner: str,
        *,
        stale_after: float,
        keep_finished: int,
        keep_seconds: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.store, self.owner, self.stale_after, self.metrics = store, owner, stale_after, metrics
        self.keep_finished, self.keep_seconds = keep_finished, keep_seconds

    def recover(self) -> None:
        """Mark the unfinished jobs of servers that stopped as failed (all of them for a single writer)."""
        for record in self.store.unfinished():
            job = Job.from_record(record)
            if not job.final and (self.store.single_writer or age(job.updated) > self.stale_after):
                self.declare_failed(job)
        self.prune(None)

    def checked(self, job: Job) -> Job:
        """`job`, or failed if its server stopped heartbeating it (unless its heartbeat lands first)."""
        if not job.final and job.owner != self.owner and age(job.updated) > self.stale_after:
            return self.declare_failed(job)
        return job

    def declare_failed(self, job: Job) -> Job:
        """Another server's job, failed if its record is still the one read; else the record as it is now."""
        done = replace(job, state="failed", updated=now_stamp(), finished=now_stamp(), error=STOPPED)
        stored = self.store.replace(done.to_record(), job.revision)
        if stored is None:
            current = self.store.get(job.tenant, job.job_id)
            return job if current is None else Job.from_record(current)
        self.ended(Job.from_record(stored))
        return Job.from_record(stored)

    def update(self, work: Work, *, save: bool = False, **changes: Any) -> Job:
        """Change this server's job (recorded when `save`); nothing changes once it ended."""
        with work.lock:
            if not work.ended:
                work.job = replace(work.job, **changes)
                if save:
                    self.record(work)
            return work.job

    def end(
        self, work: Work, state: State, *, error: str | None = None, result: dict[str, Any] | None = None
    ) -> Job:
        """End this server's job and record it (or keep the final record another server wrote first); if
        the store is away, the heartbeat records it later."""
        with work.lock:
            if not work.ended:
                work.ended = True
                work.job = replace(work.job, state=state, finished=now_stamp(), error=error, result=result)
                try:
                    self.record(work)
                except ServerError as exc:
                    extra = {"job_id": work.job.job_id, "error": exc.message}
                    log.warning("job outcome not recorded yet", extra=extra)
            return work.job

    def record(self, work: Work) -> None:
        """Write `work.job` by compare-and-set (under `work.lock`). The cancel request comes back with it;
        a final record written first by another server wins: the job ends here too, with that record."""
        for _ in range(3):
            job = replace(work.job, updated=now_stamp())
            stored = self.store.replace(job.to_record(), job.revision)
            if stored is not None:
                work.job = Job.from_record(stored)
                if work.job.final:
                    work.recorded = True
                    self.ended(work.job)
                elif work.job.cancel_requested:
                    work.stop()  # asked through another replica
                return
            current = self.store.get(job.tenant, job.job_id)
            if current is None or current.get("finished") is not None:
                removed = "the job's record was removed"
                gone = replace(job, state="failed", finished=now_stamp(), error=removed)
                work.job = gone if current is None else Job.from_record(current)
                work.ended = work.recorded = True
                work.stop()
                log.warning("training job ended by another server", extra=fields(work.job))
                return
            work.job = replace(work.job, revision=current.get("revision", 0))
        log.warning("job record kept changing; retried on the next heartbeat", extra=fields(work.job))

    def ended(self, job: Job) -> None:
        self.count(job.state)
        extra = fields(job) | ({"error": job.error} if job.error else {})
        log.info("training job " + job.state, extra=extra)
        self.prune(job.tenant)

    def prune(self, tenant: str | None) -> None:
        prune_finished(self.store, tenant, self.keep_finished, self.keep_seconds)

    def wait_final(self, tenant: str, job_id: str, job: Job, timeout: float = 15.0) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.store.get(tenant, job_id)
            if record is not None and record.get("state") in FINAL:
                return Job.from_record(record)
            time.sleep(0.1)
        return job

    def count(self, state: str) -> None:
        if self.metrics is not None:
            self.metrics.jobs.labels(state=state).inc()
