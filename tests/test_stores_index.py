"""The directory store's task index: kept on every write, read at start-up instead of every artifact,
never trusted blindly (corrupt, truncated or stale indexes are rebuilt), and crash-safe."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from recast_core.artifact import ArtifactSpec, TaskArtifact
from server.errors import StoreError
from server.stores import journal, records
from server.stores.directory import DirectoryStore
from server.stores.index import IndexRow, TaskIndex, row_of
from server.tasks.catalog import TaskCatalog
from server.tasks.registry import TaskRegistry

SPEC = ArtifactSpec(
    bank_fingerprint="ab" * 32, num_slots=4, num_templates=2, hidden_size=8, edit_shape=(2, 8)
)


def _artifact(seed: int) -> TaskArtifact:
    """Every other task also edits its FFN outputs ((2, 8) scale and shift)."""
    gen = torch.Generator().manual_seed(seed)
    edit = seed % 2 == 1
    return TaskArtifact(
        coefficients=torch.randn(4, 2, generator=gen),
        head_weight=torch.randn(2 + seed % 3, 8, generator=gen),
        head_bias=torch.randn(2 + seed % 3, generator=gen),
        labels=tuple(f"l{i}" for i in range(2 + seed % 3)),
        bank_fingerprint=SPEC.bank_fingerprint,
        training={"seed": seed},
        ffn_scale=1 + torch.randn(2, 8, generator=gen) if edit else None,
        ffn_shift=torch.randn(2, 8, generator=gen) if edit else None,
    )


def _rows(index: TaskIndex) -> dict[str, IndexRow]:
    return {index.ids[i]: index.row(i) for i in range(len(index))}


def _scanned(store: DirectoryStore) -> dict[str, IndexRow]:
    """What a full scan (every artifact parsed) says: the truth the index must match."""
    return {s.task_id: row_of(s.task_id, s.version, s.updated, s.data) for s in store.scan()}


def _fill(root: Path, count: int = 6) -> DirectoryStore:
    store = DirectoryStore(root)
    for i in range(count):
        store.put(f"task-{i}", _artifact(i).to_bytes())
    store.put("team-a~task-0", _artifact(9).to_bytes())
    store.put("task-1", _artifact(7).to_bytes())  # version 2
    store.delete("task-2")
    store.put("junk", b"not an artifact")
    return store


def _compact(root: Path) -> None:
    """Open and read: the first read writes the journal into a new snapshot."""
    store = DirectoryStore(root)
    store.read_index()
    store.close()


def _rebuilt(caplog: pytest.LogCaptureFixture) -> bool:
    return any("rebuilding the task index" in r.getMessage() for r in caplog.records)


def test_index_survives_restarts_and_matches_a_full_scan(tmp_path: Path) -> None:
    root = tmp_path / "tasks"
    store = _fill(root)
    assert _rows(store.read_index()) == _scanned(store)
    store.close()
    for _ in range(2):  # the first reopen compacts the journal into a new snapshot, the second reads it
        store = DirectoryStore(root)
        assert _rows(store.read_index()) == _scanned(store)
        store.close()
    assert sorted(os.listdir(root / ".index")) == ["journal-2", "snapshot"]

    store = DirectoryStore(root)
    registry = TaskRegistry(SPEC)
    TaskCatalog(store, registry).load(progress=False)
    fresh = TaskRegistry(SPEC)  # the same tasks installed the old way, from their artifacts
    for stored in store.scan():
        if stored.task_id != "junk":
            fresh.apply(stored)
    assert len(registry) == len(fresh) == 6
    for task_id in ("task-0", "task-1", "team-a~task-0", "task-5"):
        got, want = registry.get(task_id), fresh.get(task_id)
        assert torch.equal(got.coefficients, want.coefficients)
        fields = ("version", "labels", "head_parameters", "extra_parameters", "size_bytes", "updated")
        for field in (*fields, "digest", "created", "trainable_parameters"):
            assert getattr(got, field) == getattr(want, field), field
        assert got.training == want.training and got.bank_fingerprint == want.bank_fingerprint
        head, truth = registry.head(got), registry.head(want)  # read back from the store
        assert torch.equal(head.weight, truth.weight)
        assert (head.edit is None) == (truth.edit is None) == (got.extra_parameters == 0)
        if head.edit is not None and truth.edit is not None:
            assert torch.equal(head.edit[1], truth.edit[1])
    assert [e.task_id for e in registry.page()[0]] == [e.task_id for e in fresh.page()[0]]
    store.close()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing", "journal middle"])
def test_a_corrupt_truncated_or_missing_index_is_rebuilt(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "tasks"
    store = _fill(root)
    store.close()
    _compact(root)  # a snapshot with rows in it
    snapshot = root / ".index" / "snapshot"
    data = bytearray(snapshot.read_bytes())
    if damage == "flipped byte":
        data[-40] ^= 0x01
        snapshot.write_bytes(bytes(data))
    elif damage == "truncated":
        snapshot.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "missing":
        snapshot.unlink()
    else:  # two writes, then the first one's record damaged: not a torn tail, so not cut off
        store = DirectoryStore(root)
        store.put("task-3", _artifact(30).to_bytes())
        store.put("task-4", _artifact(40).to_bytes())
        store.close()
        (path,) = (root / ".index").glob("journal-*")
        records = bytearray(path.read_bytes())
        records[12] ^= 0xFF
        path.write_bytes(bytes(records))
    (root / "task-5" / ".000000000002.safetensors.x.tmp").write_bytes(b"of a write cut short")
    caplog.set_level(logging.WARNING)
    store = DirectoryStore(root)
    assert _rows(store.read_index()) == _scanned(store)
    assert _rebuilt(caplog) and not list(root.glob("*/.*.tmp")), "a rebuild removes temp files too"
    store.close()
    caplog.clear()
    store = DirectoryStore(root)  # and the rebuilt index is trusted again
    assert _rows(store.read_index()) == _scanned(store) and not _rebuilt(caplog)
    store.close()


def test_a_stale_index_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "tasks"
    store = _fill(root)
    store.close()
    _compact(root)  # every row in the snapshot, the journal empty
    old = tmp_path / "old-index"
    shutil.copytree(root / ".index", old)
    store = DirectoryStore(root)
    for i in range(6):  # every task moves on
        store.put(f"task-{i}", _artifact(10 + i).to_bytes())
    store.close()
    shutil.rmtree(root / ".index")
    shutil.copytree(old, root / ".index")  # an index restored from before those writes
    caplog.set_level(logging.WARNING)
    store = DirectoryStore(root)
    assert _rows(store.read_index()) == _scanned(store) and _rebuilt(caplog)
    store.close()

    # a task directory written behind the index's back (an older server): fixed without a rebuild
    caplog.clear()
    (root / "sneaky").mkdir()
    (root / "sneaky" / f"{3:012d}.safetensors").write_bytes(_artifact(5).to_bytes())
    shutil.rmtree(root / "task-5")  # and one removed
    store = DirectoryStore(root)
    rows = _rows(store.read_index())
    assert rows == _scanned(store) and rows["sneaky"].version == 3 and "task-5" not in rows
    assert not _rebuilt(caplog)
    store.close()


def test_a_crash_mid_write_loses_no_acknowledged_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "tasks"
    store = _fill(root)
    acknowledged = _scanned(store)
    (path,) = (root / ".index").glob("journal-*")
    store.close()
    # a crash while appending the next record: part of it reached the file
    record = records.encode(row_of("task-0", 2, "2026-01-01T00:00:00.000+00:00", _artifact(50).to_bytes()))
    with open(path, "ab") as handle:
        handle.write(record[: len(record) // 2])
    caplog.set_level(logging.WARNING)
    store = DirectoryStore(root)
    assert _rows(store.read_index()) == acknowledged == _scanned(store)
    assert not _rebuilt(caplog) and any("torn journal record" in r.getMessage() for r in caplog.records)
    assert store.put("task-0", _artifact(51).to_bytes()).version == 2
    store.close()

    # a crash after the record, before the version file (a temp file is all there is of it)
    (path,) = (root / ".index").glob("journal-*")
    with open(path, "ab") as handle:
        handle.write(
            records.encode(row_of("task-3", 2, "2026-01-01T00:00:00.000+00:00", _artifact(52).to_bytes()))
        )
    (root / "task-3" / ".000000000002.safetensors.x.tmp").write_bytes(b"partial")
    store = DirectoryStore(root)
    assert not list(root.glob("*/.*.tmp")), "temp files of interrupted writes are removed at start"
    rows = _rows(store.read_index())
    assert rows == _scanned(store) and rows["task-3"].version == 1 and not _rebuilt(caplog)
    assert store.put("task-3", _artifact(53).to_bytes()).version == 2
    store.close()
    store = DirectoryStore(root)
    assert _rows(store.read_index()) == _scanned(store)
    store.close()


def test_a_failed_version_write_leaves_the_old_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tasks"
    store = _fill(root)
    before = _scanned(store)

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("server.stores.directory.write_atomic", full_disk)
    with pytest.raises(StoreError):
        store.put("task-0", _artifact(60).to_bytes())
    with pytest.raises(StoreError):
        store.put("brand-new", _artifact(61).to_bytes())
    monkeypatch.undo()
    assert _rows(store.read_index()) == before == _scanned(store)
    store.close()
    store = DirectoryStore(root)
    assert _rows(store.read_index()) == before
    store.close()


def test_the_journal_is_compacted_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "COMPACT_MIN_RECORDS", 8)
    root = tmp_path / "tasks"
    store = DirectoryStore(root)
    for i in range(40):
        store.put(f"t{i % 12}", _artifact(i).to_bytes())
        if i % 7 == 0:
            assert _rows(store.read_index()) == _scanned(store)  # readers meanwhile see one state
    store.close()  # waits for a compaction still running
    generations = [int(p.name.split("-")[1]) for p in (root / ".index").glob("journal-*")]
    assert min(generations) > 1, "compacted at least once"
    assert len(list((root / ".index").glob(".*.tmp"))) == 0
    store = DirectoryStore(root)
    assert _rows(store.read_index()) == _scanned(store)
    store.close()
