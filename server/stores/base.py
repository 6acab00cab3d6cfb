"""The store interface every backend implements, and `open_store` to pick one from a setting.

Versions are assigned by the store and never reused for a task id: every upload and every delete takes the
next number (a delete leaves a tombstone holding its version). Replicas therefore agree on which of two
changes is newer, and a registry can always keep the newest one it has seen, whatever order changes arrive.

Start-up reads `read_index()`: every task's summary (server/stores/index.py), which stores keep next to the
artifacts at write time, so a million tasks load without parsing a million artifacts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tqdm import tqdm

from server.stores.index import IndexBuilder, Summary, TaskIndex, row_of


@dataclass(frozen=True)
class StoredTask:
    """One version of a task: the artifact bytes as uploaded (`data` is None for a tombstone)."""

    task_id: str
    version: int
    data: bytes | None
    updated: str  # ISO 8601, UTC

    @property
    def deleted(self) -> bool:
        return self.data is None


@dataclass(frozen=True)
class Change:
    """A store notification: task `task_id` now has version `version` (maybe a tombstone: the catalog
    reads the version from the store)."""

    task_id: str
    version: int


class TaskStore(ABC):
    """Durable task artifacts. Thread-safe; every method may block on I/O (call it off the event loop)."""

    #: a short name for logs and /v1/backbone ("directory", "postgresql")
    kind: str = ""

    @abstractmethod
    def put(
        self, task_id: str, data: bytes, *, if_match: int | None = None, summary: Summary | None = None
    ) -> StoredTask:
        """Store `data` as the task's next version, durably, before returning it.

        if_match: only if the task's live version is exactly this (0: the task must not exist);
        otherwise server.errors.VersionConflict. A failure leaves the previous version intact.
        summary: of `data` (server.stores.index.summary_of), when the caller has parsed it already;
        otherwise the store parses `data` for its index (bytes that are no artifact are indexed unreadable).
        """

    @abstractmethod
    def delete(self, task_id: str, *, if_match: int | None = None) -> StoredTask:
        """Replace the live task by a tombstone with the next version; UnknownTask if there is none."""

    @abstractmethod
    def get(self, task_id: str) -> StoredTask | None:
        """The newest version of one task (a tombstone if deleted), or None if never stored."""

    @abstractmethod
    def scan(self) -> Iterator[StoredTask]:
        """Every task's newest version, tombstones included, in no particular order."""

    def read_index(self, progress: bool = False) -> TaskIndex:
        """Every task's newest version as an index row, tombstones included (start-up, resync).

        Rows of stored ids that are not valid ids are left out. This fallback parses every artifact;
        stores keep an index instead."""
        builder = IndexBuilder()
        for stored in tqdm(self.scan(), desc="indexing tasks", unit="task", disable=not progress):
            builder.add(row_of(stored.task_id, stored.version, stored.updated, stored.data))
        return builder.build()

    @property
    def healthy(self) -> bool:
        """Whether the store is reachable and this process is hearing its changes (readiness).

        A store with a single writer and no connection (the directory store) always is."""
        return True

    def watch(self, on_change: Callable[[Change], None], on_resync: Callable[[], None]) -> None:  # noqa: B027
        """Deliver other writers' changes from a background thread until `close`.

        on_resync is called after a lost connection is restored (changes may have been missed: rescan).
        A store that has a single writer (the directory store) has nothing to deliver.
        """

    def close(self) -> None:  # noqa: B027
        """Stop watching and release connections."""


def open_store(location: str) -> TaskStore:
    """`postgresql://...` (or `postgres://`) -> PostgreSQL store; anything else is a directory path."""
    if location.startswith(("postgresql://", "postgres://")):
        from server.stores.postgres import PostgresStore

        return PostgresStore(location)
    from pathlib import Path

    from server.stores.directory import DirectoryStore

    return DirectoryStore(Path(location))
