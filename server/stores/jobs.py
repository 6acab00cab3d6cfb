"""Where training jobs are recorded: next to the tasks, so every replica (and a restarted server) sees them.

A job record is a small JSON object (server/jobs.py `Job`); stores keep the newest record per job id.
- Directory: `<task store>/.jobs/<job_id>.json`, replaced atomically (temp file, fsync, rename). The task
  store skips dot directories, so the two never mix. One server owns the directory (`single_writer`).
- PostgreSQL: table `recast_jobs (job_id text PRIMARY KEY, tenant text, created timestamptz, record jsonb)`
  in the task store's database, shared by every replica.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from recast_core.files import write_atomic
from server.errors import StoreError

JOB_ID = re.compile(r"[0-9a-f]{32}")
Record = dict[str, Any]


class JobStore(ABC):
    single_writer: bool  # True: no other server writes here, so unfinished jobs at start-up are orphans

    @abstractmethod
    def put(self, record: Record) -> None:
        """Insert or replace the record of `record["job_id"]`."""

    @abstractmethod
    def get(self, job_id: str) -> Record | None: ...

    @abstractmethod
    def list(self, tenant: str | None, limit: int) -> list[Record]:
        """The newest `limit` records (of `tenant`, or of every tenant for None), newest first."""

    def close(self) -> None:  # noqa: B027
        """Release connections."""


class DirectoryJobStore(JobStore):
    single_writer = True

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".*.tmp"):  # a write cut short by a crash
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use job directory {root}: {exc}") from None

    def put(self, record: Record) -> None:
        job_id = str(record["job_id"])
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        try:
            write_atomic(self.root / f"{job_id}.json", json.dumps(record).encode())
        except OSError as exc:
            raise StoreError(f"cannot write job {job_id} to {self.root}: {exc}") from None

    def get(self, job_id: str) -> Record | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            record: Record = json.loads((self.root / f"{job_id}.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read job {job_id} from {self.root}: {exc}") from None
        return record

    def list(self, tenant: str | None, limit: int) -> list[Record]:
        records = []
        try:
            paths = list(self.root.glob("*.json"))
        except OSError as exc:
            raise StoreError(f"cannot list jobs in {self.root}: {exc}") from None
        for path in paths:
            record = self.get(path.stem)
            if record is not None and (tenant is None or record.get("tenant") == tenant):
                records.append(record)
        records.sort(key=lambda r: str(r.get("created", "")), reverse=True)
        return records[:limit]


_CREATE = """
CREATE TABLE IF NOT EXISTS recast_jobs (
    job_id  text PRIMARY KEY,
    tenant  text NOT NULL,
    created timestamptz NOT NULL,
    record  jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS recast_jobs_tenant_created ON recast_jobs (tenant, created DESC);
"""


class PostgresJobStore(JobStore):
    """One short connection per operation: jobs change a few times a second at most."""

    single_writer = False

    def __init__(self, dsn: str, safe_dsn: str) -> None:
        self._dsn, self.safe_dsn = dsn, safe_dsn
        with self._connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('recast_jobs_create'))")
            conn.execute(_CREATE)

    def _connect(self) -> Any:
        import psycopg

        try:
            return psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
        except psycopg.Error as exc:
            message = f"job store {self.safe_dsn}: cannot connect: {type(exc).__name__}"
            raise StoreError(message, retry_after=1) from None

    def _run(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        import psycopg

        try:
            with self._connect() as conn:
                cursor = conn.execute(query, params)
                return list(cursor.fetchall()) if cursor.description else []
        except psycopg.Error as exc:
            raise StoreError(f"job store {self.safe_dsn}: {type(exc).__name__}", retry_after=1) from None

    def put(self, record: Record) -> None:
        self._run(
            "INSERT INTO recast_jobs (job_id, tenant, created, record) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (job_id) DO UPDATE SET record = EXCLUDED.record",
            (record["job_id"], record["tenant"], record["created"], json.dumps(record)),
        )

    def get(self, job_id: str) -> Record | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        rows = self._run("SELECT record FROM recast_jobs WHERE job_id = %s", (job_id,))
        return _record(rows[0][0]) if rows else None

    def list(self, tenant: str | None, limit: int) -> list[Record]:
        if tenant is None:
            rows = self._run("SELECT record FROM recast_jobs ORDER BY created DESC LIMIT %s", (limit,))
        else:
            rows = self._run(
                "SELECT record FROM recast_jobs WHERE tenant = %s ORDER BY created DESC LIMIT %s",
                (tenant, limit),
            )
        return [_record(row[0]) for row in rows]


def _record(value: Any) -> Record:
    return dict(value) if isinstance(value, dict) else dict(json.loads(value))


def open_job_store(location: str, safe_location: str | None = None) -> JobStore:
    """The job store beside the task store at `location` (a directory or a postgresql:// DSN)."""
    if location.startswith(("postgresql://", "postgres://")):
        return PostgresJobStore(location, safe_location or "postgresql://***")
    return DirectoryJobStore(Path(location) / ".jobs")
