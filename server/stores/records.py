"""Journal records of the task index and the files they live in.

A record is `u32 length | u32 crc32 | payload`; the payload is one IndexRow (server/stores/index.py):
    u8 state | i64 version | u16 | task id | u16 | updated, then
    LIVE:        digest[32] | i64 size | u16 M | u16 n | i32 hidden size | i64 head parameters |
                 M*n float32 | u16 | fingerprint | u16 | created | u32 | labels (JSON)
    UNREADABLE:  digest[32] | i64 size | u16 | reason
Strings are UTF-8 after their length (the u16 or u32 before them); numbers are little-endian.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recast_core.files import write_atomic
from server.stores.index import LIVE, TOMBSTONE, UNREADABLE, IndexBuilder, IndexRow, Summary, TaskIndex

FORGET = 3  # journal only: the task has no directory (any more)

_HEAD = struct.Struct("<II")  # payload length, crc32 of the payload
_FIXED = struct.Struct("<BqH")  # state, version, length of the task id
_LIVE = struct.Struct("<32sqHHiq")  # digest, size, M, n, hidden size, head parameters
_UNREADABLE = struct.Struct("<32sq")  # digest, size


def encode(row: IndexRow) -> bytes:
    task_id = row.task_id.encode()
    parts = [_FIXED.pack(row.state, row.version, len(task_id)), task_id, _text(row.updated, "<H")]
    if row.state == LIVE:
        s = row.summary
        assert s is not None
        parts += [_LIVE.pack(s.digest, s.size, *s.shape, s.hidden_size, s.head_parameters), s.coefficients]
        parts += [_text(s.bank_fingerprint, "<H"), _text(s.created, "<H"), _text(s.labels, "<I")]
    elif row.state == UNREADABLE:
        parts += [_UNREADABLE.pack(row.digest, row.size), _text(row.reason, "<H")]
    payload = b"".join(parts)
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def _text(value: str, length: str) -> bytes:
    data = value.encode()
    return struct.pack(length, len(data)) + data


def decode(payload: bytes) -> IndexRow:
    """The row of one record's payload; ValueError (or struct.error) if it is malformed."""
    reader = _Reader(payload)
    state, version, id_length = reader.unpack(_FIXED)
    task_id, updated = reader.take(id_length).decode(), reader.text("<H")
    if state == LIVE:
        digest, size, rows, cols, hidden, head = reader.unpack(_LIVE)
        coefficients = reader.take(4 * rows * cols)
        fingerprint, created, labels = reader.text("<H"), reader.text("<H"), reader.text("<I")
        summary = Summary(
            digest, size, (rows, cols), coefficients, hidden, head, fingerprint, created, labels
        )
        row = IndexRow(task_id, version, updated, state, summary)
    elif state == UNREADABLE:
        digest, size = reader.unpack(_UNREADABLE)
        row = IndexRow(task_id, version, updated, state, digest=digest, size=size, reason=reader.text("<H"))
    elif state in (TOMBSTONE, FORGET):
        row = IndexRow(task_id, version, updated, state)
    else:
        raise ValueError(f"unknown row state {state}")
    if reader.offset != len(payload):
        raise ValueError("trailing bytes in a journal record")
    return row


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise ValueError("journal record too short")
        self.offset += n
        return self.data[self.offset - n : self.offset]

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return tuple(layout.unpack(self.take(layout.size)))

    def text(self, length: str) -> str:
        (n,) = struct.unpack(length, self.take(struct.calcsize(length)))
        return self.take(n).decode()


def read_records(data: bytes) -> tuple[list[IndexRow], int, bool]:
    """(rows of the whole records at the start of `data`, where they end, whether what follows is a torn
    last record): a record that is cut short, or fails its checksum with nothing after it."""
    rows: list[IndexRow] = []
    offset = 0
    while offset < len(data):
        if offset + _HEAD.size > len(data):
            return rows, offset, True
        length, crc = _HEAD.unpack_from(data, offset)
        end = offset + _HEAD.size + length
        if end > len(data):
            return rows, offset, True
        payload = data[offset + _HEAD.size : end]
        if zlib.crc32(payload) != crc:
            return rows, offset, end == len(data)
        try:
            rows.append(decode(payload))
        except (ValueError, struct.error, UnicodeDecodeError):
            return rows, offset, False
        offset = end
    return rows, offset, False


def merge(snapshot: TaskIndex, rows: Sequence[IndexRow]) -> TaskIndex:
    """The snapshot with journal rows applied in order (a later row of an id replaces the earlier one)."""
    latest: dict[str, IndexRow] = {}
    for row in rows:
        latest.pop(row.task_id, None)
        latest[row.task_id] = row
    if not latest:
        return snapshot
    keep = np.fromiter((i not in latest for i in snapshot.ids), dtype=bool, count=len(snapshot))
    rest = IndexBuilder().extend(r for r in latest.values() if r.state != FORGET).build()
    return TaskIndex.concat([snapshot.take(np.flatnonzero(keep)), rest])


class Gate:
    """Many holders of `shared` at a time, or one of `exclusive` (which waits for the shared ones)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._shared:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def write_file(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """`chunks` as `path`, atomically and durably (the directory entry fsynced too)."""
    write_atomic(path, chunks)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
