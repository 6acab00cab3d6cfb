"""Classifier heads within a memory budget: coefficients of every task stay resident, heads are cached.

A head is (C, H) floats, so for a million tasks the heads are most of the memory; they live in an LRU keyed
by the artifact digest (content-addressed: a head is never confused with another version's) and are read
back from the store on a miss. A miss for a version the store no longer holds (the task was replaced or
deleted meanwhile) raises Superseded; the caller then serves the task's current version instead.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.registry import TaskEntry

Head = tuple[torch.Tensor, torch.Tensor]  # weight (C, H), bias (C,)


class Superseded(Exception):
    """The entry's version is no longer in the store: serve the task's current version instead."""


class HeadCache:
    """digest -> head, evicted least-recently-used beyond `max_bytes`; `load(entry)` fills misses."""

    def __init__(self, max_bytes: int, load: Callable[[TaskEntry], Head] | None = None) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.load = load
        self._heads: OrderedDict[str, Head] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._heads)

    def cached(self, digest: str) -> Head | None:
        with self._lock:
            head = self._heads.get(digest)
            if head is not None:
                self._heads.move_to_end(digest)
                self.hits += 1
            return head

    def put(self, digest: str, head: Head) -> None:
        size = _nbytes(head)
        if size > self.max_bytes:
            return
        with self._lock:
            if digest in self._heads:
                self._heads.move_to_end(digest)
                return
            self._heads[digest] = head
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._heads.popitem(last=False)
                self._bytes -= _nbytes(old)

    def get(self, entry: TaskEntry) -> Head:
        """The entry's head, from the cache or loaded (may block on the store; raises Superseded)."""
        head = self.cached(entry.digest)
        if head is not None:
            return head
        if self.load is None:
            raise Superseded(f"no head for task {entry.task_id!r} version {entry.version} and no loader")
        with self._lock:
            self.misses += 1
        head = self.load(entry)
        self.put(entry.digest, head)
        return head


def _nbytes(head: Head) -> int:
    return sum(t.numel() * t.element_size() for t in head)
