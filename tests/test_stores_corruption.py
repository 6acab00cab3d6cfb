"""A stored artifact corrupted at rest is never served: read back, it fails verification, is logged once,
counted (recast_store_corrupt_artifacts) and its task answers 503 task_unavailable until re-uploaded."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client import Counter
from server_harness import serving, task_artifact
from tiny_tasks import TINY_SPEC, tiny_artifact

from recast_core.artifact import TaskArtifact
from recast_core.bank import TemplateBank
from server.errors import TaskUnavailable
from server.metrics import Metrics
from server.settings import Settings
from server.stores.directory import DirectoryStore
from server.tasks.catalog import TaskCatalog
from server.tasks.heads import HeadCache
from server.tasks.registry import TaskRegistry

SPEC = TINY_SPEC
KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/octet-stream"}


def _artifact(seed: int) -> TaskArtifact:
    return tiny_artifact(seed)


def corrupt_tensor_byte(task_dir: Path) -> None:
    """Flip one bit of the tensor data (after the safetensors header) of the task's stored version."""
    (path,) = task_dir.glob("*.safetensors")
    data = bytearray(path.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _metrics() -> Metrics:
    metrics = Metrics()
    if not hasattr(metrics, "store_corrupt_artifacts"):  # until server/metrics.py has it
        metrics.store_corrupt_artifacts = Counter(  # type: ignore[attr-defined]
            "recast_store_corrupt_artifacts",
            "stored artifacts failing verification",
            registry=metrics.registry,
        )
    return metrics


def _corrupt_count(metrics: Metrics) -> float:
    return float(metrics.registry.get_sample_value("recast_store_corrupt_artifacts_total") or 0.0)


def test_a_corrupt_stored_head_answers_task_unavailable_until_reuploaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    head_bytes = (3 * 8 + 3) * 4
    metrics = _metrics()
    store = DirectoryStore(tmp_path / "tasks")
    catalog = TaskCatalog(store, TaskRegistry(SPEC, HeadCache(head_bytes)), metrics)
    registry = catalog.registry
    catalog.upload("victim", _artifact(0).to_bytes())
    catalog.upload("other", _artifact(1).to_bytes())  # evicts the victim's head
    assert registry.heads.get(registry.get("victim").digest) is None
    corrupt_tensor_byte(tmp_path / "tasks" / "victim")
    caplog.set_level(logging.ERROR)
    for _ in range(3):
        with pytest.raises(TaskUnavailable, match="failed verification; upload it again") as raised:
            registry.resolve("victim")
        assert raised.value.status == 503 and raised.value.error_type == "task_unavailable"
    assert _corrupt_count(metrics) == 1 and len(registry) == 1, "counted once, not served"
    assert sum("failed verification" in r.getMessage() for r in caplog.records) == 1, "logged once"
    assert [e.task_id for e in registry.page()[0]] == ["other"]
    registry.resolve("other")  # the other task is unaffected

    catalog.upload("victim", _artifact(2).to_bytes())  # a new version replaces it
    entry, head = registry.resolve("victim")
    assert entry.version == 2 and torch.equal(head.weight, _artifact(2).head_weight)
    store.close()

    # at the next start the index still names version 2; corrupt it on disk: read back, it is refused
    corrupt_tensor_byte(tmp_path / "tasks" / "victim")
    store = DirectoryStore(tmp_path / "tasks")
    catalog = TaskCatalog(store, TaskRegistry(SPEC, HeadCache(0)), metrics)
    assert catalog.load(progress=False) == 2
    with pytest.raises(TaskUnavailable):
        catalog.registry.resolve("victim")
    with pytest.raises(TaskUnavailable):
        catalog.registry.get("victim").training  # noqa: B018 (the detail read-back is refused as well)
    assert _corrupt_count(metrics) == 2
    store.close()


def test_a_corrupt_artifact_found_by_an_index_rebuild_is_unavailable(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "tasks")
    catalog = TaskCatalog(store, TaskRegistry(SPEC))
    catalog.upload("victim", _artifact(0).to_bytes())
    catalog.upload("other", _artifact(1).to_bytes())
    store.close()
    corrupt_tensor_byte(tmp_path / "tasks" / "victim")
    (tmp_path / "tasks" / ".index" / "snapshot").unlink()  # the index must be rebuilt from the artifacts
    metrics = _metrics()
    store = DirectoryStore(tmp_path / "tasks")
    catalog = TaskCatalog(store, TaskRegistry(SPEC), metrics)
    assert catalog.load(progress=False) == 1
    with pytest.raises(TaskUnavailable):
        catalog.registry.get("victim")
    assert catalog.registry.known_version("victim") == 1 and _corrupt_count(metrics) == 1
    catalog.upload("victim", _artifact(3).to_bytes(), if_match=1)
    assert catalog.registry.get("victim").version == 2
    store.close()


def _settings(bank_dir: Path, store: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"bank": bank_dir, "store": str(store), "api_keys": KEY, "threads": 2}
    return Settings(**(values | overrides))


@pytest.mark.parametrize(
    "reupload",
    [
        False,
        True,
    ],
    ids=["answers_503", "reupload_fixes_it"],
)
def test_predict_on_a_corrupt_stored_artifact_answers_503_until_reuploaded(
    bank_dir: Path, tmp_path: Path, default_bank: TemplateBank, reupload: bool
) -> None:
    store = tmp_path / "tasks"
    victim, other = task_artifact(default_bank, 1), task_artifact(default_bank, 2)
    with (
        serving(_settings(bank_dir, store, head_cache_bytes=0)) as url,  # every head read back from the store
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        assert http.put("/v1/tasks/victim", content=victim.to_bytes(), headers=ADMIN).status_code == 201
        assert http.put("/v1/tasks/other", content=other.to_bytes(), headers=ADMIN).status_code == 201
        assert http.post("/v1/tasks/victim/predict", json={"inputs": ["hello"]}).status_code == 200
        corrupt_tensor_byte(store / "victim")
        for _ in range(2):
            answer = http.post("/v1/tasks/victim/predict", json={"inputs": ["hello"]})
            assert answer.status_code == 503, answer.text
            assert answer.json()["error_type"] == "task_unavailable"
            assert "failed verification; upload it again" in answer.json()["error"]
        assert http.post("/v1/tasks/other/predict", json={"inputs": ["hello"]}).status_code == 200
        if not reupload:
            return
        again = http.put("/v1/tasks/victim", content=victim.to_bytes(), headers=ADMIN)
        assert again.status_code == 200 and again.json()["version"] == 2, again.text
        fixed = http.post("/v1/tasks/victim/predict", json={"inputs": ["hello"]})
        assert fixed.status_code == 200 and fixed.json()["version"] == 2
