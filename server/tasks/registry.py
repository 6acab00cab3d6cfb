"""Every task the server can serve, by id: immutable versioned entries swapped atomically.

A request takes one `TaskEntry` (coefficients, head, labels, version) and uses only it, so it is answered
wholly by the old or wholly by the new version of a task, never by a mix. Entries never change after they
are made; an upload replaces the entry, it never edits one in place.

State: a base `TaskIndex` (every task as the store's index held it at the last load, in columns) and an
overlay of what changed since (uploads, deletes, other replicas' changes, tasks found unservable); per id
the newest version wins. Entries of base rows are made when asked for (microseconds), so a million tasks
are a few hundred MB of arrays rather than a million objects. A task whose stored version cannot be served
(its artifact failed verification when read back, or fits another bank) stays known at that version and
answers TaskUnavailable until a newer version replaces it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recast_core.artifact import ArtifactSpec, TaskArtifact, read_artifact
from recast_core.errors import ArtifactError
from server.errors import ArtifactRejected, NotReady, TaskUnavailable, UnknownTask
from server.ids import (
    DEFAULT_TENANT,
    SEPARATOR,
    STORED_ID,
    check_stored_id,
    check_task_id,
    split_stored_id,
)
from server.stores.base import StoredTask
from server.stores.index import LIVE, TOMBSTONE, UNREADABLE, TaskIndex
from server.tasks.heads import Head, HeadCache, Superseded

DEFAULT_HEAD_BYTES = 1 << 30
BANK_MISMATCH = "fingerprint_mismatch"  # the one unservable reason that is no fault of the artifact

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
    extra_parameters: int = 0  # the FFN edit's scale and shift and the pooling query (0: neither)
    known_training: dict[str, Any] | None = None  # None: read from the stored artifact when asked for
    load_training: Callable[[TaskEntry], dict[str, Any]] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, stored: StoredTask, artifact: TaskArtifact, digest: str) -> TaskEntry:
        assert stored.data is not None
        return cls(
            task_id=stored.task_id,
            version=stored.version,
            coefficients=artifact.coefficients,
            labels=artifact.labels,
            head_parameters=artifact.head_parameters,
            extra_parameters=artifact.extra_parameters,
            size_bytes=len(stored.data),
            updated=stored.updated,
            digest=digest,
            created=artifact.created,
            bank_fingerprint=artifact.bank_fingerprint,
            known_training=artifact.training,
        )

    @property
    def training(self) -> dict[str, Any]:
        """The training summary; for an entry loaded from the index, read from its stored artifact (may
        block on the store; TaskUnavailable if the artifact fails verification)."""
        if self.known_training is not None:
            return self.known_training
        return {} if self.load_training is None else self.load_training(self)

    @property
    def cache_key(self) -> str:
        """Names this artifact's composed weights: content-addressed, so never reused for other numbers."""
        return self.digest

    @property
    def trainable_parameters(self) -> int:
        return int(self.coefficients.numel()) + self.extra_parameters


@dataclass(frozen=True)
class _Gone:
    """A version that is not served: deleted (reason None) or unservable (an artifact error type)."""

    version: int
    reason: str | None = None


@dataclass(frozen=True, eq=False)
class _Base:
    index: TaskIndex
    rows: dict[str, int]  # stored id -> its newest row
    servable: np.ndarray  # (N,) bool: the newest row of its id, live and fitting the bank

    @classmethod
    def empty(cls) -> _Base:
        return cls(TaskIndex.empty(), {}, np.zeros(0, dtype=bool))


@dataclass
class LoadReport:
    """What `TaskRegistry.load` found besides servable tasks."""

    unreadable: list[tuple[str, int]]  # (stored id, version) of live rows the store could not summarize
    unservable: list[tuple[str, int, str]]  # (stored id, version, reason) of live rows that cannot be served
    bank_mismatches: int  # live rows made for another bank (not listed in unservable)
    invalid_ids: list[str]  # rows skipped: not valid stored ids


class TaskRegistry:
    """Task id -> current TaskEntry, validated against the resident bank's `spec`. Thread-safe.

    The store assigns versions; the registry keeps, per task id, the newest version it has been given
    (deletes included, as tombstones), so changes arriving late or twice never roll a task back.
    """

    def __init__(self, spec: ArtifactSpec, heads: HeadCache | None = None) -> None:
        self.spec = spec
        self.heads = heads if heads is not None else HeadCache(DEFAULT_HEAD_BYTES)
        self.load_training: Callable[[TaskEntry], dict[str, Any]] | None = None  # set by the catalog
        self._base = _Base.empty()
        self._overlay: dict[str, TaskEntry | _Gone] = {}
        self._live = 0
        # live ids of each tenant in order: built on the first page() (not during bulk loads), then kept
        # sorted incrementally
        self._sorted: dict[str, list[str]] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._live

    def validate(self, data: bytes) -> TaskArtifact:
        """Parse `data` as an artifact for this bank; ArtifactRejected names what is wrong."""
        try:
            return read_artifact(data, spec=self.spec)
        except ArtifactError as exc:
            raise ArtifactRejected(str(exc), exc.error_type) from None

    def load(self, index: TaskIndex) -> LoadReport:
        """Install a store's index as the base: every id at the newer of its row and what is known."""
        valid = [STORED_ID.fullmatch(task_id) is not None for task_id in index.ids]
        invalid = [task_id for task_id, ok in zip(index.ids, valid, strict=True) if not ok]
        if invalid:
            index = index.take(np.flatnonzero(np.array(valid, dtype=bool)))
        rows = dict(zip(index.ids, range(len(index)), strict=True))
        versions = index.versions
        if len(rows) != len(index):  # an id in several rows: its newest one
            for n, task_id in enumerate(index.ids):
                if versions[n] > versions[rows[task_id]]:
                    rows[task_id] = n
        newest = np.zeros(len(index), dtype=bool)
        newest[np.fromiter(rows.values(), dtype=np.int64, count=len(rows))] = True
        fits = self._fits(index)
        base = _Base(index, rows, fits & newest)
        with self._lock:
            overlay = {}
            for task_id, value in self._overlay.items():  # changes since that the index does not have yet
                r = rows.get(task_id)
                if r is None or value.version >= versions[r]:
                    overlay[task_id] = value
            old = self._base
            old_versions = old.index.versions.tolist()
            for task_id, r0 in old.rows.items():  # never roll back to an older version than was served
                r = rows.get(task_id)
                if task_id not in overlay and (r is None or old_versions[r0] > versions[r]):
                    overlay[task_id] = self._value(old, task_id, r0)
            live = int(base.servable.sum())
            for task_id, value in overlay.items():
                r = rows.get(task_id)
                live += isinstance(value, TaskEntry) - bool(r is not None and base.servable[r])
            self._base, self._overlay, self._live, self._sorted = base, overlay, live, None
        shadowed = overlay.keys()
        states = index.states
        unreadable = [
            (index.ids[r], int(versions[r])) for r in np.flatnonzero(newest & (states == UNREADABLE)).tolist()
        ]
        unfit = np.flatnonzero(newest & (states == LIVE) & ~fits).tolist()
        reasons = [(index.ids[r], int(versions[r]), self._reason(base, r)) for r in unfit]
        return LoadReport(
            unreadable=[(task_id, v) for task_id, v in unreadable if task_id not in shadowed],
            unservable=[r for r in reasons if r[2] != BANK_MISMATCH and r[0] not in shadowed],
            bank_mismatches=sum(r[2] == BANK_MISMATCH for r in reasons),
            invalid_ids=invalid,
        )

    def apply(
        self, stored: StoredTask, artifact: TaskArtifact | None = None, *, again: bool = False
    ) -> TaskEntry | None:
        """Install a stored version (or remove the task for a tombstone) unless a newer one is known.

        `artifact` is the already validated parse of stored.data (validated here when omitted). Returns the
        installed entry, or None for a tombstone or a version that is not newer. again: also over the same
        version if that one is not served (a row the store's index could not summarize, now verified).
        """
        check_stored_id(stored.task_id)
        if not self._newer(stored.task_id, stored.version, again):  # cheap check before any parsing
            return None
        entry = None
        if stored.data is not None:
            artifact = artifact if artifact is not None else self.validate(stored.data)
            entry = TaskEntry.of(stored, artifact, hashlib.sha256(stored.data).hexdigest())
            self.heads.put(entry.digest, Head.of(artifact))
        with self._lock:
            if not self._newer(stored.task_id, stored.version, again):
                return None
            self._set(stored.task_id, entry if entry is not None else _Gone(stored.version))
        return entry

    def mark_unavailable(self, task_id: str, version: int, reason: str) -> bool:
        """Stop serving version `version` of the task (its stored artifact cannot be served) until a newer
        version comes; False if a newer version is known or it is marked already."""
        with self._lock:
            known, _ = self._known(task_id)
            current = self._overlay.get(task_id)
            if known > version or (known == version and isinstance(current, _Gone)):
                return False
            self._set(task_id, _Gone(version, reason))
            return True

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
        return self._known(task_id)[0]

    def get(self, task_id: str) -> TaskEntry:
        """The task's current entry; UnknownTask if it has none, TaskUnavailable if it cannot be served."""
        with self._lock:
            base, value = self._base, self._overlay.get(task_id)
        if value is None:
            value = self._value(base, task_id, base.rows.get(task_id))
        if isinstance(value, TaskEntry):
            return value
        if value.reason is None:
            raise UnknownTask(f"no task {split_stored_id(task_id)[1]!r}")
        raise unavailable(task_id, value.reason)

    def page(
        self, after: str = "", limit: int = 100, tenant: str = DEFAULT_TENANT
    ) -> tuple[list[TaskEntry], int]:
        """At most `limit` of `tenant`'s entries in task id order, after the task id `after`; and their count.

        The first call sorts every id (about a second for a million): call it off the event loop."""
        with self._lock:
            if self._sorted is None:
                self._sorted = self._sort()
            ids = self._sorted.get(tenant, [])
            prefix = "" if tenant == DEFAULT_TENANT else tenant + SEPARATOR
            start = bisect.bisect_right(ids, prefix + after) if after else 0
            picked = [(i, self._overlay.get(i)) for i in ids[start : start + limit]]
            base, total = self._base, len(ids)
        entries = [v if isinstance(v, TaskEntry) else self._value(base, i, base.rows[i]) for i, v in picked]
        return [e for e in entries if isinstance(e, TaskEntry)], total

    # internals (callers of _known and _set hold _lock)

    def _known(self, task_id: str) -> tuple[int, bool]:
        """(newest version known, whether it is served) of an id."""
        value = self._overlay.get(task_id)
        if value is not None:
            return value.version, isinstance(value, TaskEntry)
        base = self._base
        r = base.rows.get(task_id)
        return (0, False) if r is None else (int(base.index.versions[r]), bool(base.servable[r]))

    def _newer(self, task_id: str, version: int, again: bool) -> bool:
        known, served = self._known(task_id)
        return version > known or (again and version == known and not served)

    def _set(self, task_id: str, value: TaskEntry | _Gone) -> None:
        was = self._known(task_id)[1]
        self._overlay[task_id] = value
        now = isinstance(value, TaskEntry)
        self._live += now - was
        if self._sorted is not None and now != was:
            ids = self._sorted.setdefault(split_stored_id(task_id)[0], [])
            if now:
                bisect.insort(ids, task_id)
            else:
                del ids[bisect.bisect_left(ids, task_id)]

    def _sort(self) -> dict[str, list[str]]:
        base, overlay = self._base, self._overlay
        ids = [
            i for i, ok in zip(base.index.ids, base.servable.tolist(), strict=True) if ok and i not in overlay
        ]
        ids += [i for i, value in overlay.items() if isinstance(value, TaskEntry)]
        ids.sort()
        by_tenant: dict[str, list[str]] = {}
        for stored_id in ids:
            by_tenant.setdefault(split_stored_id(stored_id)[0], []).append(stored_id)
        return by_tenant

    def _fits(self, index: TaskIndex) -> np.ndarray:
        """(N,) bool: live rows whose summary fits this bank (fingerprint, shapes, size)."""
        spec = self.spec
        fingerprint = (
            index.fingerprints.index(spec.bank_fingerprint)
            if spec.bank_fingerprint in index.fingerprints
            else -1
        )
        return (
            (index.states == LIVE)
            & (index.fingerprint_ids == fingerprint)
            & (index.shapes[:, 0] == spec.num_slots)
            & (index.shapes[:, 1] == spec.num_templates)
            & (index.hidden_sizes == spec.hidden_size)
            & (index.sizes <= spec.max_bytes)
        )

    def _reason(self, base: _Base, r: int) -> str:
        """Why base row r (live, newest of its id) is not served: an artifact error type."""
        index, spec = base.index, self.spec
        if index.states[r] == UNREADABLE:
            return index.reasons[r] or "artifact_corrupt"
        if index.fingerprints[int(index.fingerprint_ids[r])] != spec.bank_fingerprint:
            return BANK_MISMATCH
        if int(index.sizes[r]) > spec.max_bytes:
            return "artifact_too_large"
        return "artifact_shape"

    def _value(self, base: _Base, task_id: str, r: int | None) -> TaskEntry | _Gone:
        """What base row r says of the task: its entry, made now, or why it is not served."""
        if r is None:
            return _Gone(0)
        index = base.index
        version = int(index.versions[r])
        if index.states[r] == TOMBSTONE:
            return _Gone(version)
        if not base.servable[r]:
            return _Gone(version, self._reason(base, r))
        labels = tuple(json.loads(index.labels[r]))
        head_parameters = len(labels) * (int(index.hidden_sizes[r]) + 1)
        return TaskEntry(
            task_id=task_id,
            version=version,
            coefficients=torch.from_numpy(index.coefficients_of(r).astype(np.float32)),
            labels=labels,
            head_parameters=head_parameters,
            extra_parameters=int(index.head_parameters[r]) - head_parameters,
            size_bytes=int(index.sizes[r]),
            updated=index.updated[r],
            digest=index.digests[r].tobytes().hex(),
            created=index.created[r],
            bank_fingerprint=index.fingerprints[int(index.fingerprint_ids[r])],
            load_training=self.load_training,
        )


def unavailable(task_id: str, reason: str) -> TaskUnavailable:
    """The error a task answers while its stored version cannot be served."""
    name = split_stored_id(task_id)[1]
    if reason == BANK_MISMATCH:
        return TaskUnavailable(
            f"task {name!r} is unavailable: its stored artifact was made for another template bank; "
            "upload one made for this bank"
        )
    return TaskUnavailable(
        f"task {name!r} is unavailable: its stored artifact failed verification; upload it again"
    )
