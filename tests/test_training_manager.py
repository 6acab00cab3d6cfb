"""JobManager on real job stores: replicas sharing one PostgreSQL job store, cancels racing worker start-up,
heartbeats that survive errors, fair sharing of the queue between tenants, retention of finished jobs.

The worker processes are real (spawned like training workers) but run stand-ins
(tests/test_training_workers.py) instead of a training, so a job runs exactly as long as a test needs;
everything else is the real code path.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_training_workers import hold, quiet

from recast_core.data import LabelledTexts
from server.errors import Overloaded, StoreError
from server.stores.directory import DirectoryStore
from server.stores.jobs import DirectoryJobStore, JobStore, PostgresJobStore
from server.tasks.catalog import TaskCatalog
from server.tasks.registry import TaskRegistry
from server.training.manager import JobManager
from server.training.records import Job

DATA = LabelledTexts(("a b", "c d", "e f", "g h"), ("x", "x", "y", "y"))


# helpers


def replica(store: Any, tmp_path: Path, worker: Callable[..., None] = hold, **options: Any) -> JobManager:
    """One server's JobManager (with a catalog of its own: nothing is published in these tests)."""
    tasks = DirectoryStore(tmp_path / f"tasks-{uuid.uuid4().hex[:8]}")
    catalog = TaskCatalog(tasks, TaskRegistry(None))  # type: ignore[arg-type]
    return JobManager(store, catalog, tmp_path / "bank", "f" * 64, worker=worker, **options)


def wait_for(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.02)


def workers(job: Job) -> list[mp.process.BaseProcess]:
    """The live worker processes of `job` (in this test process)."""
    return [p for p in mp.active_children() if p.name == f"train-{job.job_id[:8]}"]


def running(manager: JobManager, tenant: str, job: Job) -> Job | None:
    """The job once its worker runs and its record says so."""
    current = manager.get(tenant, job.job_id)
    return current if current.state == "running" and workers(job) else None


@pytest.fixture
def pg_jobs(postgres_dsn: str) -> Iterator[Callable[[], PostgresJobStore]]:
    """Job stores on one fresh table: one per replica of a deployment."""
    table = f"jobs_{uuid.uuid4().hex[:12]}"
    stores: list[PostgresJobStore] = []

    def make() -> PostgresJobStore:
        stores.append(PostgresJobStore(postgres_dsn, "postgresql://test", table=table))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


class Partitioned:
    """A job store this replica can be cut off from (every call fails with StoreError while `down`), and
    whose writes can be held (`before_write` runs first)."""

    WRITES = frozenset({"put", "create", "replace", "request_cancel", "prune"})

    def __init__(self, inner: JobStore) -> None:
        self.inner, self.down = inner, False
        self.before_write: Callable[[], None] | None = None

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreError("job store unreachable (test partition)")
            if name in self.WRITES and self.before_write is not None:
                hook, self.before_write = self.before_write, None
                hook()
            return attribute(*args, **kwargs)

        return call


# item 1: cancel through another replica


def test_a_cancel_through_another_replica_ends_the_job(
    pg_jobs: Callable[[], PostgresJobStore], tmp_path: Path
) -> None:
    """Replica A runs three jobs (saving progress every second, heartbeating every 2 s, the defaults);
    replica B cancels them 0, 0.67 and 1.33 s apart, so that some cancels land right after one of A's
    heartbeats and right before a progress save: every job ends cancelled within seconds."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    a = replica(pg_jobs(), tmp_path, max_jobs=3)
    b = replica(pg_jobs(), tmp_path)
    try:
        jobs = [a.submit(tenant, f"task-{i}", DATA, {}) for i in range(3)]
        for job in jobs:
            wait_for(lambda job=job: running(a, tenant, job), 60, "the job runs")
            wait_for(lambda job=job: a.get(tenant, job.job_id).progress > 0, 30, "progress is recorded")
        asked = []
        for job in jobs:
            asked.append(time.monotonic())
            b.cancel(tenant, job.job_id)
            time.sleep(0.67)
        for job, start in zip(jobs, asked, strict=True):
            ended = wait_for(
                lambda job=job: (j := b.get(tenant, job.job_id)).final and j,
                start + 5 - time.monotonic(),
                "the job ends within 5 s of its cancel",
            )
            assert (ended.state, ended.error) == ("cancelled", "cancelled while it ran")
            wait_for(lambda job=job: not workers(job), 5, "the worker process ends")
    finally:
        a.close()
        b.close()


def test_a_cancel_through_another_replica_of_a_queued_job(
    pg_jobs: Callable[[], PostgresJobStore], tmp_path: Path
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    a = replica(pg_jobs(), tmp_path, heartbeat=0.2)
    b = replica(pg_jobs(), tmp_path)
    try:
        first = a.submit(tenant, "first", DATA, {})
        waiting = a.submit(tenant, "second", DATA, {})
        wait_for(lambda: running(a, tenant, first), 60, "the first job runs")
        b.cancel(tenant, waiting.job_id)
        ended = wait_for(lambda: (j := b.get(tenant, waiting.job_id)).final and j, 5, "the job ends")
        assert (ended.state, ended.error) == ("cancelled", "cancelled before it started")
        assert a.queued == 0 and a.get(tenant, first.job_id).state == "running"
    finally:
        a.close()
        b.close()


# item 2: a cancel racing the worker's start; heartbeats that survive any error


class Gate(str):
    """A text whose pickling (inside Process.start, sending the job's data to the worker) waits for
    `release`: the start of the worker process is held open for as long as the test needs."""

    entered = threading.Event()
    release = threading.Event()

    def __reduce__(self) -> tuple[Any, ...]:
        Gate.entered.set()
        Gate.release.wait(10)
        return (str, (str(self),))


def test_a_cancel_while_the_worker_process_starts_ends_the_job(tmp_path: Path) -> None:
    store = DirectoryJobStore(tmp_path / "tasks" / ".jobs")
    manager = replica(store, tmp_path)
    Gate.entered.clear()
    Gate.release.clear()
    data = LabelledTexts((Gate("a b"), "c d", "e f", "g h"), DATA.labels)
    try:
        job = manager.submit("default", "t", data, {})
        assert Gate.entered.wait(30), "the worker process never started"
        with ThreadPoolExecutor(1) as pool:
            cancel = pool.submit(manager.cancel, "default", job.job_id)
            time.sleep(0.3)  # the cancel arrives while Process.start() runs
            Gate.release.set()
            ended = cancel.result(timeout=20)
        assert (ended.state, ended.error) == ("cancelled", "cancelled while it ran")
        wait_for(lambda: not workers(job), 5, "the worker process ends")
    finally:
        Gate.release.set()
        manager.close()


class Glitch:
    """A job store whose first call from the heartbeat thread raises an unexpected (non-server) error."""

    def __init__(self, inner: JobStore) -> None:
        self.inner, self.raised = inner, threading.Event()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name == "job-heartbeat" and not self.raised.is_set():
                self.raised.set()
                raise RuntimeError("an unexpected error in the job store")
            return attribute(*args, **kwargs)

        return call


def test_the_heartbeat_survives_an_unexpected_error(tmp_path: Path) -> None:
    store = Glitch(DirectoryJobStore(tmp_path / "tasks" / ".jobs"))
    manager = replica(store, tmp_path, worker=quiet, heartbeat=0.2)
    try:
        job = manager.submit("default", "t", DATA, {})
        assert store.raised.wait(10)
        beat = manager.get("default", job.job_id).updated
        wait_for(lambda: manager.get("default", job.job_id).updated > beat, 3, "heartbeats go on")
    finally:
        manager.close()


# item 3: one final state for every replica


def test_a_job_declared_failed_by_another_replica_stays_failed_and_its_owner_stops_it(
    pg_jobs: Callable[[], PostgresJobStore], tmp_path: Path
) -> None:
    """A loses the store long enough for B to declare its job failed; when A is back, its heartbeat
    finds the job failed: it stops the worker and never writes the job again."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    store_a = Partitioned(pg_jobs())
    a = replica(store_a, tmp_path, worker=quiet, heartbeat=0.2)
    b = replica(pg_jobs(), tmp_path, stale_after=1.0)
    try:
        job = a.submit(tenant, "t", DATA, {})
        wait_for(lambda: running(a, tenant, job), 60, "the job runs")
        store_a.down = True
        time.sleep(1.5)  # no heartbeat for longer than B's stale_after
        declared = b.get(tenant, job.job_id)
        assert declared.state == "failed" and "stopped" in str(declared.error)
        store_a.down = False
        wait_for(lambda: not workers(job), 10, "A stops the worker")
        time.sleep(1.0)  # several of A's heartbeats
        assert b.get(tenant, job.job_id) == declared  # never flipped back
        assert a.get(tenant, job.job_id) == declared and a.queued == 0
    finally:
        store_a.down = False
        a.close()
        b.close()


def test_a_heartbeat_that_lands_first_keeps_the_job_running(
    pg_jobs: Callable[[], PostgresJobStore], tmp_path: Path
) -> None:
    """B reads a stale record, but A's heartbeat is written before B's write: B's write loses, and B
    answers with the job A is still running."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    store_a = Partitioned(pg_jobs())
    store_b = Partitioned(pg_jobs())
    a = replica(store_a, tmp_path, worker=quiet, heartbeat=0.2)
    b = replica(store_b, tmp_path, stale_after=1.0)
    try:
        job = a.submit(tenant, "t", DATA, {})
        wait_for(lambda: running(a, tenant, job), 60, "the job runs")
        store_a.down = True
        time.sleep(1.5)
        stale = a.store.inner  # type: ignore[attr-defined]
        seen = Job.from_record(_read(stale, tenant, job.job_id)).updated

        def heartbeat_first() -> None:
            store_a.down = False
            wait_for(lambda: Job.from_record(_read(stale, tenant, job.job_id)).updated > seen, 5, "A beats")

        store_b.before_write = heartbeat_first
        answer = b.get(tenant, job.job_id)
        assert answer.state == "running" and answer.updated > seen
        time.sleep(0.5)
        assert b.get(tenant, job.job_id).state == "running" and workers(job)
        assert b.cancel(tenant, job.job_id).state == "cancelled"
    finally:
        store_a.down = False
        a.close()
        b.close()


def _read(store: JobStore, tenant: str, job_id: str) -> dict[str, Any]:
    try:
        record = store.get(tenant, job_id)  # type: ignore[call-arg]
    except TypeError:
        record = store.get(job_id)  # type: ignore[call-arg]
    assert record is not None
    return record


# item 4: fair sharing of the queue between tenants


def test_a_tenant_holds_at_most_half_the_queue_and_tenants_start_in_turn(tmp_path: Path) -> None:
    manager = replica(DirectoryJobStore(tmp_path / "tasks" / ".jobs"), tmp_path, max_queued=4)
    try:
        a1 = manager.submit("team-a", "a1", DATA, {})
        wait_for(lambda: running(manager, "team-a", a1), 60, "a1 runs")
        a2 = manager.submit("team-a", "a2", DATA, {})
        a3 = manager.submit("team-a", "a3", DATA, {})
        with pytest.raises(Overloaded):
            manager.submit("team-a", "a4", DATA, {})  # team-a holds its share (2 of 4)
        b1 = manager.submit("team-b", "b1", DATA, {})  # team-b can still queue
        assert manager.queued == 3
        manager.cancel("team-a", a1.job_id)
        wait_for(lambda: running(manager, "team-b", b1), 60, "b1 runs next")
        assert [manager.get("team-a", j.job_id).state for j in (a2, a3)] == ["queued", "queued"]
        manager.cancel("team-b", b1.job_id)
        wait_for(lambda: running(manager, "team-a", a2), 60, "then a2")
    finally:
        manager.close()


# item 5: retention, per-tenant listing, start-up recovery of unfinished jobs only


def _finish_many(manager: JobManager, tenant: str, count: int) -> list[Job]:
    """`count` jobs of `tenant` that end (cancelled while queued) behind a job that keeps running."""
    ended = []
    for i in range(count):
        job = manager.submit(tenant, f"t{i}", DATA, {})
        ended.append(manager.cancel(tenant, job.job_id))
    return ended


def test_finished_jobs_beyond_the_retention_are_pruned(tmp_path: Path) -> None:
    store = DirectoryJobStore(tmp_path / "tasks" / ".jobs")
    manager = replica(store, tmp_path)
    try:
        busy = manager.submit("team-a", "busy", DATA, {})
        wait_for(lambda: running(manager, "team-a", busy), 60, "the job runs")
        ended = _finish_many(manager, "team-a", 210)
        _finish_many(manager, "team-b", 3)
        kept = manager.list("team-a", 10_000)
        assert len(kept) == 201  # the 200 newest finished jobs and the running one
        assert {j.job_id for j in kept} == {busy.job_id} | {j.job_id for j in ended[-200:]}
        assert len(manager.list("team-b", 10_000)) == 3
    finally:
        manager.close()


def test_finished_jobs_older_than_the_retention_are_pruned(
    pg_jobs: Callable[[], PostgresJobStore], tmp_path: Path
) -> None:
    for store in (DirectoryJobStore(tmp_path / "tasks" / ".jobs"), pg_jobs()):
        manager = replica(store, tmp_path, keep_finished=3, keep_seconds=1.0)
        try:
            busy = manager.submit("team-a", "busy", DATA, {})
            wait_for(lambda manager=manager, busy=busy: running(manager, "team-a", busy), 60, "it runs")
            _finish_many(manager, "team-a", 5)
            assert len(manager.list("team-a", 100)) == 4  # 3 finished (keep_finished) and the running one
            time.sleep(1.2)
            newest = _finish_many(manager, "team-a", 1)
            assert [j.job_id for j in manager.list("team-a", 100)] == [newest[0].job_id, busy.job_id]
        finally:
            manager.close()


def test_a_tenant_listing_reads_only_its_own_records(tmp_path: Path) -> None:
    """Every finished record of another tenant is made unreadable: listing this tenant still works."""
    root = tmp_path / "tasks" / ".jobs"
    manager = replica(DirectoryJobStore(root), tmp_path)
    try:
        busy = manager.submit("team-a", "busy", DATA, {})
        wait_for(lambda: running(manager, "team-a", busy), 60, "the job runs")
        _finish_many(manager, "team-a", 20)
        mine = _finish_many(manager, "team-b", 2)
        corrupted = 0
        for path in root.rglob("*.json"):
            record = json.loads(path.read_text())
            if record["tenant"] == "team-a" and record["state"] == "cancelled":
                path.write_text("{not json")
                corrupted += 1
        assert corrupted == 20
        assert [j.job_id for j in manager.list("team-b", 50)] == [j.job_id for j in reversed(mine)]
    finally:
        manager.close()


def test_start_up_recovery_reads_only_unfinished_jobs(postgres_dsn: str, tmp_path: Path) -> None:
    """A table of the previous layout with 10,000 finished jobs newer than an orphaned running one: the
    orphan is still found and failed."""
    table = f"jobs_{uuid.uuid4().hex[:12]}"
    old = "2026-01-01T00:00:00.000Z"
    orphan = Job("a" * 32, "team-a", "t", "running", old, old, "gone", 4, ["x", "y"], {})
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:  # the table as the previous layout left it
        conn.execute(
            f"CREATE TABLE {table} (job_id text PRIMARY KEY, tenant text NOT NULL, "
            "created timestamptz NOT NULL, record jsonb NOT NULL)"
        )
        conn.execute(
            f"INSERT INTO {table} (job_id, tenant, created, record) VALUES (%s, %s, %s, %s)",
            (orphan.job_id, orphan.tenant, orphan.created, json.dumps(orphan.to_record())),
        )
        conn.execute(
            f"INSERT INTO {table} (job_id, tenant, created, record) "
            "SELECT id, 'team-b', now(), jsonb_build_object('job_id', id, 'tenant', 'team-b', "
            "'task_id', 't', 'state', 'cancelled', 'created', to_char(now() AT TIME ZONE 'UTC', "
            "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), 'updated', '2026-01-02T00:00:00.000Z', 'owner', 'gone', "
            "'examples', 4, 'labels', '[\"x\", \"y\"]'::jsonb, 'options', '{}'::jsonb, "
            "'finished', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')) "
            "FROM (SELECT md5(i::text) AS id FROM generate_series(1, 10000) AS i) AS ids"
        )
    store = PostgresJobStore(postgres_dsn, "postgresql://test", table=table)
    manager = replica(store, tmp_path)
    try:
        recovered = _read(store, "team-a", orphan.job_id)
        assert recovered["state"] == "failed" and "stopped" in recovered["error"]
        assert len(manager.list("team-b", 10_000)) == 200  # and the retention applies to old records too
    finally:
        manager.close()
        store.close()
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}")


def test_job_records_of_the_flat_directory_layout_are_moved_into_place(tmp_path: Path) -> None:
    """Records written before tenant directories (`.jobs/<job_id>.json`) are read, recovered and pruned."""
    root = tmp_path / "tasks" / ".jobs"
    root.mkdir(parents=True)
    old = "2026-01-01T00:00:00.000Z"
    running = Job("a" * 32, "team-a", "t", "running", old, old, "gone", 4, ["x", "y"], {})
    done = replace(running, job_id="b" * 32, state="succeeded", finished=old)
    for job in (running, done):
        (root / f"{job.job_id}.json").write_text(json.dumps(job.to_record()))
    store = DirectoryJobStore(root)
    assert not list(root.glob("*.json"))  # moved
    assert store.get("team-a", done.job_id) == done.to_record()
    manager = replica(store, tmp_path, keep_seconds=10 * 365 * 86400.0)
    try:
        assert manager.get("team-a", running.job_id).state == "failed"  # recovered at start-up
        assert {j.job_id for j in manager.list("team-a")} == {running.job_id, done.job_id}
    finally:
        manager.close()
    pruned = replica(DirectoryJobStore(root), tmp_path)  # finished in January 2026: past the 7 days
    try:
        assert [j.job_id for j in pruned.list("team-a")] == [running.job_id]
    finally:
        pruned.close()
