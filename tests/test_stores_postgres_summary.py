"""PostgreSQL task table: summary columns written at put time and read by start-up instead of artifacts;
rows of earlier versions summarized on first scan; rows with invalid task ids skipped, not fatal."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import psycopg
import pytest
import torch
from tiny_tasks import TINY_SPEC, tiny_artifact

from recast_core.artifact import TaskArtifact
from server.stores.postgres import PostgresStore
from server.tasks.catalog import TaskCatalog
from server.tasks.registry import TaskRegistry

SPEC = TINY_SPEC

MakeStore = Callable[[], PostgresStore]


def _artifact(seed: int) -> TaskArtifact:
    return tiny_artifact(seed, training={"seed": seed})


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_a_row_with_an_invalid_task_id_neither_fails_start_up_nor_loops_resyncs(
    make_store: MakeStore, postgres_dsn: str
) -> None:
    """Before the fix, catalog.load raised InvalidTaskId (start-up failed) and a notification of that row
    made the watcher resync every 0.5 s for ever, each resync a full-table scan that failed again."""
    store = make_store()
    store.put("good", _artifact(0).to_bytes())
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {store.table} (task_id, version, data) VALUES ('not a task id!', 1, %s)",
            (_artifact(1).to_bytes(),),
        )
    catalog = TaskCatalog(store, TaskRegistry(SPEC))
    assert catalog.load(progress=False) == 1  # the bad row is skipped (and logged), start-up goes on
    assert [t.task_id for t in store.scan()] == ["good"]

    resyncs: list[float] = []

    def resync() -> None:
        resyncs.append(time.monotonic())
        catalog.resync()

    store.watch(catalog.on_change, resync)
    assert store.healthy
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:  # another writer touches the bad row
        conn.execute(f"UPDATE {store.table} SET version = 2 WHERE task_id = 'not a task id!'")
        payload = json.dumps({"task_id": "not a task id!", "version": 2, "deleted": False})
        conn.execute("SELECT pg_notify(%s, %s)", (store.channel, payload))
    store.put("later", _artifact(2).to_bytes())  # changes after it are still heard
    assert _wait_for(lambda: catalog.registry.known_version("later") == 1, 2.0)
    time.sleep(1.5)
    assert len(resyncs) <= 1 and store.healthy, f"{len(resyncs)} resyncs"
    assert len(catalog.registry) == 2


def test_puts_write_the_summary_columns_and_start_up_reads_only_them(
    make_store: MakeStore, postgres_dsn: str
) -> None:
    store = make_store()
    artifacts = {f"t{i}": _artifact(i) for i in range(3)}
    for task_id, artifact in artifacts.items():
        store.put(task_id, artifact.to_bytes())
    store.delete("t2")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        rows = dict(conn.execute(f"SELECT task_id, summary_format FROM {store.table}").fetchall())
        assert rows == {"t0": 1, "t1": 1, "t2": None}
        # the artifact bytes are garbage now, the summary is intact: start-up must not read the bytes
        conn.execute(f"UPDATE {store.table} SET data = '\\x00'::bytea WHERE task_id = 't1'")
    registry = TaskRegistry(SPEC)
    assert TaskCatalog(store, registry).load(progress=False) == 2
    for task_id in ("t0", "t1"):
        entry = registry.get(task_id)
        assert torch.equal(entry.coefficients, artifacts[task_id].coefficients)
        assert entry.labels == ("a", "b", "c") and entry.head_parameters == 3 * 8 + 3
    assert registry.known_version("t2") == 2 and "t2" not in {e.task_id for e in registry.page()[0]}


def test_rows_of_an_earlier_table_are_summarized_on_the_first_scan(
    make_store: MakeStore, postgres_dsn: str
) -> None:
    store = make_store()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:  # the table as earlier versions made it
        conn.execute(
            f"CREATE TABLE {store.table} (task_id text PRIMARY KEY, version bigint NOT NULL, data bytea, "
            "updated timestamptz NOT NULL DEFAULT now())"
        )
        for i in range(3):
            conn.execute(
                f"INSERT INTO {store.table} (task_id, version, data) VALUES (%s, %s, %s)",
                (f"old{i}", 4, _artifact(i).to_bytes()),
            )
        conn.execute(f"INSERT INTO {store.table} (task_id, version, data) VALUES ('junk', 1, 'x'::bytea)")
        conn.execute(f"INSERT INTO {store.table} (task_id, version, data) VALUES ('gone', 2, NULL)")
    registry = TaskRegistry(SPEC)
    catalog = TaskCatalog(store, registry)
    assert catalog.load(progress=False) == 3  # columns added, rows summarized from their data
    assert torch.equal(registry.get("old1").coefficients, _artifact(1).coefficients)
    assert registry.get("old1").training == {"seed": 1}  # read from the artifact when asked for
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        formats = dict(conn.execute(f"SELECT task_id, summary_format FROM {store.table}").fetchall())
    assert formats == {"old0": 1, "old1": 1, "old2": 1, "junk": 0, "gone": None}
    index = store.read_index()
    rows = {index.ids[i]: index.row(i) for i in range(len(index))}
    assert rows["old2"].summary is not None and rows["junk"].reason == "artifact_corrupt"
    with pytest.raises(Exception, match="failed verification"):
        registry.get("junk")  # stored but unreadable: task_unavailable, not unknown
