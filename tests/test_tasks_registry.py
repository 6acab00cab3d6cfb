"""The task registry, the directory store and the catalog that joins them: ids, store-assigned versions,
tombstones, conditional writes, validation, crash safety, paging."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from tiny_tasks import TINY_SPEC, tiny_artifact

from recast_core.artifact import TaskArtifact
from server.errors import ArtifactRejected, InvalidTaskId, StoreError, UnknownTask, VersionConflict
from server.stores.base import StoredTask
from server.stores.directory import DirectoryStore
from server.tasks.catalog import TaskCatalog
from server.tasks.heads import Head, HeadCache, Superseded
from server.tasks.registry import TaskRegistry, check_task_id

SPEC = TINY_SPEC


def _artifact(seed: int = 0, fingerprint: str = SPEC.bank_fingerprint) -> TaskArtifact:
    return tiny_artifact(seed, fingerprint=fingerprint)


def _catalog(tmp_path: Path) -> TaskCatalog:
    return TaskCatalog(DirectoryStore(tmp_path / "tasks"), TaskRegistry(SPEC))


def test_versions_tombstones_and_conditional_writes(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    registry = catalog.registry
    first = catalog.upload("spam", _artifact(0).to_bytes())
    assert first.version == 1 and registry.get("spam") is first
    second = catalog.upload("spam", _artifact(1).to_bytes(), if_match=1)
    assert second.version == 2 and registry.get("spam") is second
    assert second.cache_key != first.cache_key, "new coefficients must never reuse composed weights"
    with pytest.raises(VersionConflict) as conflict:
        catalog.upload("spam", _artifact(2).to_bytes(), if_match=1)
    assert conflict.value.status == 409 and registry.get("spam") is second
    assert catalog.upload("new", _artifact(3).to_bytes(), if_match=0).version == 1
    with pytest.raises(VersionConflict):
        catalog.delete("spam", if_match=1)
    assert catalog.delete("spam", if_match=2).version == 3
    with pytest.raises(UnknownTask):
        registry.get("spam")
    with pytest.raises(UnknownTask):
        catalog.delete("spam")
    again = catalog.upload("spam", _artifact(0).to_bytes(), if_match=0)
    assert again.version == 4, "versions continue after a delete: never reused"


def test_late_or_repeated_changes_never_roll_back() -> None:
    registry = TaskRegistry(SPEC)
    data = _artifact(0).to_bytes()
    assert registry.apply(StoredTask("t", 3, data, "now")) is not None
    assert registry.apply(StoredTask("t", 2, _artifact(1).to_bytes(), "before")) is None
    assert registry.apply(StoredTask("t", 3, data, "now")) is None
    assert registry.get("t").version == 3
    registry.apply(StoredTask("t", 4, None, "later"))  # tombstone
    assert registry.apply(StoredTask("t", 3, data, "now")) is None, "a delete is not undone by an old put"
    with pytest.raises(UnknownTask):
        registry.get("t")
    assert registry.known_version("t") == 4 and len(registry) == 0


def test_uploads_are_validated_against_the_bank(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    good = _artifact().to_bytes()
    assert catalog.validate(good).labels == ("a", "b", "c")
    with pytest.raises(ArtifactRejected) as wrong_bank:
        catalog.upload("x", _artifact(fingerprint="cd" * 32).to_bytes())
    assert wrong_bank.value.status == 422 and wrong_bank.value.body()["reason"] == "fingerprint_mismatch"
    with pytest.raises(ArtifactRejected) as truncated:
        catalog.upload("x", good[:-5])
    assert truncated.value.body()["error_type"] == "invalid_artifact"
    assert catalog.store.get("x") is None, "a rejected upload stores nothing"


@pytest.mark.parametrize("task_id", ["", "-x", "a b", "x" * 129, "é", "a/b", "..", ".hidden"])
def test_bad_task_ids(task_id: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidTaskId):
        check_task_id(task_id)
    with pytest.raises(InvalidTaskId):
        _catalog(tmp_path).upload(task_id, _artifact().to_bytes())


def test_good_task_ids_and_paging(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    for task_id in ["b", "a.1", "Z_9-x", "x" * 128]:
        catalog.upload(check_task_id(task_id), _artifact().to_bytes())
    registry = catalog.registry
    entries, total = registry.page(after="Z_9-x", limit=2)
    assert total == 4 and [e.task_id for e in entries] == ["a.1", "b"]
    assert [e.task_id for e in registry.page(after="b", limit=5)[0]] == ["x" * 128]


def test_concurrent_uploads_get_distinct_versions(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    versions: list[int] = []
    data = [_artifact(i).to_bytes() for i in range(4)]

    def upload(i: int) -> None:
        for _ in range(25):
            versions.append(catalog.upload("hot", data[i]).version)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 101)) and catalog.registry.get("hot").version == 100
    assert len(os.listdir(tmp_path / "tasks" / "hot")) == 1, "superseded versions are removed"


def test_directory_store_survives_a_crash_mid_upload_and_restarts(tmp_path: Path) -> None:
    root = tmp_path / "tasks"
    store = DirectoryStore(root)
    v1 = _artifact(0).to_bytes()
    store.put("t", v1)
    store.put("gone", v1)
    store.delete("gone")
    # a crash while writing version 2: a partial temp file is all that exists of it
    (root / "t" / ".000000000002.safetensors-partial.tmp").write_bytes(v1[:10])
    with pytest.raises(StoreError, match="in use by another process"):
        DirectoryStore(root)
    store.close()
    (root / "lost+found").mkdir()  # a file system's own directory is not a task
    reopened = DirectoryStore(root)
    assert not list(root.glob("*/.*.tmp")), "temp files of interrupted writes are removed at start"
    stored = {s.task_id: s for s in reopened.scan()}
    assert stored["t"].version == 1 and stored["t"].data == v1
    assert stored["gone"].deleted and stored["gone"].version == 2
    catalog = TaskCatalog(reopened, TaskRegistry(SPEC))
    assert catalog.load(progress=False) == 1
    assert catalog.upload("gone", v1).version == 3
    reopened.close()


def test_heads_beyond_the_budget_are_read_back_from_the_store(tmp_path: Path) -> None:
    artifacts = [_artifact(i) for i in range(3)]
    head_bytes = (3 * 8 + 3) * 4
    catalog = TaskCatalog(DirectoryStore(tmp_path / "tasks"), TaskRegistry(SPEC, HeadCache(2 * head_bytes)))
    registry = catalog.registry
    entries = [catalog.upload(f"t{i}", a.to_bytes()) for i, a in enumerate(artifacts)]
    assert len(registry.heads) == 2 and registry.heads.get(entries[0].digest) is None, "oldest evicted"
    head = registry.head(entries[0])  # read back from the store
    assert torch.equal(head.weight, artifacts[0].head_weight)
    assert torch.equal(head.bias, artifacts[0].head_bias)
    assert registry.heads.misses == 1 and registry.heads.get(entries[0].digest) is not None
    # the task is replaced and the old version's head is gone from memory: the old entry is superseded
    old = entries[1]
    catalog.upload("t1", artifacts[2].to_bytes())
    registry.heads.put("filler-a", Head(torch.zeros(3, 8), torch.zeros(3)))
    registry.heads.put("filler-b", Head(torch.zeros(3, 8), torch.zeros(3)))
    with pytest.raises(Superseded):
        registry.head(old)
    entry, head = registry.resolve("t1")
    assert entry.version == 2 and torch.equal(head.weight, artifacts[2].head_weight)


def test_registry_pages_each_tenant_on_its_own() -> None:
    registry = TaskRegistry(SPEC)
    data = _artifact(7).to_bytes()
    ids = ["a", "b", "team-a~a", "team-a~c", "team-b~b", "z"]
    for i, stored_id in enumerate(ids):
        registry.apply(StoredTask(stored_id, 1, data, f"2026-01-0{i + 1}T00:00:00Z"))
    default, total = registry.page()
    assert [e.task_id for e in default] == ["a", "b", "z"] and total == 3
    team_a, total = registry.page("", 1, "team-a")
    assert [e.task_id for e in team_a] == ["team-a~a"] and total == 2
    assert [e.task_id for e in registry.page("a", 10, "team-a")[0]] == ["team-a~c"]
    assert registry.page(tenant="team-c") == ([], 0)
    registry.apply(StoredTask("team-a~a", 2, None, "2026-01-09T00:00:00Z"))  # deleted
    assert [e.task_id for e in registry.page(tenant="team-a")[0]] == ["team-a~c"]
