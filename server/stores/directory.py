"""The default store: one directory per task under a root, one file per version, written atomically.

    <root>/<task_id>/<version:012d>.safetensors   a live version (the artifact bytes as uploaded)
    <root>/<task_id>/<version:012d>.deleted       a tombstone (empty file)

A write goes to a temp file in the task's directory, is fsynced, renamed into place and the directory is
fsynced; only then are older versions removed. A crash at any point leaves the previous version (or the new
one) whole: readers take the highest complete version and ignore temp files, which the next start removes.
One process owns a directory (it holds an exclusive lock on `<root>/.lock`); replicas use PostgreSQL.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from recast_core.files import write_atomic
from server.errors import StoreError, UnknownTask, VersionConflict
from server.stores.base import StoredTask, TaskStore
from server.task_ids import check_stored_id, is_stored_id, split_stored_id

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
        self._remove_temp_files()

    def put(self, task_id: str, data: bytes, *, if_match: int | None = None) -> StoredTask:
        check_stored_id(task_id)
        with self._task_lock(task_id):
            current = self._newest(task_id)
            live = 0 if current is None or current[1] == TOMBSTONE else current[0]
            if if_match is not None and if_match != live:
                raise VersionConflict(
                    f"task {split_stored_id(task_id)[1]!r} is at version {live}, not {if_match}"
                )
            version = 1 if current is None else current[0] + 1
            path = self._write(task_id, version, LIVE, data)
            return StoredTask(task_id, version, data, _mtime(path))

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
            path = self._write(task_id, current[0] + 1, TOMBSTONE, b"")
            return StoredTask(task_id, current[0] + 1, None, _mtime(path))

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

    def close(self) -> None:
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

    def _write(self, task_id: str, version: int, suffix: str, data: bytes) -> Path:
        directory = self.root / task_id
        target = directory / f"{version:012d}{suffix}"
        try:
            directory.mkdir(exist_ok=True)
            write_atomic(target, data)
            _fsync_dir(directory)
            _fsync_dir(self.root)
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

    def _remove_temp_files(self) -> None:
        for tmp in self.root.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="milliseconds")
