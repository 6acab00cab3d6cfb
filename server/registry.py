"""Every task the server can serve, by id: immutable versioned entries swapped atomically.

A request takes one `TaskEntry` (coefficients, head, labels, version) and uses only it, so it is answered
wholly by the old or wholly by the new version of a task, never by a mix. Entries never change after they
are made; an upload replaces the entry, it never edits one in place.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from recast_core.artifact import ArtifactSpec, TaskArtifact, read_artifact
from recast_core.errors import ArtifactError
from server.errors import ArtifactRejected, NotReady, UnknownTask
from server.heads import Head, HeadCache, Superseded
from server.stores.base import StoredTask
from server.task_ids import DEFAULT_TENANT, SEPARATOR, check_stored_id, check_task_id, split_stored_id

DEFAULT_HEAD_BYTES = 1 << 30

__all__ = ["TaskEntry", "TaskRegistry", "check_task_id"]


@dataclass(frozen=True, eq=False)
class TaskEntry:
    """One version of a task, without its head (held by the registry's HeadCache, keyed by `digest`)."""

    task_id: str
    version: int
    coefficients: torch.Tensor  # (M, n)
    labels: tuple[str, ...]
    head_parameters: int
    size_bytes: int
    updated: str
    digest: str  # sha256 of the artifact bytes
    created: str
    bank_fingerprint: str
    training: dict[str, Any]

    @classmethod
    def of(cls, stored: StoredTask, artifact: TaskArtifact, digest: str) -> TaskEntry:
        assert stored.data is not None
        return cls(
            task_id=stored.task_id,
            version=stored.version,
            coefficients=artifact.coefficients,
            labels=artifact.labels,
            head_parameters=artifact.head_parameters,
            size_bytes=len(stored.data),
            updated=stored.updated,
            digest=digest,
            created=artifact.created,
            bank_fingerprint=artifact.bank_fingerprint,
            training=artifact.training,
        )

    @property
    def cache_key(self) -> str:
        """Names this artifact's composed weights: content-addressed, so never reused for other numbers."""
        return self.digest

    @property
    def trainable_parameters(self) -> int:
        return int(self.coefficients.numel())


class TaskRegistry:
    """Task id -> current TaskEntry, validated against the resident bank's `spec`. Thread-safe.

    The store assigns versions; the registry keeps, per task id, the newest version it has been given
    (deletes included, as tombstones), so changes arriving late or twice never roll a task back.
    """

    def __init__(self, spec: ArtifactSpec, heads: HeadCache | None = None) -> None:
        self.spec = spec
        self.heads = heads if heads is not None else HeadCache(DEFAULT_HEAD_BYTES)
        self._entries: dict[str, TaskEntry] = {}
        self._versions: dict[str, int] = {}  # newest version seen per id, tombstones included
        # live ids of each tenant in order: built on the first page() (not during bulk loads), then kept
        # sorted incrementally
        self._sorted: dict[str, list[str]] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def validate(self, data: bytes) -> TaskArtifact:
        """Parse `data` as an artifact for this bank; ArtifactRejected names what is wrong."""
        try:
            return read_artifact(data, spec=self.spec)
        except ArtifactError as exc:
            raise ArtifactRejected(str(exc), exc.error_type) from None

    def apply(self, stored: StoredTask, artifact: TaskArtifact | None = None) -> TaskEntry | None:
        """Install a stored version (or remove the task for a tombstone) unless a newer one is known.

        `artifact` is the already validated parse of stored.data (validated here when omitted). Returns the
        installed entry, or None for a tombstone or a version that is not newer.
        """
        check_stored_id(stored.task_id)
        if stored.version <= self.known_version(stored.task_id):  # cheap check before any parsing
            return None
        entry = None
        if stored.data is not None:
            artifact = artifact if artifact is not None else self.validate(stored.data)
            entry = TaskEntry.of(stored, artifact, hashlib.sha256(stored.data).hexdigest())
            self.heads.put(entry.digest, (artifact.head_weight, artifact.head_bias))
        with self._lock:
            if stored.version <= self._versions.get(stored.task_id, 0):
                return None
            self._versions[stored.task_id] = stored.version
            if entry is None:
                if self._entries.pop(stored.task_id, None) is not None and self._sorted is not None:
                    ids = self._sorted[split_stored_id(stored.task_id)[0]]
                    del ids[bisect.bisect_left(ids, stored.task_id)]
            else:
                if stored.task_id not in self._entries and self._sorted is not None:
                    bisect.insort(
                        self._sorted.setdefault(split_stored_id(stored.task_id)[0], []), stored.task_id
                    )
                self._entries[stored.task_id] = entry
        return entry

    def head(self, entry: TaskEntry) -> Head:
        """The entry's classifier head (cached, or read back from the store; raises Superseded)."""
        return self.heads.head(entry)

    def resolve(self, task_id: str) -> tuple[TaskEntry, Head]:
        """The task's current entry with its head; a version replaced while loading yields the newer one."""
        for _ in range(3):
            entry = self.get(task_id)
            try:
                return entry, self.head(entry)
            except Superseded:
                continue
        raise NotReady(
            f"task {split_stored_id(task_id)[1]!r} is being replaced faster than it can be loaded",
            retry_after=1,
        )

    def known_version(self, task_id: str) -> int:
        """The newest version seen for the id (0: never), a tombstone's included."""
        return self._versions.get(task_id, 0)

    def get(self, task_id: str) -> TaskEntry:
        entry = self._entries.get(task_id)
        if entry is None:
            raise UnknownTask(f"no task {split_stored_id(task_id)[1]!r}")
        return entry

    def snapshot(self, task_ids: Iterable[str]) -> dict[str, TaskEntry]:
        """The current entry of each id (one consistent read); UnknownTask for the first missing id."""
        with self._lock:
            entries = dict(self._entries)
        found = {}
        for task_id in task_ids:
            if task_id not in entries:
                raise UnknownTask(f"no task {split_stored_id(task_id)[1]!r}")
            found[task_id] = entries[task_id]
        return found

    def page(
        self, after: str = "", limit: int = 100, tenant: str = DEFAULT_TENANT
    ) -> tuple[list[TaskEntry], int]:
        """At most `limit` of `tenant`'s entries in task id order, after the task id `after`; and their count.

        The first call sorts every id (about a second for a million): call it off the event loop."""
        with self._lock:
            if self._sorted is None:
                self._sorted = {}
                for stored_id in sorted(self._entries):
                    self._sorted.setdefault(split_stored_id(stored_id)[0], []).append(stored_id)
            ids = self._sorted.get(tenant, [])
            prefix = "" if tenant == DEFAULT_TENANT else tenant + SEPARATOR
            start = bisect.bisect_right(ids, prefix + after) if after else 0
            entries = [self._entries[i] for i in ids[start : start + limit]]
            return entries, len(ids)
