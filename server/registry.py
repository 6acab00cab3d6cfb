"""Every task the server can serve, by id: immutable versioned entries swapped atomically.

A request takes one `TaskEntry` (coefficients, head, labels, version) and uses only it, so it is answered
wholly by the old or wholly by the new version of a task, never by a mix. Entries never change after they
are made; an upload replaces the entry, it never edits one in place.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from recast_core.artifact import ArtifactSpec, TaskArtifact, read_artifact
from recast_core.errors import ArtifactError
from server.errors import ArtifactRejected, InvalidTaskId, UnknownTask, VersionConflict

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

    @property
    def cache_key(self) -> tuple[str, int]:
        """Names this version's composed weights: never reused for other coefficients."""
        return (self.task_id, self.version)

    @property
    def coefficients(self) -> torch.Tensor:
        return self.artifact.coefficients

    @property
    def labels(self) -> tuple[str, ...]:
        return self.artifact.labels


class TaskRegistry:
    """Task id -> current TaskEntry, validated against the resident bank's `spec`. Thread-safe."""

    def __init__(self, spec: ArtifactSpec) -> None:
        self.spec = spec
        self._entries: dict[str, TaskEntry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def validate(self, data: bytes) -> TaskArtifact:
        """Parse `data` as an artifact for this bank; ArtifactRejected names what is wrong."""
        try:
            return read_artifact(data, spec=self.spec)
        except ArtifactError as exc:
            raise ArtifactRejected(str(exc), exc.error_type) from None

    def put(
        self, task_id: str, artifact: TaskArtifact, size_bytes: int, *, if_match: int | None = None
    ) -> TaskEntry:
        """Make `artifact` the task's next version; with if_match, only if the current version is that."""
        check_task_id(task_id)
        with self._lock:
            current = self._entries.get(task_id)
            version = current.version if current else 0
            if if_match is not None and if_match != version:
                raise VersionConflict(f"task {task_id!r} is at version {version}, not {if_match}")
            entry = TaskEntry(task_id, version + 1, artifact, size_bytes, _now())
            self._entries[task_id] = entry
            return entry

    def restore(self, entry: TaskEntry) -> None:
        """Install an entry read back from a store (keeps its version; a newer one already here wins)."""
        with self._lock:
            current = self._entries.get(entry.task_id)
            if current is None or current.version < entry.version:
                self._entries[entry.task_id] = entry

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

    def delete(self, task_id: str, *, if_match: int | None = None) -> TaskEntry:
        with self._lock:
            current = self._entries.get(task_id)
            if current is None:
                raise UnknownTask(f"no task {task_id!r}")
            if if_match is not None and if_match != current.version:
                raise VersionConflict(f"task {task_id!r} is at version {current.version}, not {if_match}")
            del self._entries[task_id]
            return current

    def page(self, offset: int = 0, limit: int = 100) -> tuple[list[TaskEntry], int]:
        """Entries sorted by id, from `offset`, at most `limit`; and the total count."""
        with self._lock:
            ids = sorted(self._entries)
            entries = [self._entries[i] for i in ids[offset : offset + limit]]
        return entries, len(ids)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
