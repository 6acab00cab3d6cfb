"""PostgresStore against a real, throwaway PostgreSQL server (the `postgres_cluster` fixture).

Each test uses its own table and notification channel, so tests never see each other's tasks or changes.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from pg_cluster import PgCluster, free_port

from server.errors import InvalidTaskId, StoreError, UnknownTask, VersionConflict
from server.stores import Change, open_store
from server.stores.pg_dsn import redact_dsn
from server.stores.postgres import PostgresStore

ISO_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")

MakeStore = Callable[[], PostgresStore]


class Recorder:
    """watch() callbacks that record what they were given."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.resyncs = 0

    def on_change(self, change: Change) -> None:
        self.changes.append(change)

    def on_resync(self) -> None:
        self.resyncs += 1


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_put_get_scan_delete_round_trip(make_store: MakeStore) -> None:
    store = make_store()
    assert store.get("alpha") is None
    assert list(store.scan()) == []

    first = store.put("alpha", b"one")
    assert (first.task_id, first.version, first.data, first.deleted) == ("alpha", 1, b"one", False)
    assert ISO_UTC_MS.fullmatch(first.updated)
    assert store.put("alpha", b"two").version == 2
    assert store.put("beta", b"b").version == 1
    third = store.put("alpha", b"three")
    assert store.get("alpha") == third  # the same version, bytes and timestamp as put returned
    assert {(t.task_id, t.version, t.data) for t in store.scan()} == {
        ("alpha", 3, b"three"),
        ("beta", 1, b"b"),
    }

    tombstone = store.delete("alpha")
    assert (tombstone.version, tombstone.data, tombstone.deleted) == (4, None, True)
    got = store.get("alpha")
    assert got is not None and got.deleted and got.version == 4
    assert {(t.task_id, t.version, t.deleted) for t in store.scan()} == {
        ("alpha", 4, True),
        ("beta", 1, False),
    }
    assert store.put("alpha", b"again").version == 5  # versions continue after a delete, never reused


def test_if_match(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(VersionConflict, match="version 0"):
        store.put("t", b"x", if_match=3)
    assert store.get("t") is None
    assert store.put("t", b"v1", if_match=0).version == 1
    with pytest.raises(VersionConflict, match="at version 1, not 0"):
        store.put("t", b"again", if_match=0)
    with pytest.raises(VersionConflict, match="at version 1, not 7"):
        store.put("t", b"stale", if_match=7)
    assert store.put("t", b"v2", if_match=1).version == 2
    got = store.get("t")
    assert got is not None and (got.version, got.data) == (2, b"v2")  # failed writes changed nothing

    with pytest.raises(UnknownTask):
        store.delete("never-stored")
    with pytest.raises(VersionConflict, match="at version 2, not 1"):
        store.delete("t", if_match=1)
    assert store.delete("t", if_match=2).version == 3
    with pytest.raises(UnknownTask):
        store.delete("t")
    with pytest.raises(VersionConflict, match="at version 0, not 3"):
        store.put("t", b"over a tombstone", if_match=3)  # a tombstone has no live version
    assert store.put("t", b"v4", if_match=0).version == 4


def test_invalid_task_id(make_store: MakeStore) -> None:
    store = make_store()
    calls: list[Callable[[], object]] = [
        lambda: store.put("no spaces", b"x"),
        lambda: store.get("../etc"),
        lambda: store.delete(""),
        lambda: store.get("x" * 129),
    ]
    for call in calls:
        with pytest.raises(InvalidTaskId):
            call()


def test_concurrent_puts_get_distinct_versions(make_store: MakeStore) -> None:
    stores = [make_store(), make_store()]  # two stores, as two replicas would be
    versions: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(store: PostgresStore) -> None:
        try:
            for i in range(25):
                version = store.put("shared", f"payload {i}".encode()).version
                with lock:
                    versions.append(version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(stores[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert sorted(versions) == list(range(1, 101))
    got = stores[0].get("shared")
    assert got is not None and got.version == 100


def test_concurrent_first_use_creates_the_table_once(make_store: MakeStore) -> None:
    stores = [make_store() for _ in range(4)]
    results: list[object] = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.get("x"))) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [None] * 4


def test_scan_streams_many_rows(make_store: MakeStore, postgres_dsn: str) -> None:
    store = make_store()
    store.put("seed", b"s")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {store.table} (task_id, version, data) "
            "SELECT 'task-' || i, i, CASE WHEN i % 10 = 0 THEN NULL ELSE '\\x00ff'::bytea END "
            "FROM generate_series(1, 3000) AS i"
        )
    rows = list(store.scan())
    assert len(rows) == 3001
    assert sum(row.deleted for row in rows) == 300
    assert {row.data for row in rows if not row.deleted} == {b"\x00\xff", b"s"}


def test_watch_delivers_changes_from_another_store(make_store: MakeStore) -> None:
    writer, watcher = make_store(), make_store()
    seen = Recorder()
    watcher.watch(seen.on_change, seen.on_resync)

    writer.put("remote", b"x")
    assert wait_for(lambda: Change("remote", 1) in seen.changes, 1.0), seen.changes
    writer.delete("remote")
    assert wait_for(lambda: Change("remote", 2) in seen.changes, 1.0), seen.changes
    assert seen.resyncs == 0


def test_watch_survives_failing_callbacks(make_store: MakeStore) -> None:
    writer, watcher = make_store(), make_store()
    seen = Recorder()

    def on_change(change: Change) -> None:
        seen.on_change(change)
        if change.version == 1:
            raise RuntimeError("callback bug")

    watcher.watch(on_change, seen.on_resync)
    writer.put("t", b"1")
    writer.put("t", b"2")
    assert wait_for(lambda: len(seen.changes) == 2, 1.0), seen.changes


def test_close_stops_the_watcher_promptly(make_store: MakeStore) -> None:
    store = make_store()
    store.watch(Recorder().on_change, Recorder().on_resync)
    assert any(t.name == "postgres-store-watch" for t in threading.enumerate())
    start = time.monotonic()
    store.close()
    store.close()  # idempotent
    assert time.monotonic() - start < 2.0
    with pytest.raises(StoreError, match="closed"):
        store.get("t")


def test_restart_reconnects_watcher_and_store(make_store: MakeStore, postgres_cluster: PgCluster) -> None:
    writer, watcher, reader = make_store(), make_store(), make_store()
    seen = Recorder()
    watcher.watch(seen.on_change, seen.on_resync)
    writer.put("t", b"before")
    assert reader.get("t") is not None  # leaves an idle connection the restart will break
    assert wait_for(lambda: Change("t", 1) in seen.changes, 1.0)

    postgres_cluster.stop()
    try:
        with pytest.raises(StoreError) as down:
            writer.put("t", b"while down")
        assert "\n" not in str(down.value)
    finally:
        postgres_cluster.start()

    got = reader.get("t")  # its connection was broken by the restart: replaced transparently
    assert got is not None and got.version == 1
    assert wait_for(lambda: seen.resyncs == 1, 10.0), "the watcher did not reconnect"
    assert writer.put("t", b"after").version == 2
    assert wait_for(lambda: Change("t", 2) in seen.changes, 1.0), seen.changes


def test_healthy_follows_the_watcher_through_a_restart(
    make_store: MakeStore, postgres_cluster: PgCluster
) -> None:
    store, seen = make_store(), Recorder()
    assert not store.healthy  # not watching yet
    store.watch(seen.on_change, seen.on_resync)
    assert store.healthy
    postgres_cluster.stop("immediate")
    try:
        assert wait_for(lambda: not store.healthy, 2.0), "a lost connection is noticed"
    finally:
        postgres_cluster.start()
    assert wait_for(lambda: store.healthy, 10.0), "healthy again once reconnected"
    assert seen.resyncs == 1  # and only after the rescan
    store.close()
    assert not store.healthy


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://recast:s3cret-pw@127.0.0.1:{port}/recast_test",
        "host=127.0.0.1 port={port} user=recast password=s3cret-pw dbname=recast_test",
    ],
)
def test_connection_refused_is_a_store_error_without_the_password(dsn: str) -> None:
    store = PostgresStore(dsn.format(port=free_port()), connect_timeout=2)
    try:
        for call in (lambda: store.put("t", b"x"), lambda: store.get("t"), lambda: list(store.scan())):
            with pytest.raises(StoreError) as raised:
                call()
            message = str(raised.value)
            assert "s3cret-pw" not in message and "***" in message and "\n" not in message
            assert "refused" in message
    finally:
        store.close()


def test_open_store_picks_postgres_for_a_url(postgres_dsn: str) -> None:
    store = open_store(postgres_dsn)
    try:
        assert isinstance(store, PostgresStore) and store.kind == "postgresql"
    finally:
        store.close()


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert (
        redact_dsn("postgres://u@h/db?password=x&sslmode=require")
        == "postgres://u@h/db?password=***&sslmode=require"
    )
    assert redact_dsn("host=h password='a b' user=u") == "host=h password=*** user=u"
    assert redact_dsn("postgresql://h:5432/db") == "postgresql://h:5432/db"
