"""Task changes in one place: store first (durable, versioned), then the resident registry.

Uploads and deletes made here, and changes other replicas made (delivered by the store's watch), end up
in the registry the same way: as a stored version that is installed unless a newer one is already known.
Start-up and resync install the store's index (every task's summary) without reading artifacts; heads and
training summaries are read back from the store when first needed.

A stored artifact that fails verification when read back (head read-back, a change from elsewhere, a row
the index could not summarize) is never served: it is logged once, counted in the metric
`recast_store_corrupt_artifacts` and the task answers TaskUnavailable (503) until a new version replaces it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from recast_core.artifact import TaskArtifact
from server.errors import ArtifactRejected, InvalidTaskId, NotReady
from server.ids import check_stored_id, is_stored_id, split_stored_id
from server.metrics import Metrics
from server.stores.base import Change, StoredTask, TaskStore
from server.stores.index import summary_of
from server.tasks.heads import Head, Superseded
from server.tasks.registry import BANK_MISMATCH, TaskEntry, TaskRegistry, unavailable

log = logging.getLogger("server.catalog")  # the logger name of its lines as they always were

EXAMPLES = 5  # ids named in a log line that counts many


class TaskCatalog:
    def __init__(self, store: TaskStore, registry: TaskRegistry, metrics: Metrics | None = None) -> None:
        self.store, self.registry, self.metrics = store, registry, metrics
        registry.heads.load = self.load_head  # heads evicted from memory are read back from this store
        registry.load_training = self.load_training  # so are training summaries (not in the index)
        self._reported: set[tuple[str, int]] = set()  # unservable versions already logged and counted

    def load_head(self, entry: TaskEntry) -> Head:
        """The head of exactly this version, from the store; Superseded if the store moved on."""
        artifact = self._read_back(entry)
        return Head.of(artifact)

    def load_training(self, entry: TaskEntry) -> dict[str, Any]:
        """The training summary of exactly this version, from its stored artifact."""
        try:
            artifact = self._read_back(entry)
        except Superseded:
            name = split_stored_id(entry.task_id)[1]
            raise NotReady(f"task {name!r} was replaced while being read; retry", retry_after=1) from None
        self.registry.heads.put(entry.digest, Head.of(artifact))
        return artifact.training

    def load(self, progress: bool = True) -> int:
        """Install every stored task (start-up and resync); returns how many are live."""
        start = time.perf_counter()
        index = self.store.read_index(progress=progress)
        loaded = time.perf_counter()
        report = self.registry.load(index)
        for task_id, version, reason in report.unservable:
            self._unservable(task_id, version, reason, mark=False)
        for task_id, version in report.unreadable:  # the store could not summarize it: verify it as an upload
            self._verify(task_id, version)
        if report.invalid_ids:
            log.warning(
                "skipped stored tasks whose ids are not valid task ids",
                extra={"count": len(report.invalid_ids), "examples": report.invalid_ids[:EXAMPLES]},
            )
        if report.bank_mismatches:
            log.warning(
                "stored tasks made for another template bank answer task_unavailable",
                extra={"count": report.bank_mismatches},
            )
        self._update_gauge()
        log.info(
            "tasks loaded",
            extra={
                "tasks": len(self.registry),
                "rows": len(index),
                "unservable": len(report.unservable) + len(report.unreadable) + report.bank_mismatches,
                "invalid_ids": len(report.invalid_ids),
                "read_seconds": round(loaded - start, 3),
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
        digest = hashlib.sha256(data).digest()
        stored = self.store.put(task_id, data, if_match=if_match, summary=summary_of(data, artifact, digest))
        entry = self.registry.apply(stored, artifact)
        if entry is None:  # a newer change was installed meanwhile; answer with what this upload stored
            entry = TaskEntry.of(stored, artifact, digest.hex())
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
        if not is_stored_id(
            change.task_id
        ):  # not one of ours (a foreign or hand-made row): never resync on it
            log.warning(
                "ignoring a change to a stored id that is not a task id",
                extra={"task_id": change.task_id[:200]},
            )
            return
        if change.version <= self.registry.known_version(change.task_id):
            return
        self._install(self.store.get(change.task_id))
        self._update_gauge()

    def resync(self) -> None:
        log.info("resyncing tasks from the store")
        self.load(progress=False)

    # internals

    def _read_back(self, entry: TaskEntry) -> TaskArtifact:
        """Exactly this version's artifact, from the store and verified: Superseded if the store moved
        on, TaskUnavailable if what it holds for this version fails verification."""
        stored = self.store.get(entry.task_id)
        if stored is not None and stored.version > entry.version:
            self._install(stored)  # the store is ahead (a change not heard yet): serve the newer one
        if stored is None or stored.data is None or stored.version != entry.version:
            raise Superseded(f"task {entry.task_id!r} version {entry.version} is no longer stored")
        if hashlib.sha256(stored.data).hexdigest() != entry.digest:  # same version, other bytes: at rest
            raise self._unservable(entry.task_id, entry.version, "artifact_digest")
        try:
            return self.registry.validate(stored.data)
        except ArtifactRejected as exc:
            raise self._unservable(entry.task_id, entry.version, exc.reason) from None

    def _verify(self, task_id: str, version: int) -> None:
        """Validate a stored version the index could not summarize; serve it if it passes."""
        stored = self.store.get(task_id)
        if stored is None or stored.data is None or stored.version != version:
            self._install(stored)
            return
        try:
            artifact = self.registry.validate(stored.data)
        except ArtifactRejected as exc:
            self._unservable(task_id, version, exc.reason)
            return
        self.registry.apply(stored, artifact, again=True)

    def _install(self, stored: StoredTask | None) -> None:
        """Install a version read from the store; one that fails verification is marked unservable."""
        if stored is None:
            return
        try:
            self.registry.apply(stored)
        except ArtifactRejected as exc:
            self._unservable(stored.task_id, stored.version, exc.reason)
        except InvalidTaskId:
            log.warning(
                "ignoring a stored task whose id is not a task id", extra={"task_id": stored.task_id[:200]}
            )

    def _unservable(self, task_id: str, version: int, reason: str, *, mark: bool = True) -> Exception:
        """Stop serving this version (log once, count unless it is another bank's); the error to raise:
        TaskUnavailable, or Superseded if a newer version is known already."""
        if mark and not self.registry.mark_unavailable(task_id, version, reason):
            if self.registry.known_version(task_id) > version:
                return Superseded(f"task {task_id!r} version {version} was replaced")
        elif (task_id, version) not in self._reported:
            self._reported.add((task_id, version))
            fields = {"task_id": task_id, "version": version, "reason": reason}
            if reason == BANK_MISMATCH:
                log.warning("stored task not servable with this bank", extra=fields)
            else:
                log.error(
                    "stored artifact failed verification: the task answers task_unavailable", extra=fields
                )
                counter = getattr(self.metrics, "store_corrupt_artifacts", None)
                if counter is not None:
                    counter.inc()
        self._update_gauge()
        return unavailable(task_id, reason)

    def _update_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.tasks_resident.set(len(self.registry))
