"""The server's task registry: ids, versions, conditional writes, validation, paging."""

from __future__ import annotations

import threading

import pytest
import torch

from recast_core.artifact import ArtifactSpec, TaskArtifact
from server.errors import ArtifactRejected, InvalidTaskId, UnknownTask, VersionConflict
from server.registry import TaskRegistry, check_task_id

SPEC = ArtifactSpec(bank_fingerprint="ab" * 32, num_slots=4, num_templates=2, hidden_size=8)


def _artifact(seed: int = 0, fingerprint: str = SPEC.bank_fingerprint) -> TaskArtifact:
    gen = torch.Generator().manual_seed(seed)
    return TaskArtifact(
        coefficients=torch.randn(4, 2, generator=gen),
        head_weight=torch.randn(3, 8, generator=gen),
        head_bias=torch.randn(3, generator=gen),
        labels=("a", "b", "c"),
        bank_fingerprint=fingerprint,
    )


def test_versions_and_conditional_writes() -> None:
    registry = TaskRegistry(SPEC)
    first = registry.put("spam", _artifact(0), 100)
    assert (first.version, first.cache_key) == (1, ("spam", 1))
    second = registry.put("spam", _artifact(1), 100, if_match=1)
    assert second.version == 2 and registry.get("spam") is second
    assert first.coefficients is not second.coefficients  # the old entry is untouched, never edited
    with pytest.raises(VersionConflict, match="at version 2, not 1"):
        registry.put("spam", _artifact(2), 100, if_match=1)
    assert registry.put("new", _artifact(3), 100, if_match=0).version == 1
    with pytest.raises(VersionConflict):
        registry.delete("spam", if_match=1)
    assert registry.delete("spam", if_match=2) is second
    with pytest.raises(UnknownTask, match="no task 'spam'"):
        registry.get("spam")
    with pytest.raises(UnknownTask):
        registry.delete("spam")


def test_uploads_are_validated_against_the_bank() -> None:
    registry = TaskRegistry(SPEC)
    good = _artifact().to_bytes()
    assert registry.validate(good).labels == ("a", "b", "c")
    with pytest.raises(ArtifactRejected) as wrong_bank:
        registry.validate(_artifact(fingerprint="cd" * 32).to_bytes())
    assert wrong_bank.value.status == 422 and wrong_bank.value.body()["reason"] == "fingerprint_mismatch"
    with pytest.raises(ArtifactRejected) as truncated:
        registry.validate(good[:-5])
    assert truncated.value.body()["error_type"] == "invalid_artifact"


@pytest.mark.parametrize("task_id", ["", "-x", "a b", "x" * 129, "é", "a/b"])
def test_bad_task_ids(task_id: str) -> None:
    with pytest.raises(InvalidTaskId):
        check_task_id(task_id)
    with pytest.raises(InvalidTaskId):
        TaskRegistry(SPEC).put(task_id, _artifact(), 1)


def test_good_task_ids_and_paging() -> None:
    registry = TaskRegistry(SPEC)
    for task_id in ["b", "a.1", "Z_9-x", "x" * 128]:
        registry.put(check_task_id(task_id), _artifact(), 1)
    entries, total = registry.page(offset=1, limit=2)
    assert total == 4 and [e.task_id for e in entries] == ["a.1", "b"]
    assert set(registry.snapshot(["a.1", "b"])) == {"a.1", "b"}
    with pytest.raises(UnknownTask):
        registry.snapshot(["a.1", "missing"])


def test_concurrent_uploads_get_distinct_versions() -> None:
    registry = TaskRegistry(SPEC)
    versions: list[int] = []

    def upload() -> None:
        for _ in range(50):
            versions.append(registry.put("hot", _artifact(), 1).version)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 201)) and registry.get("hot").version == 200
