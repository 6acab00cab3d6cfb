"""Every task the server can serve, by id: immutable versioned entries swapped atomically.

A request takes one `TaskEntry` (coefficients, head, labels, version) and uses only it, so it is answered
wholly by the old or wholly by the new version of a task, never by a mix. Entries never change after they
are made; an upload replaces the entry, it never edits one in place.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from recast_core.artifact import ArtifactSpec, TaskArtifact, read_artifact
from recast_core.errors import ArtifactError
from server.errors import ArtifactRejected, InvalidTaskId, UnknownTask
from server.stores.base import StoredTask

TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_task_id(task_id: str) -> str:
    if not TASK_ID.fullmatch(task_id):
        raise InvalidTaskId(
            f"task id {task_id[:140]!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}} (1-128 characters)"
        )
    return task_id


@dataclass(frozen=True, eq=False)
class TaskEntry:
    task_id: str
    version: int
    artifact: TaskArtifact
    size_bytes: int
    updated: str
    digest: str  # sha256 of the artifact bytes

    @property
    def cache_key(self) -> str:
        """Names this artifact's composed weights: content-addressed, so never reused for other numbers."""
        return self.digest

    @property
    def coefficients(self) -> torch.Tensor:
        return self.artifact.coefficients

    @property
    def labels(self) -> tuple[str, ...]:
        return self.artifact.labels


class TaskRegistry:
    """Task id -> current TaskEntry, validated against the resident bank's `spec`. Thread-safe.

    The store assigns versions; the registry keeps, per task id, the newest version it has been given
    (deletes included, as tombstones), so changes arriving late or twice never roll a task back.
    """

    def __init__(self, spec: ArtifactSpec) -> None:
        self.spec = spec
        self._entries: dict[str, TaskEntry] = {}
        self._versions: dict[str, int] = {}  # newest version seen per id, tombstones included
        self._sorted: list[str] | None = []  # live ids in order, rebuilt lazily when the set of ids changes
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
        check_task_id(stored.task_id)
        entry = None
        if stored.data is not None:
            artifact = artifact if artifact is not None else self.validate(stored.data)
            digest = hashlib.sha256(stored.data).hexdigest()
            entry = TaskEntry(
                stored.task_id, stored.version, artifact, len(stored.data), stored.updated, digest
            )
        with self._lock:
            if stored.version <= self._versions.get(stored.task_id, 0):
                return None
            self._versions[stored.task_id] = stored.version
            if entry is None:
                if self._entries.pop(stored.task_id, None) is not None:
                    self._sorted = None
            else:
                if stored.task_id not in self._entries:
                    self._sorted = None
                self._entries[stored.task_id] = entry
        return entry

    def known_version(self, task_id: str) -> int:
        """The newest version seen for the id (0: never), a tombstone's included."""
        return self._versions.get(task_id, 0)

    def get(self, task_id: str) -> TaskEntry:
        entry = self._entries.get(task_id)
        if entry is None:
            raise UnknownTask(f"no task {task_id!r}")
        return entry

    def snapshot(self, task_ids: Iterable[str]) -> dict[str, TaskEntry]:
        """The current entry of each id (one consistent read); UnknownTask for the first missing id."""
        with self._lock:
            entries = dict(self._entries)
        found = {}
        for task_id in task_ids:
            if task_id not in entries:
                raise UnknownTask(f"no task {task_id!r}")
            found[task_id] = entries[task_id]
        return found

    def page(self, after: str = "", limit: int = 100) -> tuple[list[TaskEntry], int]:
        """At most `limit` entries in id order, starting after the id `after`; and the total count."""
        with self._lock:
            if self._sorted is None:
                self._sorted = sorted(self._entries)
            start = bisect.bisect_right(self._sorted, after) if after else 0
            entries = [self._entries[i] for i in self._sorted[start : start + limit]]
            return entries, len(self._sorted)
