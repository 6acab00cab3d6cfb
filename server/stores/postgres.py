"""The replicated store: every replica reads and writes one PostgreSQL table and hears the others' changes.

Schema (created on first use; `CREATE TABLE IF NOT EXISTS` under a transaction-scoped advisory lock, so
replicas starting together do not race):

    CREATE TABLE recast_tasks (
        task_id text PRIMARY KEY,
        version bigint NOT NULL,             -- assigned here, +1 per put or delete, never reused
        data    bytea,                       -- the artifact bytes; NULL is a tombstone
        updated timestamptz NOT NULL DEFAULT now(),
        ...                                  -- the summary columns (server/stores/pg_index.py)
    )

Tables of earlier versions get the summary columns added (`ADD COLUMN IF NOT EXISTS`); their rows are
summarized from their data by the first `read_index`, which otherwise reads the summary columns only.
Rows whose task_id is not a valid stored id (written by hand or by something else) are skipped by scans
and by the index, with a warning: one such row must not stop start-up or make resyncs fail forever.

One row per task holds its newest version: a put upserts the row with `version = version + 1` and a delete
sets `data = NULL` the same way, so a row, once created, is never removed and versions continue after a
delete. The single UPDATE/upsert locks the row, so concurrent writers (threads or replicas) get distinct
versions and an `if_match` is checked against the version the write replaces.

Notifications: in the transaction of every successful put or delete, `pg_notify(<channel>, payload)` with
the JSON payload `{"task_id": str, "version": int, "deleted": bool}`; PostgreSQL delivers it on commit. A
watcher LISTENs on its own connection and hands each payload to `on_change`; after a lost connection it
reconnects (backoff 0.1 s doubling to 2 s), LISTENs again and calls `on_resync`, since changes made while
it was away were not delivered; a resync that fails is retried with backoff (0.5 s doubling to 30 s).
A store hears its own changes too; the catalog ignores versions it has.
`healthy` (readiness) is True while the watcher is listening and has caught up (its last resync worked);
False before `watch`, from a lost connection until the resync after reconnecting, and after `close`.

Connections are opened on demand and a few idle ones are kept for reuse. A reused connection found broken
when its transaction begins (the server restarted) is replaced once, transparently; any other failure is a
StoreError whose message never contains the password.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from tqdm import tqdm

from server.errors import StoreError, UnknownTask, VersionConflict
from server.ids import check_stored_id, split_stored_id
from server.stores import pg_index, pg_notify
from server.stores.base import Change, StoredTask, TaskStore
from server.stores.index import IndexBuilder, IndexRow, Summary, TaskIndex
from server.stores.pg_dsn import passwords, redact_dsn

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[Any, ...]]

MAX_IDLE = 4  # idle connections kept for reuse
SCAN_BATCH = 256  # rows fetched per round trip by scan
BACKOFF_START, BACKOFF_MAX = 0.1, 2.0  # seconds between the watcher's reconnection attempts
POLL = 0.5  # seconds the watcher waits for notifications before checking whether to stop
RESYNC_BACKOFF_MAX = 30.0  # seconds between attempts of a resync that keeps failing
BACKFILL_BATCH = 500  # rows summarized per UPDATE round trip

_CREATE = """
CREATE TABLE IF NOT EXISTS {table} (
    task_id text PRIMARY KEY,
    version bigint NOT NULL,
    data bytea,
    updated timestamptz NOT NULL DEFAULT now()
)
"""
# put with if_match None or 0: create the row, or take the next version (if_match 0: only over a tombstone)
_UPSERT = """
INSERT INTO {table} AS t (task_id, version, data, {names}) VALUES (%(task_id)s, 1, %(data)b, {values})
ON CONFLICT (task_id) DO UPDATE SET version = t.version + 1, data = excluded.data, updated = now(), {excluded}
    WHERE %(if_match)s::bigint IS NULL OR t.data IS NULL
RETURNING version, updated
"""
# put with if_match > 0, and delete (data NULL): only over a live version (if_match: exactly that one)
_UPDATE = """
UPDATE {table} AS t SET version = t.version + 1, data = %(data)b, updated = now(), {assign}
WHERE t.task_id = %(task_id)s AND t.data IS NOT NULL
    AND (%(if_match)s::bigint IS NULL OR t.version = %(if_match)s::bigint)
RETURNING version, updated
"""
_GET = "SELECT version, data, updated FROM {table} WHERE task_id = %s"
_SCAN = "SELECT task_id, version, data, updated FROM {table}"


class PostgresStore(TaskStore):
    kind = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "recast_tasks",
        channel: str = "recast_tasks",
        connect_timeout: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self.safe_dsn = redact_dsn(dsn)
        self._secrets = passwords(dsn)
        self.table, self.channel = table, channel
        self._connect_timeout = connect_timeout
        name = sql.Identifier(table)
        columns = {
            "names": pg_index.INSERT_NAMES,
            "values": pg_index.INSERT_VALUES,
            "excluded": pg_index.ASSIGN_EXCLUDED,
            "assign": pg_index.ASSIGN,
        }
        self._sql = {
            "upsert": sql.SQL(_UPSERT).format(table=name, **columns),
            "update": sql.SQL(_UPDATE).format(table=name, **columns),
            "get": sql.SQL(_GET).format(table=name),
            "scan": sql.SQL(_SCAN).format(table=name),
            "index": pg_index.select(name),
            "backfill": pg_index.backfill(name),
        }
        self._idle: list[Connection] = []
        self._lock = threading.Lock()  # guards _idle, _table_ready, _closed, _watcher
        self._table_ready = False
        self._closed = False
        self._stopping = threading.Event()
        self._first_try = threading.Event()  # the watcher's first LISTEN succeeded or failed
        self._watcher: threading.Thread | None = None
        self._caught_up = False  # written by the watcher thread only (and close)

    # the interface

    def put(
        self, task_id: str, data: bytes, *, if_match: int | None = None, summary: Summary | None = None
    ) -> StoredTask:
        check_stored_id(task_id)
        statement = self._sql["upsert" if if_match in (None, 0) else "update"]
        params = {"task_id": task_id, "data": data, "if_match": if_match} | pg_index.params(data, summary)
        with self._transaction() as conn:
            row = conn.execute(statement, params).fetchone()
            if row is None:
                live = self._live_version(conn, task_id)
                raise VersionConflict(
                    f"task {split_stored_id(task_id)[1]!r} is at version {live}, not {if_match}"
                )
            self._notify(conn, task_id, row[0], deleted=False)
        return StoredTask(task_id, row[0], data, _iso(row[1]))

    def delete(self, task_id: str, *, if_match: int | None = None) -> StoredTask:
        check_stored_id(task_id)
        with self._transaction() as conn:
            params = {"task_id": task_id, "data": None, "if_match": if_match} | pg_index.params(None, None)
            row = conn.execute(self._sql["update"], params).fetchone()
            if row is None:
                live = self._live_version(conn, task_id)
                if live == 0:
                    raise UnknownTask(f"no task {split_stored_id(task_id)[1]!r}")
                raise VersionConflict(
                    f"task {split_stored_id(task_id)[1]!r} is at version {live}, not {if_match}"
                )
            self._notify(conn, task_id, row[0], deleted=True)
        return StoredTask(task_id, row[0], None, _iso(row[1]))

    def get(self, task_id: str) -> StoredTask | None:
        check_stored_id(task_id)
        with self._transaction() as conn:
            row = conn.execute(self._sql["get"], (task_id,), binary=True).fetchone()
        return None if row is None else StoredTask(task_id, row[0], _bytes(row[1]), _iso(row[2]))

    def scan(self) -> Iterator[StoredTask]:
        skipped = pg_index.InvalidIds()
        with self._transaction() as conn, conn.cursor(name="recast_scan", binary=True) as cursor:
            cursor.itersize = SCAN_BATCH  # a server-side cursor: only one batch of rows in memory at a time
            cursor.execute(self._sql["scan"])
            for task_id, version, data, updated in cursor:
                if skipped.invalid(task_id):
                    continue
                yield StoredTask(task_id, version, _bytes(data), _iso(updated))
        skipped.report(self.table)

    def read_index(self, progress: bool = False) -> TaskIndex:
        """The summary columns of every row (not the artifacts); rows without them are summarized from
        their data and the columns filled in."""
        builder, backfill, skipped = IndexBuilder(), [], pg_index.InvalidIds()
        with self._transaction() as conn, conn.cursor(name="recast_index", binary=True) as cursor:
            cursor.itersize = 4 * SCAN_BATCH
            cursor.execute(self._sql["index"])
            for record in tqdm(
                cursor, desc="loading tasks", unit="task", disable=not progress, mininterval=2
            ):
                if skipped.invalid(record[0]):
                    continue
                row, unsummarized = pg_index.row_from(record, _iso(record[2]))
                builder.add(row)
                if unsummarized:
                    backfill.append(row)
        skipped.report(self.table)
        if backfill:
            self._backfill(backfill)
        return builder.build()

    def _backfill(self, rows: list[IndexRow]) -> None:
        """Fill the summary columns of rows that had none (each only if still at the version summarized)."""
        for start in range(0, len(rows), BACKFILL_BATCH):
            batch = rows[start : start + BACKFILL_BATCH]
            params = [{"task_id": r.task_id, "version": r.version} | pg_index.row_params(r) for r in batch]
            with self._transaction() as conn, conn.cursor() as cursor:
                cursor.executemany(self._sql["backfill"], params)
        log.info(
            "task summaries filled in from the artifacts", extra={"store": self.safe_dsn, "rows": len(rows)}
        )

    @property
    def healthy(self) -> bool:
        return self._caught_up and not self._closed

    def watch(self, on_change: Callable[[Change], None], on_resync: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise StoreError(f"PostgreSQL store {self.safe_dsn} is closed")
            if self._watcher is not None:
                raise RuntimeError("this store is already being watched")
            self._watcher = threading.Thread(
                target=self._watch, args=(on_change, on_resync), name="postgres-store-watch", daemon=True
            )
            self._watcher.start()
        # changes committed before LISTEN would be lost: return once listening (or once the first try failed,
        # in which case the watcher calls on_resync when it gets through)
        self._first_try.wait(self._connect_timeout + 1.0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._caught_up = False
            self._stopping.set()
            watcher, self._watcher = self._watcher, None
            idle, self._idle = self._idle, []
        if watcher is not None:
            watcher.join(timeout=self._connect_timeout + 2 * POLL)
            if watcher.is_alive():
                log.warning("store watcher did not stop in time", extra={"store": self.safe_dsn})
        for conn in idle:
            conn.close()

    # connections and transactions

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A connection inside BEGIN ... COMMIT; psycopg errors become StoreError, others roll back."""
        conn = self._begin()
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            self._abandon(conn)
            if isinstance(exc, psycopg.Error):
                raise self._error("failed", exc) from None
            raise
        self._release(conn)

    def _begin(self) -> Connection:
        while True:
            conn, reused = self._checkout()
            try:
                conn.execute("BEGIN")
                return conn
            except psycopg.Error as exc:
                conn.close()
                if not reused:
                    raise self._error("failed", exc) from None
                # nothing was sent yet that could have changed data: drop the stale connections, start afresh
                log.info(
                    "reconnecting to the task store",
                    extra={"store": self.safe_dsn, "error": self._describe(exc)},
                )
                with self._lock:
                    idle, self._idle = self._idle, []
                for stale in idle:
                    stale.close()

    def _checkout(self) -> tuple[Connection, bool]:
        with self._lock:
            if self._closed:
                raise StoreError(f"PostgreSQL store {self.safe_dsn} is closed")
            if self._idle:
                return self._idle.pop(), True
            table_ready = self._table_ready
        conn = self._connect()
        if not table_ready:
            try:
                self._create_table(conn)
            except psycopg.Error as exc:
                conn.close()
                raise self._error("cannot create the task table", exc) from None
        return conn, False

    def _connect(self) -> Connection:
        try:
            return psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=max(1, round(self._connect_timeout))
            )
        except psycopg.Error as exc:
            raise self._error("cannot connect", exc) from None

    def _create_table(self, conn: Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"recast_tasks_create:{self.table}",))
            conn.execute(sql.SQL(_CREATE).format(table=sql.Identifier(self.table)))
            conn.execute(pg_index.add_columns(sql.Identifier(self.table)))
        with self._lock:
            self._table_ready = True
        log.info("task table ready", extra={"store": self.safe_dsn, "table": self.table})

    def _release(self, conn: Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE and not conn.closed:
                self._idle.append(conn)
                return
        conn.close()

    def _abandon(self, conn: Connection) -> None:
        """Roll back a failed transaction; keep the connection only if it still works."""
        if not conn.closed:
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error:
                conn.close()
        self._release(conn)

    def _live_version(self, conn: Connection, task_id: str) -> int:
        row = conn.execute(self._sql["get"], (task_id,)).fetchone()
        return 0 if row is None or row[1] is None else int(row[0])

    def _notify(self, conn: Connection, task_id: str, version: int, *, deleted: bool) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (self.channel, pg_notify.payload(task_id, version, deleted)))

    def _error(self, what: str, exc: BaseException) -> StoreError:
        message = f"PostgreSQL store {self.safe_dsn}: {what}: {self._describe(exc)}"
        return StoreError(message, retry_after=1)

    def _describe(self, exc: BaseException) -> str:
        """The exception as one line, without the password."""
        message = " ".join(str(exc).split()) or type(exc).__name__
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message

    # the watcher thread

    def _watch(self, on_change: Callable[[Change], None], on_resync: Callable[[], None]) -> None:
        delay = BACKOFF_START
        missed = False  # True once changes may have gone unheard: on_resync after the next LISTEN
        resync_at, resync_delay = 0.0, POLL  # a failing resync (full scan) is retried with backoff
        while not self._stopping.is_set():
            try:
                conn = self._connect()
            except StoreError as exc:
                missed, self._caught_up = True, False
                self._first_try.set()
                log.warning("cannot watch the task store", extra={"error": exc.message, "retry_in": delay})
                self._stopping.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            try:
                with conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    if not missed:  # listening and nothing went unheard: healthy before watch() returns
                        self._caught_up = True
                    self._first_try.set()
                    delay = BACKOFF_START
                    log.info(
                        "watching the task store", extra={"store": self.safe_dsn, "channel": self.channel}
                    )
                    while not self._stopping.is_set():
                        if missed and time.monotonic() >= resync_at:  # changes may have gone unheard (or
                            missed = not _call(on_resync)  # unapplied): rescan until it works
                            resync_at = time.monotonic() + resync_delay if missed else 0.0
                            resync_delay = min(2 * resync_delay, RESYNC_BACKOFF_MAX) if missed else POLL
                        self._caught_up = not missed
                        for notify in conn.notifies(timeout=POLL):
                            change = pg_notify.parse(notify.payload)
                            if change is not None and not _call(on_change, change):
                                missed = True
            except Exception as exc:  # a lost connection, mostly; never let the watcher die
                if self._stopping.is_set():
                    break
                missed, self._caught_up = True, False
                log.warning(
                    "lost the task store's notifications, reconnecting",
                    extra={"store": self.safe_dsn, "error": self._describe(exc), "retry_in": delay},
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds")


def _bytes(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)


def _call(callback: Callable[..., None], *args: Any) -> bool:
    """Run a watch callback; False (logged) if it raised."""
    try:
        callback(*args)
    except Exception:
        log.exception(
            "task store watch callback failed", extra={"callback": getattr(callback, "__name__", "?")}
        )
        return False
    return True
