"""Task changes in one place: store first (durable, versioned), then the resident registry.

Uploads and deletes made here, and changes other replicas made (delivered by the store's watch), end up
in the registry the same way: as a stored version that is installed unless a newer one is already known.
"""

from __future__ import annotations

import hashlib
import logging
import time

from tqdm import tqdm

from recast_core.artifact import TaskArtifact
from server.errors import ArtifactRejected
from server.heads import Head, Superseded
from server.metrics import Metrics
from server.registry import TaskEntry, TaskRegistry
from server.stores.base import Change, StoredTask, TaskStore
from server.task_ids import check_stored_id

log = logging.getLogger(__name__)


class TaskCatalog:
    def __init__(self, store: TaskStore, registry: TaskRegistry, metrics: Metrics | None = None) -> None:
        self.store, self.registry, self.metrics = store, registry, metrics
        registry.heads.load = self.load_head  # heads evicted from memory are read back from this store

    def load_head(self, entry: TaskEntry) -> Head:
        """The head of exactly this version, from the store; Superseded if the store moved on."""
        stored = self.store.get(entry.task_id)
        if stored is not None and stored.version > entry.version:
            self.registry.apply(stored)  # the store is ahead (a change not heard yet): serve the newer one
        if stored is None or stored.data is None or stored.version != entry.version:
            raise Superseded(f"task {entry.task_id!r} version {entry.version} is no longer stored")
        if hashlib.sha256(stored.data).hexdigest() != entry.digest:
            raise Superseded(f"task {entry.task_id!r} version {entry.version} changed in the store")
        artifact = self.registry.validate(stored.data)
        return artifact.head_weight, artifact.head_bias

    def load(self, progress: bool = True) -> int:
        """Install every stored task (start-up and resync); returns how many are live."""
        start = time.perf_counter()
        bad = 0
        for stored in tqdm(self.store.scan(), desc="loading tasks", unit="task", disable=not progress):
            try:
                self.registry.apply(stored)
            except ArtifactRejected as exc:  # stored under another bank: keep it stored, do not serve it
                bad += 1
                log.warning(
                    "stored task not servable with this bank",
                    extra={"task_id": stored.task_id, "version": stored.version, "reason": exc.reason},
                )
        self._update_gauge()
        log.info(
            "tasks loaded",
            extra={
                "tasks": len(self.registry),
                "skipped": bad,
                "seconds": round(time.perf_counter() - start, 3),
            },
        )
        return len(self.registry)

    def validate(self, data: bytes) -> TaskArtifact:
        try:
            return self.registry.validate(data)
        except ArtifactRejected as exc:
            if self.metrics is not None:
                self.metrics.upload_rejections.labels(reason=exc.reason).inc()
            raise

    def upload(self, task_id: str, data: bytes, *, if_match: int | None = None) -> TaskEntry:
        """Validate, store durably, then serve: returns the entry now answering requests for the task."""
        check_stored_id(task_id)
        artifact = self.validate(data)
        stored = self.store.put(task_id, data, if_match=if_match)
        entry = self.registry.apply(stored, artifact)
        if entry is None:  # a newer change was installed meanwhile; answer with what this upload stored
            entry = TaskEntry.of(stored, artifact, hashlib.sha256(data).hexdigest())
        if self.metrics is not None:
            self.metrics.uploads.inc()
        self._update_gauge()
        return entry

    def delete(self, task_id: str, *, if_match: int | None = None) -> StoredTask:
        check_stored_id(task_id)
        tombstone = self.store.delete(task_id, if_match=if_match)
        self.registry.apply(tombstone)
        self._update_gauge()
        return tombstone

    def on_change(self, change: Change) -> None:
        """A change made elsewhere: read that task's newest version from the store and install it."""
        if change.version <= self.registry.known_version(change.task_id):
            return
        stored = self.store.get(change.task_id)
        if stored is None:
            return
        try:
            self.registry.apply(stored)
        except ArtifactRejected as exc:
            log.warning(
                "changed task not servable with this bank",
                extra={"task_id": stored.task_id, "version": stored.version, "reason": exc.reason},
            )
        self._update_gauge()

    def resync(self) -> None:
        log.info("resyncing tasks from the store")
        self.load(progress=False)

    def _update_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.tasks_resident.set(len(self.registry))
