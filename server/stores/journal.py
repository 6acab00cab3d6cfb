"""The directory store's task index on disk: a snapshot plus a journal of every write since.

    <root>/.index/snapshot       a TaskIndex (server/stores/index.py) of generation G, sha256-checked,
                                 replaced atomically (temp file, fsync, rename, fsync of the directory)
    <root>/.index/journal-<N>    rows appended since, one file per generation N = G, G+1, ... (no gaps)

A journal record is `u32 length | u32 crc32 | row` (`encode`). The index is the snapshot, then every
journal in order, a later row of a task replacing an earlier one (a FORGET row drops the task).

A put or delete of task T at version N (DirectoryStore) goes:
  1. append T's row of version N to the current journal and fsync it (the row exists before the file)
  2. write the version file atomically, fsync the directories, acknowledge
  3. if 2 failed: append a row of what T's directory holds (the old state) instead
So the disk never holds a version the index does not know. A crash between 1 and 2 leaves a row of a
version without a file, and a crash during 1 a torn last record (never acknowledged): opening cuts the
torn record off and checks every task named in the journals against its directory (one listdir each,
which also removes temp files of interrupted writes), fixing rows that differ from the disk.

Nothing else is trusted blindly: at the first read a snapshot or journal failing its checksum, a missing
journal generation, task directories that differ from the index beyond a few (a writer that did not keep
the index: an older server, a restore) or a random sample of rows not matching their directories make the
index be rebuilt from a full scan (every artifact parsed, with a progress bar); a few differences are fixed
from the disk. A journal write that fails removes the snapshot, so the next start rebuilds.

Compaction writes snapshot + journals as the snapshot of the next generation: new writes first switch to
a new journal (once the writes in flight are done, so closed journals hold finished writes only), then the
merge runs in the background and replaces the snapshot. A crash at any point leaves a readable state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from recast_core.files import write_temp
from server.errors import StoreError
from server.stores.index import LIVE, TOMBSTONE, IndexBuilder, IndexRow, TaskIndex, read_header
from server.stores.records import (
    FORGET,
    Gate,
    encode,
    fsync_dir,
    merge,
    read_records,
    write_file,
)

log = logging.getLogger(__name__)

SNAPSHOT, JOURNAL = "snapshot", "journal-"
COMPACT_MIN_RECORDS = 4096  # compact once the journals hold this many rows and a quarter of the snapshot's
SAMPLE_ROWS = 32  # rows checked against their directories at the first read
MAX_FIXES = 64  # directories differing from the index that are fixed one by one; beyond (and 1 %): rebuild


class Disk(Protocol):
    """What the index needs of the directory store: the truth it is checked against and rebuilt from."""

    def task_names(self) -> list[str]:
        """Every task directory's name (stored ids only)."""

    def newest(self, task_id: str) -> tuple[int, int, int] | None:
        """(version, LIVE or TOMBSTONE, size) of the task's newest version file; removes temp files."""

    def row(self, task_id: str) -> IndexRow | None:
        """The index row of the task's newest version (its artifact parsed), None if it has none."""

    def remove_if_empty(self, task_id: str) -> None: ...


def write_index(root: Path, rows: Iterable[IndexRow]) -> None:
    """A fresh index of generation 1 for a store directory whose task directories hold exactly `rows`
    (for tools and benchmarks that write a store's layout directly)."""
    directory = root / ".index"
    directory.mkdir(parents=True, exist_ok=True)
    write_file(directory / SNAPSHOT, IndexBuilder().extend(rows).build().to_chunks(1))
    (directory / f"{JOURNAL}1").touch()
    fsync_dir(directory)


class StoreIndex:
    """The index of one store directory; thread-safe (the directory store's writers call `writing`)."""

    def __init__(self, root: Path, disk: Disk) -> None:
        self.directory, self._disk = root / ".index", disk
        self._lock = threading.Lock()  # journal descriptor, offsets, counters
        self._files = threading.Lock()  # which files make up the index (compaction vs readers)
        self._gate = Gate()  # writes in flight (shared) vs switching journals (exclusive)
        self._fd = -1  # the current journal, open for appends; -1: writes skip the index
        self._generation = self._journal = 0  # of the snapshot, of the current journal
        self._end = 0  # bytes of whole records in the current journal
        self._records = self._snapshot_rows = 0  # rows in the journals since the snapshot, rows in it
        self._problem: str | None = None  # why the first read must rebuild
        self._verified = False
        self._compactor: threading.Thread | None = None
        try:
            self._open()
        except OSError as exc:
            raise StoreError(f"cannot open the task index in {self.directory}: {exc}") from None

    # the directory store's side

    @contextlib.contextmanager
    def writing(self, row: IndexRow) -> Iterator[None]:
        """Around writing one version file: its row first (durable), a row of the disk's state on failure."""
        with self._gate.shared():
            journaled = self._append(encode(row))
            try:
                yield
            except BaseException:
                if journaled:
                    self._restore(row.task_id)
                raise
        self._maybe_compact()

    def read(self, progress: bool = False) -> TaskIndex:
        """Every task's row: checked against the disk (and rebuilt if need be) the first time."""
        if not self._verified:
            with self._gate.exclusive():
                if not self._verified:
                    index = self._first_read(progress)
                    self._verified = True
                    return index
        with self._files:
            snapshot, rows = self._load(*self._current())
        return merge(snapshot, rows)

    def close(self) -> None:
        compactor = self._compactor
        if compactor is not None:
            compactor.join()
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # opening

    def _open(self) -> None:
        self.directory.mkdir(exist_ok=True)
        for tmp in self.directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        journals = sorted(
            int(p.name[len(JOURNAL) :])
            for p in self.directory.glob(f"{JOURNAL}*")
            if p.name[len(JOURNAL) :].isdigit()
        )
        try:
            with open(self.directory / SNAPSHOT, "rb") as handle:
                header, _ = read_header(handle.read(64 << 10))
            self._generation, self._snapshot_rows = int(header["generation"]), int(header["rows"])
        except FileNotFoundError:
            if not journals and not self._disk.task_names():  # a new store: an empty index
                self._start_generation(1, TaskIndex.empty())
                self._verified = True
                return
            self._problem = "there is no index yet" if not journals else "the snapshot is missing"
            self._journal = max(journals, default=0)
            return
        except ValueError as exc:
            self._problem, self._journal = f"the snapshot is unreadable ({exc})", max(journals, default=0)
            return
        for old in (g for g in journals if g < self._generation):  # left by a compaction that finished
            (self.directory / f"{JOURNAL}{old}").unlink(missing_ok=True)
        live = [g for g in journals if g >= self._generation]
        self._journal = max(live, default=self._generation)
        if live != list(range(self._generation, self._generation + len(live))) or not live:
            self._problem = f"journal generations {live} do not follow snapshot generation {self._generation}"
            return
        rows = self._read_journals(live)
        if rows is None:
            return
        self._fd = os.open(self.directory / f"{JOURNAL}{self._journal}", os.O_WRONLY | os.O_APPEND)
        self._records = len(rows)
        self._check_written(rows)

    def _read_journals(self, generations: list[int]) -> list[IndexRow] | None:
        rows: list[IndexRow] = []
        for generation in generations:
            path = self.directory / f"{JOURNAL}{generation}"
            data = path.read_bytes()
            found, end, torn = read_records(data)
            rows += found
            if end == len(data):
                continue
            if generation != generations[-1] or not torn:
                self._problem = f"journal {path.name} is corrupt at byte {end}"
                return None
            log.warning(
                "cutting off a torn journal record (a write interrupted before it was acknowledged)",
                extra={"journal": str(path), "offset": end, "bytes": len(data) - end},
            )
            with open(path, "r+b") as handle:
                handle.truncate(end)
                os.fsync(handle.fileno())
        self._end = end
        return rows

    def _check_written(self, rows: list[IndexRow]) -> None:
        """Tasks written since the snapshot: each row against its directory; rows that differ are fixed."""
        latest = {row.task_id: row for row in rows}
        fixes = [fix for task_id, row in latest.items() if (fix := self._check(task_id, row)) is not None]
        if fixes:
            log.warning("fixing index rows of writes interrupted by a crash", extra={"tasks": len(fixes)})
            for fix in fixes:
                self._append(encode(fix))

    def _check(self, task_id: str, row: IndexRow | None) -> IndexRow | None:
        """None if the row matches the task's directory, else the row the disk gives (or a FORGET row)."""
        on_disk = self._disk.newest(task_id)
        if on_disk == _expected(row):
            return None
        if on_disk is None:
            self._disk.remove_if_empty(task_id)
            return None if row is None else IndexRow(task_id, 0, "", FORGET)
        return self._disk.row(task_id) or IndexRow(task_id, 0, "", FORGET)

    # the first read

    def _first_read(self, progress: bool) -> TaskIndex:
        if self._problem is not None:
            return self._rebuild(progress, self._problem)
        try:
            with self._files:
                snapshot, rows = self._load(*self._current())
        except (OSError, ValueError) as exc:
            return self._rebuild(progress, f"the index is unreadable ({exc})")
        index = merge(snapshot, rows)
        names, ids = set(self._disk.task_names()), set(index.ids)
        differ = (names - ids) | (ids - names)
        if len(differ) > max(MAX_FIXES, len(index) // 100):
            return self._rebuild(progress, f"{len(differ)} task directories differ from the index")
        sample = random.sample(range(len(index)), min(2 * SAMPLE_ROWS, len(index)))
        for i in [i for i in sample if index.ids[i] not in differ][:SAMPLE_ROWS]:
            if self._disk.newest(index.ids[i]) != _expected(index.row(i)):
                return self._rebuild(progress, f"task {index.ids[i]!r} differs from its index row")
        fixes = []
        if differ:
            rows_of = {task_id: index.row(n) for n, task_id in enumerate(index.ids) if task_id in differ}
            fixes = [fix for t in sorted(differ) if (fix := self._check(t, rows_of.get(t))) is not None]
            if fixes:
                log.warning(
                    "fixing index rows of task directories changed behind its back",
                    extra={"tasks": len(fixes)},
                )
                index = merge(index, fixes)
        if rows or fixes:
            self._start_generation(self._journal + 1, index)
        return index

    def _rebuild(self, progress: bool, reason: str) -> TaskIndex:
        log.warning("rebuilding the task index from a full scan of the store", extra={"reason": reason})
        builder = IndexBuilder()
        for task_id in tqdm(
            self._disk.task_names(), desc="indexing tasks", unit="task", disable=not progress, mininterval=2
        ):
            row = self._disk.row(task_id)
            if row is None:
                self._disk.remove_if_empty(task_id)
            else:
                builder.add(row)
        index = builder.build()
        self._start_generation(max(self._journal, self._generation) + 1, index)
        self._problem = None
        log.info("task index rebuilt", extra={"tasks": len(index), "generation": self._generation})
        return index

    # files

    def _start_generation(self, generation: int, index: TaskIndex) -> None:
        """Writes switch to journal `generation`, then `index` becomes its snapshot (caller holds the gate
        exclusively, or nothing else runs yet)."""
        self._switch_journal(generation)
        self._publish(index, generation, self._records)

    def _switch_journal(self, generation: int) -> None:
        path = self.directory / f"{JOURNAL}{generation}"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fsync_dir(self.directory)
        with self._lock:
            old, self._fd, self._journal, self._end = self._fd, fd, generation, 0
        if old >= 0:
            os.close(old)

    def _publish(self, index: TaskIndex, generation: int, merged_records: int) -> None:
        """`index` (the state up to journal `generation`) becomes the snapshot; older journals go."""
        tmp = write_temp(self.directory / SNAPSHOT, index.to_chunks(generation))
        with self._files:
            if generation <= self._generation:  # a newer snapshot was published meanwhile
                os.unlink(tmp)
                return
            os.replace(tmp, self.directory / SNAPSHOT)
            fsync_dir(self.directory)
            for path in self.directory.glob(f"{JOURNAL}*"):
                suffix = path.name[len(JOURNAL) :]
                if suffix.isdigit() and int(suffix) < generation:
                    path.unlink(missing_ok=True)
            with self._lock:
                self._generation, self._snapshot_rows = generation, len(index)
                self._records -= merged_records

    def _load(self, first: int, last: int, end: int) -> tuple[TaskIndex, list[IndexRow]]:
        """The snapshot and the rows of journals first..last (the last one up to `end`); ValueError if any
        of it is corrupt."""
        snapshot, generation = TaskIndex.from_buffer((self.directory / SNAPSHOT).read_bytes())
        if generation != first:
            raise ValueError(f"snapshot generation {generation}, expected {first}")
        rows: list[IndexRow] = []
        for journal in range(first, last + 1):
            data = (self.directory / f"{JOURNAL}{journal}").read_bytes()
            data = data[:end] if journal == last else data
            found, stop, _ = read_records(data)
            if stop != len(data):
                raise ValueError(f"journal {journal} is corrupt at byte {stop}")
            rows += found
        return snapshot, rows

    def _current(self) -> tuple[int, int, int]:
        """(snapshot generation, current journal, its end): what a reader loads (caller holds _files)."""
        with self._lock:
            return self._generation, self._journal, self._end

    # writing

    def _append(self, record: bytes) -> bool:
        """Append one record durably; False if the index is not kept (StoreError if it cannot be)."""
        with self._lock:
            fd, start = self._fd, self._end
            if fd < 0:
                return False
            try:
                os.write(fd, record)
                self._end, self._records = start + len(record), self._records + 1
            except OSError as exc:
                self._give_up(exc, fd, start)
                raise StoreError(f"cannot write the task index in {self.directory}: {exc}") from None
        try:
            os.fsync(fd)
        except OSError as exc:
            with self._lock:
                self._give_up(exc, fd, start)
            raise StoreError(f"cannot write the task index in {self.directory}: {exc}") from None
        return True

    def _give_up(self, exc: OSError, fd: int, start: int) -> None:
        """A journal write failed: no more index writes; the next start rebuilds (caller holds _lock)."""
        log.error(
            "task index write failed: the index is dropped and rebuilt at the next start",
            extra={"index": str(self.directory), "error": str(exc)},
        )
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        self._fd = -1
        try:
            (self.directory / SNAPSHOT).unlink(missing_ok=True)
            fsync_dir(self.directory)
        except OSError as unlink_error:  # the index would be trusted stale: refuse writes instead
            raise StoreError(f"cannot drop the task index in {self.directory}: {unlink_error}") from None

    def _restore(self, task_id: str) -> None:
        """After a failed file write: a row of what the disk holds for the task (best effort)."""
        try:
            fix = self._disk.row(task_id) or IndexRow(task_id, 0, "", FORGET)
            self._append(encode(fix))
        except (OSError, StoreError) as exc:
            with self._lock:
                if self._fd >= 0:
                    self._give_up(OSError(str(exc)), self._fd, self._end)

    # compaction

    def _maybe_compact(self) -> None:
        with self._lock:
            due = self._fd >= 0 and self._records > max(COMPACT_MIN_RECORDS, self._snapshot_rows // 4)
            due = due and self._verified  # the first read may write a snapshot of its own
            if not due or (self._compactor is not None and self._compactor.is_alive()):
                return
            self._compactor = threading.Thread(
                target=self._compact, name="task-index-compaction", daemon=True
            )
            self._compactor.start()

    def _compact(self) -> None:
        try:
            with self._gate.exclusive():  # writes in flight finish first: closed journals hold finished ones
                first, last = self._generation, self._journal
                with self._lock:
                    merged_records = self._records
                self._switch_journal(last + 1)
            snapshot, rows = self._load(first, last, os.path.getsize(self.directory / f"{JOURNAL}{last}"))
            self._publish(merge(snapshot, rows), last + 1, merged_records)
            log.info("task index compacted", extra={"generation": last + 1, "rows": merged_records})
        except (OSError, ValueError):
            log.exception("task index compaction failed; its journals are kept")


def _expected(row: IndexRow | None) -> tuple[int, int, int] | None:
    """What Disk.newest gives for a task whose index row is `row`."""
    if row is None or row.state == FORGET:
        return None
    if row.state == TOMBSTONE:
        return (row.version, TOMBSTONE, 0)
    size = row.summary.size if row.summary is not None else row.size
    return (row.version, LIVE, size)
