"""The default store: one directory per task under a root, one file per version, written atomically.

    <root>/<task_id>/<version:012d>.safetensors   a live version (the artifact bytes as uploaded)
    <root>/<task_id>/<version:012d>.deleted       a tombstone (empty file)
    <root>/.index/                                every task's summary (server/stores/journal.py)

A write goes to a temp file in the task's directory, is fsynced, renamed into place and the directory is
fsynced; only then are older versions removed. A crash at any point leaves the previous version (or the new
one) whole: readers take the highest complete version and ignore temp files, which the next start removes.
Every write records the task's index row first (journaled, fsynced), so start-up reads one index instead
of every artifact. A version file's mtime is its `updated` time (milliseconds), in the index as well.
One process owns a directory (it holds an exclusive lock on `<root>/.lock`); replicas use PostgreSQL.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from recast_core.files import write_atomic
from server.errors import StoreError, UnknownTask, VersionConflict
from server.ids import check_stored_id, is_stored_id, split_stored_id
from server.stores import index as task_index
from server.stores.base import StoredTask, TaskStore
from server.stores.index import IndexRow, Summary, TaskIndex, row_of
from server.stores.journal import StoreIndex
from server.stores.records import fsync_dir

log = logging.getLogger(__name__)
LIVE, TOMBSTONE = ".safetensors", ".deleted"


class DirectoryStore(TaskStore):
    kind = "directory"

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(root / ".lock", "a+")  # noqa: SIM115 (held for the store's lifetime)
        except OSError as exc:
            raise StoreError(f"cannot use {root} as a task store: {exc}") from None
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise StoreError(
                f"task store {root} is in use by another process (one server per directory; "
                "use a PostgreSQL store for several replicas)"
            ) from None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        try:
            self._index = StoreIndex(root, _Disk(self))
        except BaseException:
            self.close()
            raise

    def put(
        self, task_id: str, data: bytes, *, if_match: int | None = None, summary: Summary | None = None
    ) -> StoredTask:
        check_stored_id(task_id)
        with self._task_lock(task_id):
            current = self._newest(task_id)
            live = 0 if current is None or current[1] == TOMBSTONE else current[0]
            if if_match is not None and if_match != live:
                raise VersionConflict(
                    f"task {split_stored_id(task_id)[1]!r} is at version {live}, not {if_match}"
                )
            version = 1 if current is None else current[0] + 1
            updated_ns = time.time_ns() // 1_000_000 * 1_000_000
            updated = _iso(updated_ns)
            row = (
                row_of(task_id, version, updated, data)
                if summary is None
                else IndexRow(task_id, version, updated, task_index.LIVE, summary)
            )
            with self._index.writing(row):
                self._write(task_id, version, LIVE, data, updated_ns)
            return StoredTask(task_id, version, data, updated)

    def delete(self, task_id: str, *, if_match: int | None = None) -> StoredTask:
        check_stored_id(task_id)
        with self._task_lock(task_id):
            current = self._newest(task_id)
            if current is None or current[1] == TOMBSTONE:
                raise UnknownTask(f"no task {split_stored_id(task_id)[1]!r}")
            if if_match is not None and if_match != current[0]:
                raise VersionConflict(
                    f"task {split_stored_id(task_id)[1]!r} is at version {current[0]}, not {if_match}"
                )
            version = current[0] + 1
            updated_ns = time.time_ns() // 1_000_000 * 1_000_000
            updated = _iso(updated_ns)
            with self._index.writing(IndexRow(task_id, version, updated, task_index.TOMBSTONE)):
                self._write(task_id, version, TOMBSTONE, b"", updated_ns)
            return StoredTask(task_id, version, None, updated)

    def get(self, task_id: str) -> StoredTask | None:
        check_stored_id(task_id)
        with self._task_lock(task_id):
            return self._read(task_id)

    def scan(self) -> Iterator[StoredTask]:
        try:
            names = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        except OSError as exc:
            raise StoreError(f"cannot list task store {self.root}: {exc}") from None
        for task_id in names:
            if not is_stored_id(task_id):  # lost+found, dot files: not ours
                continue
            stored = self._read(task_id)
            if stored is not None:
                yield stored

    def read_index(self, progress: bool = False) -> TaskIndex:
        return self._index.read(progress)

    def close(self) -> None:
        index = getattr(self, "_index", None)
        if index is not None:
            index.close()
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()

    # internals

    def _task_lock(self, task_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(task_id, threading.Lock())

    def _newest(self, task_id: str) -> tuple[int, str] | None:
        """(version, suffix) of the task's highest complete version file."""
        best: tuple[int, str] | None = None
        try:
            entries = os.listdir(self.root / task_id)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read task {task_id!r} from {self.root}: {exc}") from None
        for name in entries:
            stem, dot, suffix = name.partition(".")
            if dot and stem.isdigit() and f".{suffix}" in (LIVE, TOMBSTONE):
                version = int(stem)
                if best is None or version > best[0]:
                    best = (version, f".{suffix}")
        return best

    def _read(self, task_id: str) -> StoredTask | None:
        newest = self._newest(task_id)
        if newest is None:
            return None
        version, suffix = newest
        path = self.root / task_id / f"{version:012d}{suffix}"
        try:
            data = None if suffix == TOMBSTONE else path.read_bytes()
            return StoredTask(task_id, version, data, _mtime(path))
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None

    def _write(self, task_id: str, version: int, suffix: str, data: bytes, mtime_ns: int) -> Path:
        directory = self.root / task_id
        target = directory / f"{version:012d}{suffix}"
        try:
            directory.mkdir(exist_ok=True)
            write_atomic(target, data)
            os.utime(target, ns=(mtime_ns, mtime_ns))
            fsync_dir(directory)
            fsync_dir(self.root)
        except OSError as exc:
            if target.exists():  # renamed but not known durable: take it back so nothing changed
                with contextlib.suppress(OSError):
                    target.unlink()
            raise StoreError(f"cannot write task {task_id!r} to {self.root}: {exc}") from None
        try:  # older versions are superseded once the new one is durable; leftovers are harmless
            for name in os.listdir(directory):
                stem = name.partition(".")[0]
                if stem.isdigit() and int(stem) < version:
                    os.unlink(directory / name)
        except OSError as exc:
            log.warning("could not remove superseded versions", extra={"task_id": task_id, "error": str(exc)})
        return target


class _Disk:
    """The store's files as the index sees them (server.stores.journal.Disk); takes no task locks (the
    index calls it while no write is in flight, or from within the write of that very task)."""

    def __init__(self, store: DirectoryStore) -> None:
        self.store, self.root = store, store.root

    def task_names(self) -> list[str]:
        try:
            with os.scandir(self.root) as entries:
                return [e.name for e in entries if e.name[0] != "." and e.is_dir() and is_stored_id(e.name)]
        except OSError as exc:
            raise StoreError(f"cannot list task store {self.root}: {exc}") from None

    def newest(self, task_id: str) -> tuple[int, int, int] | None:
        directory = self.root / task_id
        self._remove_temp_files(directory)
        newest = self.store._newest(task_id)
        if newest is None:
            return None
        version, suffix = newest
        if suffix == TOMBSTONE:
            return (version, task_index.TOMBSTONE, 0)
        try:
            return (version, task_index.LIVE, os.stat(directory / f"{version:012d}{suffix}").st_size)
        except FileNotFoundError:
            return None

    def row(self, task_id: str) -> IndexRow | None:
        self._remove_temp_files(self.root / task_id)
        stored = self.store._read(task_id)
        return None if stored is None else row_of(task_id, stored.version, stored.updated, stored.data)

    def remove_if_empty(self, task_id: str) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(self.root / task_id)

    @staticmethod
    def _remove_temp_files(directory: Path) -> None:
        """Temp files of writes interrupted by a crash (the index names every task that may have one)."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for name in os.listdir(directory):
                if name.startswith(".") and name.endswith(".tmp"):
                    (directory / name).unlink(missing_ok=True)


def _mtime(path: Path) -> str:
    return _iso(path.stat().st_mtime_ns)


def _iso(ns: int) -> str:
    """A time in nanoseconds as ISO 8601 UTC, to the millisecond (exactly: no float rounding)."""
    ms = ns // 1_000_000
    return (
        datetime.fromtimestamp(ms // 1000, UTC)
        .replace(microsecond=ms % 1000 * 1000)
        .isoformat(timespec="milliseconds")
    )
