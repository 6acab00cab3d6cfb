"""What serving needs of every stored task without reading its artifact: the task index.

One row per task: stored id, version, updated, state (live, tombstone, or live but unreadable) and, for a
live task, its `Summary`: digest (sha256 of the artifact bytes), size, the (M, n) float32 coefficients,
the head's hidden size, the count of parameters read back with the head (the head's, plus the FFN edit's
and the pooling query's when the task has them), labels, created and the bank fingerprint. The training
summary and the head stay in the artifact and are read from the store when needed.

`TaskIndex` keeps rows in columns (numpy arrays and UTF-8 blobs): a million tasks are a few hundred MB in
a few dozen objects, written and read in one piece (`to_chunks` / `from_buffer`, sha256-checked).
`IndexBuilder` collects rows one at a time (a PostgreSQL scan, a directory rebuild, a journal replay).
Later rows of an id supersede earlier ones (stores emit a task's rows in version order).
"""

from __future__ import annotations

import hashlib
import json
import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from recast_core.artifact import TaskArtifact, read_artifact
from recast_core.errors import ArtifactError
from server.stores.columns import Strings, gather, raw_bytes

LIVE, TOMBSTONE, UNREADABLE = 0, 1, 2
FORMAT = 1
MAGIC = b"RCIDX\x00\x01\n"


class Summary(NamedTuple):
    digest: bytes  # sha256 of the artifact bytes (32 bytes)
    size: int
    shape: tuple[int, int]  # of the coefficients: (M, n)
    coefficients: bytes  # (M, n) float32, little-endian
    hidden_size: int  # head.weight is (C, hidden_size)
    head_parameters: int  # read back with the head: C * (hidden_size + 1), plus the edit's and query's
    bank_fingerprint: str
    created: str
    labels: str  # JSON list of the C labels


class IndexRow(NamedTuple):
    task_id: str
    version: int
    updated: str
    state: int  # LIVE, TOMBSTONE or UNREADABLE
    summary: Summary | None = None  # LIVE rows
    digest: bytes = b""  # UNREADABLE rows: of the bytes stored
    size: int = 0
    reason: str = ""  # UNREADABLE rows: why the artifact could not be read (an artifact error type)


def summary_of(data: bytes, artifact: TaskArtifact, digest: bytes | None = None) -> Summary:
    """The summary of `data`, already parsed as `artifact`."""
    coefficients = artifact.coefficients.detach().cpu().contiguous().numpy().astype("<f4", copy=False)
    rows, cols = coefficients.shape
    return Summary(
        digest if digest is not None else hashlib.sha256(data).digest(),
        len(data),
        (int(rows), int(cols)),
        coefficients.tobytes(),
        int(artifact.head_weight.shape[1]),
        artifact.head_parameters + artifact.extra_parameters,
        artifact.bank_fingerprint,
        artifact.created,
        json.dumps(list(artifact.labels), ensure_ascii=False),
    )


def row_of(task_id: str, version: int, updated: str, data: bytes | None) -> IndexRow:
    """The row of a stored version: parsed and validated (no bank), or UNREADABLE naming why."""
    if data is None:
        return IndexRow(task_id, version, updated, TOMBSTONE)
    try:
        return IndexRow(task_id, version, updated, LIVE, summary_of(data, read_artifact(data)))
    except ArtifactError as exc:
        digest = hashlib.sha256(data).digest()
        return IndexRow(
            task_id, version, updated, UNREADABLE, digest=digest, size=len(data), reason=exc.error_type
        )


# (name, dtype, trailing shape) of the array columns, in file order
_ARRAYS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("versions", "<i8", ()),
    ("states", "u1", ()),
    ("digests", "u1", (32,)),
    ("sizes", "<i8", ()),
    ("shapes", "<i4", (2,)),
    ("hidden_sizes", "<i4", ()),
    ("head_parameters", "<i8", ()),
    ("fingerprint_ids", "<i4", ()),
)
_STRINGS = ("updated", "created", "labels", "reasons")


@dataclass(frozen=True, eq=False)
class TaskIndex:
    """Rows in columns; immutable once built (arrays read from a file are read-only views of it)."""

    ids: list[str]
    versions: np.ndarray  # (N,) int64
    states: np.ndarray  # (N,) uint8
    digests: np.ndarray  # (N, 32) uint8
    sizes: np.ndarray  # (N,) int64
    shapes: np.ndarray  # (N, 2) int32: (M, n) of each row's coefficients
    hidden_sizes: np.ndarray  # (N,) int32
    head_parameters: np.ndarray  # (N,) int64
    fingerprint_ids: np.ndarray  # (N,) int32, into `fingerprints`
    coefficient_offsets: np.ndarray  # (N + 1,) int64: row i's floats are coefficients[o[i]:o[i + 1]]
    coefficients: np.ndarray  # (sum of M * n,) float32
    fingerprints: tuple[str, ...]
    updated: Strings
    created: Strings
    labels: Strings
    reasons: Strings

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls) -> TaskIndex:
        return IndexBuilder().build()

    def coefficients_of(self, i: int) -> np.ndarray:
        """Row i's (M, n) coefficients (a view)."""
        start, end = int(self.coefficient_offsets[i]), int(self.coefficient_offsets[i + 1])
        rows, cols = (int(d) for d in self.shapes[i])
        return self.coefficients[start:end].reshape(rows, cols)

    def row(self, i: int) -> IndexRow:
        state, version = int(self.states[i]), int(self.versions[i])
        task_id, updated = self.ids[i], self.updated[i]
        digest, size = self.digests[i].tobytes(), int(self.sizes[i])
        if state == TOMBSTONE:
            return IndexRow(task_id, version, updated, state)
        if state == UNREADABLE:
            return IndexRow(
                task_id, version, updated, state, digest=digest, size=size, reason=self.reasons[i]
            )
        rows, cols = (int(d) for d in self.shapes[i])
        summary = Summary(
            digest,
            size,
            (rows, cols),
            self.coefficients_of(i).astype("<f4").tobytes(),
            int(self.hidden_sizes[i]),
            int(self.head_parameters[i]),
            self.fingerprints[int(self.fingerprint_ids[i])],
            self.created[i],
            self.labels[i],
        )
        return IndexRow(task_id, version, updated, state, summary)

    def take(self, rows: np.ndarray) -> TaskIndex:
        """The rows at `rows` (int64 positions), in that order."""
        starts, ends = self.coefficient_offsets[rows], self.coefficient_offsets[rows + 1]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        columns: dict[str, Any] = {name: getattr(self, name)[rows] for name, _, _ in _ARRAYS}
        columns |= {name: getattr(self, name).take(rows) for name in _STRINGS}
        return TaskIndex(
            ids=[self.ids[i] for i in rows.tolist()],
            coefficient_offsets=offsets,
            coefficients=gather(self.coefficients, starts, ends),
            fingerprints=self.fingerprints,
            **columns,
        )

    @staticmethod
    def concat(parts: Sequence[TaskIndex]) -> TaskIndex:
        fingerprints: dict[str, int] = {}
        remapped = []
        for part in parts:
            table = np.array(
                [fingerprints.setdefault(f, len(fingerprints)) for f in part.fingerprints] or [0]
            )
            remapped.append(
                table[part.fingerprint_ids].astype(np.int32) if len(part) else part.fingerprint_ids
            )
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for part in parts:
            offsets.append(part.coefficient_offsets[1:] + base)
            base += int(part.coefficient_offsets[-1])
        columns: dict[str, Any] = {
            name: np.concatenate([getattr(p, name) for p in parts]) for name, _, _ in _ARRAYS
        }
        columns["fingerprint_ids"] = np.concatenate(remapped).astype(np.int32)
        columns |= {name: Strings.concat([getattr(p, name) for p in parts]) for name in _STRINGS}
        return TaskIndex(
            ids=[task_id for p in parts for task_id in p.ids],
            coefficient_offsets=np.concatenate(offsets),
            coefficients=np.concatenate([p.coefficients for p in parts]),
            fingerprints=tuple(fingerprints),
            **columns,
        )

    # one file: MAGIC | u64 header length | header JSON | sections (8-byte aligned); sha256 of the sections

    def to_chunks(self, generation: int) -> list[bytes | memoryview]:
        """The serialized index (header first), as chunks to write in order."""
        sections: list[tuple[str, bytes | memoryview]] = [("ids", "\n".join(self.ids).encode())]
        sections += [(name, raw_bytes(getattr(self, name), dtype)) for name, dtype, _ in _ARRAYS]
        sections += [("coefficient_offsets", raw_bytes(self.coefficient_offsets, "<i8"))]
        sections += [("coefficients", raw_bytes(self.coefficients, "<f4"))]
        for name in _STRINGS:
            column: Strings = getattr(self, name)
            sections += [(f"{name}.blob", column.blob), (f"{name}.offsets", raw_bytes(column.offsets, "<i8"))]
        body: list[bytes | memoryview] = []
        layout, offset, digest = {}, 0, hashlib.sha256()
        for name, data in sections:
            pad = b"\0" * (-len(data) % 8)
            layout[name] = [offset, len(data)]
            body += [data, pad]
            digest.update(data)
            digest.update(pad)
            offset += len(data) + len(pad)
        header = {
            "format": FORMAT,
            "generation": generation,
            "rows": len(self),
            "fingerprints": list(self.fingerprints),
            "sections": layout,
            "body_bytes": offset,
            "sha256": digest.hexdigest(),
        }
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        return [MAGIC, struct.pack("<Q", len(encoded)), encoded, *body]

    @classmethod
    def from_buffer(cls, buf: bytes) -> tuple[TaskIndex, int]:
        """(index, generation) of a serialized index; ValueError if it is not one, whole and intact."""
        header, start = read_header(buf)
        body = memoryview(buf)[start:]
        if len(body) != header["body_bytes"]:
            raise ValueError(f"index body is {len(body)} bytes, its header says {header['body_bytes']}")
        if hashlib.sha256(body).hexdigest() != header["sha256"]:
            raise ValueError("index body does not match its sha256")
        rows, layout = int(header["rows"]), header["sections"]

        def section(name: str) -> memoryview:
            offset, length = layout[name]
            return body[offset : offset + length]

        def array(name: str, dtype: str, shape: tuple[int, ...], count: int) -> np.ndarray:
            data = np.frombuffer(section(name), dtype=dtype)
            if data.size != count * int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"index section {name!r} has {data.size} values, expected {count} rows")
            return data.reshape((count, *shape))

        ids = bytes(section("ids")).decode().split("\n") if rows else []
        if len(ids) != rows:
            raise ValueError(f"index holds {len(ids)} ids for {rows} rows")
        offsets = array("coefficient_offsets", "<i8", (), rows + 1)
        columns: dict[str, Any] = {name: array(name, dtype, shape, rows) for name, dtype, shape in _ARRAYS}
        for name in _STRINGS:
            blob_offsets = array(f"{name}.offsets", "<i8", (), rows + 1)
            columns[name] = Strings(bytes(section(f"{name}.blob")), blob_offsets)
        index = cls(
            ids=ids,
            coefficient_offsets=offsets,
            coefficients=array("coefficients", "<f4", (), int(offsets[-1])),
            fingerprints=tuple(header["fingerprints"]),
            **columns,
        )
        return index, int(header["generation"])


def read_header(buf: bytes) -> tuple[dict[str, Any], int]:
    """The header of a serialized index and where its body starts; ValueError if there is none."""
    if len(buf) < 16 or buf[:8] != MAGIC:
        raise ValueError("not a task index file")
    (length,) = struct.unpack_from("<Q", buf, 8)
    if 16 + length > len(buf):
        raise ValueError("task index header is truncated")
    try:
        header = json.loads(buf[16 : 16 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"task index header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("task index header has an unknown format")
    return header, 16 + length


class IndexBuilder:
    """Rows one at a time -> a TaskIndex."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._ints = array("q")  # per row: version, state, size, M, n, hidden size, head parameters
        self._digests: list[bytes] = []
        self._coefficients: list[bytes] = []
        self._fingerprints: dict[str, int] = {}
        self._fingerprint_ids = array("i")
        self._strings: dict[str, list[bytes]] = {name: [] for name in _STRINGS}

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, row: IndexRow) -> None:
        s = row.summary
        self._ids.append(row.task_id)
        self._strings["updated"].append(row.updated.encode())
        if s is not None:
            self._ints.extend((row.version, row.state, s.size, *s.shape, s.hidden_size, s.head_parameters))
            self._digests.append(s.digest)
            self._coefficients.append(s.coefficients)
            self._fingerprint_ids.append(
                self._fingerprints.setdefault(s.bank_fingerprint, len(self._fingerprints))
            )
            self._strings["created"].append(s.created.encode())
            self._strings["labels"].append(s.labels.encode())
        else:
            self._ints.extend((row.version, row.state, row.size, 0, 0, 0, 0))
            self._digests.append(row.digest.ljust(32, b"\0"))
            self._coefficients.append(b"")
            self._fingerprint_ids.append(0)
            self._strings["created"].append(b"")
            self._strings["labels"].append(b"")
        self._strings["reasons"].append(row.reason.encode())

    def extend(self, rows: Iterable[IndexRow]) -> IndexBuilder:
        for row in rows:
            self.add(row)
        return self

    def build(self) -> TaskIndex:
        n = len(self._ids)
        ints = np.frombuffer(self._ints, dtype=np.int64).reshape(n, 7)
        floats = np.frombuffer(b"".join(self._coefficients), dtype="<f4")
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(ints[:, 3] * ints[:, 4], out=offsets[1:])
        return TaskIndex(
            ids=self._ids,
            versions=ints[:, 0].copy(),
            states=ints[:, 1].astype(np.uint8),
            digests=np.frombuffer(b"".join(self._digests), dtype=np.uint8).reshape(n, 32),
            sizes=ints[:, 2].copy(),
            shapes=ints[:, 3:5].astype(np.int32),
            hidden_sizes=ints[:, 5].astype(np.int32),
            head_parameters=ints[:, 6].copy(),
            fingerprint_ids=np.frombuffer(self._fingerprint_ids, dtype=np.int32).copy(),
            coefficient_offsets=offsets,
            coefficients=floats,
            fingerprints=tuple(self._fingerprints),
            **{name: Strings.of(items) for name, items in self._strings.items()},
        )
