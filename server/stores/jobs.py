"""Where training jobs are recorded: next to the tasks, so every replica (and a restarted server) sees them.

A job record is a small JSON object (server/training/records.py `Job`), addressed by tenant and job id.
Writes are never last-writer-wins:
- `create` inserts a job's first record, at revision 1.
- `replace(record, revision)` is a compare-and-set: it writes only while the stored record is still at
  `revision` and unfinished, and returns the record as stored (revision + 1); None when another write came
  first (the caller reads the record again and decides). A record with a `finished` timestamp is final
  and is never written again.
- `request_cancel` sets the job's cancel request, a flag apart from the record: no `replace` clears it
  (a record's `cancel_requested` reads as the flag or the record's own value) and it changes no revision.
Retention: `prune` deletes finished records beyond the `keep` most recently finished of each tenant, and
those finished before a cut-off. `unfinished` reads only the records of jobs that have not ended.

- Directory: `<task store>/.jobs/<tenant>/<job_id>.json`, replaced atomically (temp file, fsync, rename),
  and an empty `.jobs/.unfinished/<tenant>.<job_id>` for every unfinished job (created before its first
  record, removed after its final one). Writes are serialised by a lock: one server owns the directory
  (`single_writer`). A finished record's modification time is when it finished. Records of the flat layout
  (`.jobs/<job_id>.json`) are moved into their tenant's directory when the store opens. The task store
  skips dot directories, so jobs and tasks never mix.
- PostgreSQL: table `recast_jobs (job_id text PRIMARY KEY, tenant text, created timestamptz, record jsonb,
  revision bigint, cancel_requested boolean, finished timestamptz)` in the task store's database, shared by
  every replica; the last three columns are added to a table of the earlier layout when the store opens.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path
from typing import Any

from recast_core.files import write_atomic
from server.errors import StoreError
from server.ids import TENANT

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"[0-9a-f]{32}")
Record = dict[str, Any]
Records = list[Record]  # (`list` is also a method name in the classes below)


def finished(record: Record) -> bool:
    return record.get("finished") is not None


class JobStore(ABC):
    single_writer: bool  # True: no other server writes here, so unfinished jobs at start-up are orphans

    @abstractmethod
    def create(self, record: Record) -> Record:
        """Insert the first record of `record["job_id"]`; returns it as stored (revision 1)."""

    @abstractmethod
    def replace(self, record: Record, revision: int) -> Record | None:
        """Compare-and-set: the record as stored; None unless the stored one is unfinished at `revision`."""

    @abstractmethod
    def request_cancel(self, tenant: str, job_id: str) -> Record | None:
        """Set the job's cancel request (nothing changes once it finished); the record, or None."""

    @abstractmethod
    def get(self, tenant: str, job_id: str) -> Record | None: ...

    @abstractmethod
    def list(self, tenant: str | None, limit: int) -> Records:
        """The newest `limit` records (of `tenant`, or of every tenant for None), newest first."""

    @abstractmethod
    def unfinished(self) -> Records:
        """Every record that is not final (of every tenant)."""

    @abstractmethod
    def prune(self, tenant: str | None, keep: int, finished_before: datetime) -> int:
        """Delete finished records (of `tenant`, or every tenant) beyond each tenant's `keep` most recently
        finished, and those finished before `finished_before`; returns how many were deleted."""

    def close(self) -> None:  # noqa: B027
        """Release connections."""


class DirectoryJobStore(JobStore):
    single_writer = True

    def __init__(self, root: Path) -> None:
        self.root, self.markers = root, root / ".unfinished"
        self._lock = threading.Lock()
        try:
            self.markers.mkdir(parents=True, exist_ok=True)
            for stale in [*root.glob(".*.tmp"), *root.glob("*/.*.tmp")]:  # writes cut short by a crash
                stale.unlink(missing_ok=True)
            self._migrate()
        except OSError as exc:
            raise StoreError(f"cannot use job directory {root}: {exc}") from None

    def _path(self, tenant: str, job_id: str) -> Path | None:
        if not (TENANT.fullmatch(tenant) and JOB_ID.fullmatch(job_id)):
            return None
        return self.root / tenant / f"{job_id}.json"

    def _marker(self, tenant: str, job_id: str) -> Path:
        return self.markers / f"{tenant}.{job_id}"

    def _read(self, path: Path) -> Record | None:
        try:
            record: Record = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read job record {path}: {exc}") from None
        return record

    def _write(self, path: Path, record: Record) -> None:
        try:
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, json.dumps(record).encode())
        except OSError as exc:
            raise StoreError(f"cannot write job record {path}: {exc}") from None

    def create(self, record: Record) -> Record:
        tenant, job_id = str(record["tenant"]), str(record["job_id"])
        path = self._path(tenant, job_id)
        if path is None:
            raise ValueError(f"bad tenant or job id {tenant!r} {job_id!r}")
        stored = record | {"revision": 1}
        with self._lock:
            if not finished(stored):
                self._marker(tenant, job_id).touch()
            self._write(path, stored)
        return stored

    def replace(self, record: Record, revision: int) -> Record | None:
        tenant, job_id = str(record["tenant"]), str(record["job_id"])
        path = self._path(tenant, job_id)
        if path is None:
            return None
        with self._lock:
            current = self._read(path)
            if current is None or finished(current) or current.get("revision", 0) != revision:
                return None
            asked = bool(current.get("cancel_requested") or record.get("cancel_requested"))
            stored = record | {"revision": revision + 1, "cancel_requested": asked}
            self._write(path, stored)
            if finished(stored):
                self._marker(tenant, job_id).unlink(missing_ok=True)
        return stored

    def request_cancel(self, tenant: str, job_id: str) -> Record | None:
        path = self._path(tenant, job_id)
        if path is None:
            return None
        with self._lock:
            current = self._read(path)
            if current is None or finished(current) or current.get("cancel_requested"):
                return current
            stored = current | {"cancel_requested": True}
            self._write(path, stored)
        return stored

    def get(self, tenant: str, job_id: str) -> Record | None:
        path = self._path(tenant, job_id)
        return None if path is None else self._read(path)

    def _tenants(self, tenant: str | None) -> list[Path]:
        if tenant is not None:
            return [self.root / tenant] if TENANT.fullmatch(tenant) else []
        try:
            return [p for p in self.root.iterdir() if p.is_dir() and TENANT.fullmatch(p.name)]
        except OSError as exc:
            raise StoreError(f"cannot list jobs in {self.root}: {exc}") from None

    def list(self, tenant: str | None, limit: int) -> Records:
        records = []
        for directory in self._tenants(tenant):
            try:
                paths = list(directory.glob("*.json"))
            except OSError as exc:
                raise StoreError(f"cannot list jobs in {directory}: {exc}") from None
            records += [r for r in map(self._read, paths) if r is not None]
        records.sort(key=lambda r: str(r.get("created", "")), reverse=True)
        return records[:limit]

    def unfinished(self) -> Records:
        records = []
        try:
            markers = list(self.markers.iterdir())
        except OSError as exc:
            raise StoreError(f"cannot list jobs in {self.markers}: {exc}") from None
        for marker in markers:
            tenant, _, job_id = marker.name.partition(".")
            record = self.get(tenant, job_id)
            if record is None or finished(record):  # a crash between a record and its marker
                marker.unlink(missing_ok=True)
            else:
                records.append(record)
        return records

    def prune(self, tenant: str | None, keep: int, finished_before: datetime) -> int:
        cutoff, deleted = finished_before.timestamp(), 0
        with self._lock:
            try:
                running = {m.name for m in self.markers.iterdir()}
                for directory in self._tenants(tenant):
                    done = [
                        (path.stat().st_mtime, path)
                        for path in directory.glob("*.json")
                        if f"{directory.name}.{path.stem}" not in running
                    ]
                    done.sort(reverse=True)
                    for i, (mtime, path) in enumerate(done):
                        if i >= keep or mtime < cutoff:
                            path.unlink(missing_ok=True)
                            deleted += 1
            except OSError as exc:
                raise StoreError(f"cannot prune jobs in {self.root}: {exc}") from None
        return deleted

    def _migrate(self) -> None:
        """Move records of the flat layout (`<root>/<job_id>.json`) into their tenant's directory."""
        for path in self.root.glob("*.json"):
            record = self._read(path)
            tenant = str((record or {}).get("tenant", ""))
            target = self._path(tenant, path.stem)
            if record is None or target is None:
                log.warning("job record left where it is: no tenant or a bad name", extra={"path": str(path)})
                continue
            if not finished(record):
                self._marker(tenant, path.stem).touch()
            self._write(target, record)
            if finished(record):  # its modification time is when it finished (retention counts from it)
                when = datetime.fromisoformat(str(record["finished"]).replace("Z", "+00:00")).timestamp()
                os.utime(target, (when, when))
            path.unlink()


_CREATE = """
CREATE TABLE IF NOT EXISTS {t} (
    job_id  text PRIMARY KEY,
    tenant  text NOT NULL,
    created timestamptz NOT NULL,
    record  jsonb NOT NULL
);
ALTER TABLE {t} ADD COLUMN IF NOT EXISTS revision bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cancel_requested boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS finished timestamptz;
CREATE INDEX IF NOT EXISTS {t}_tenant_created ON {t} (tenant, created DESC);
CREATE INDEX IF NOT EXISTS {t}_unfinished ON {t} (created) WHERE finished IS NULL;
CREATE INDEX IF NOT EXISTS {t}_tenant_finished ON {t} (tenant, finished DESC) WHERE finished IS NOT NULL;
UPDATE {t} SET finished = (record->>'finished')::timestamptz
    WHERE finished IS NULL AND record->>'finished' IS NOT NULL;
"""
_COLUMNS = "record, revision, cancel_requested"


class PostgresJobStore(JobStore):
    """One short connection per operation: jobs change a few times a second at most."""

    single_writer = False

    def __init__(self, dsn: str, safe_dsn: str, table: str = "recast_jobs") -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", table):
            raise ValueError(f"bad table name {table!r}")
        self._dsn, self.safe_dsn, self.table = dsn, safe_dsn, table
        with self._connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('recast_jobs_create'))")
            conn.execute(_CREATE.format(t=table))

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
                cursor = conn.execute(query.format(t=self.table), params)
                return list(cursor.fetchall()) if cursor.description else []
        except psycopg.Error as exc:
            raise StoreError(f"job store {self.safe_dsn}: {type(exc).__name__}", retry_after=1) from None

    def create(self, record: Record) -> Record:
        stored = record | {"revision": 1}
        self._run(
            "INSERT INTO {t} (job_id, tenant, created, record, revision, cancel_requested, finished) "
            "VALUES (%s, %s, %s, %s, 1, false, %s)",
            (
                record["job_id"],
                record["tenant"],
                record["created"],
                json.dumps(stored),
                record.get("finished"),
            ),
        )
        return stored

    def replace(self, record: Record, revision: int) -> Record | None:
        stored = record | {"revision": revision + 1}
        rows = self._run(
            "UPDATE {t} SET record = %s, revision = revision + 1, finished = %s "
            "WHERE job_id = %s AND tenant = %s AND revision = %s AND finished IS NULL "
            f"RETURNING {_COLUMNS}",
            (json.dumps(stored), record.get("finished"), record["job_id"], record["tenant"], revision),
        )
        return _record(rows[0]) if rows else None

    def request_cancel(self, tenant: str, job_id: str) -> Record | None:
        rows = self._run(
            "UPDATE {t} SET cancel_requested = true WHERE job_id = %s AND tenant = %s AND finished IS NULL "
            f"RETURNING {_COLUMNS}",
            (job_id, tenant),
        )
        return _record(rows[0]) if rows else self.get(tenant, job_id)

    def get(self, tenant: str, job_id: str) -> Record | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        rows = self._run(f"SELECT {_COLUMNS} FROM {{t}} WHERE job_id = %s AND tenant = %s", (job_id, tenant))
        return _record(rows[0]) if rows else None

    def list(self, tenant: str | None, limit: int) -> Records:
        if tenant is None:
            rows = self._run(f"SELECT {_COLUMNS} FROM {{t}} ORDER BY created DESC LIMIT %s", (limit,))
        else:
            rows = self._run(
                f"SELECT {_COLUMNS} FROM {{t}} WHERE tenant = %s ORDER BY created DESC LIMIT %s",
                (tenant, limit),
            )
        return [_record(row) for row in rows]

    def unfinished(self) -> Records:
        return [_record(r) for r in self._run(f"SELECT {_COLUMNS} FROM {{t}} WHERE finished IS NULL", ())]

    def prune(self, tenant: str | None, keep: int, finished_before: datetime) -> int:
        only = "AND tenant = %s" if tenant is not None else ""
        rows = self._run(
            "DELETE FROM {t} WHERE job_id IN (SELECT job_id FROM ("
            "SELECT job_id, finished, row_number() OVER (PARTITION BY tenant ORDER BY finished DESC) AS n "
            f"FROM {{t}} WHERE finished IS NOT NULL {only}) AS done WHERE n > %s OR finished < %s) "
            "RETURNING 1",
            (*((tenant,) if tenant is not None else ()), keep, finished_before),
        )
        return len(rows)


def _record(row: tuple[Any, ...]) -> Record:
    value, revision, cancel = row
    record = dict(value) if isinstance(value, dict) else dict(json.loads(value))
    return record | {"revision": revision, "cancel_requested": bool(cancel or record.get("cancel_requested"))}


def open_job_store(location: str, safe_location: str | None = None) -> JobStore:
    """The job store beside the task store at `location` (a directory or a postgresql:// DSN)."""
    if location.startswith(("postgresql://", "postgres://")):
        return PostgresJobStore(location, safe_location or "postgresql://***")
    return DirectoryJobStore(Path(location) / ".jobs")
