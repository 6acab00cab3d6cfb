"""Classifier heads within a memory budget: coefficients of every task stay resident, heads are cached.

A head is (C, H) floats, so for a million tasks the heads are most of the memory; they live in an LRU keyed
by the artifact digest (content-addressed: a head is never confused with another version's) and are read
back from the store on a miss. A miss for a version the store no longer holds (the task was replaced or
deleted meanwhile) raises Superseded; the caller then serves the task's current version instead.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import torch

from kernels.lru import ByteBudgetLRU

if TYPE_CHECKING:
    from server.registry import TaskEntry

Head = tuple[torch.Tensor, torch.Tensor]  # weight (C, H), bias (C,)


class Superseded(Exception):
    """The entry's version is no longer in the store: serve the task's current version instead."""


class HeadCache(ByteBudgetLRU[Head]):
    """digest -> head, evicted least-recently-used beyond `max_bytes`; `load(entry)` fills misses.

    Heads are kept on the serving `device` in the serving `dtype` (converted as they are put), so a batch
    reads its heads where its embeddings are; `max_bytes` counts them as stored."""

    def __init__(
        self,
        max_bytes: int,
        load: Callable[[TaskEntry], Head] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(max_bytes, _nbytes)
        self.load = load
        self.device, self.dtype = torch.device(device), dtype

    def put(self, key: Hashable, value: Head) -> None:
        weight, bias = value
        super().put(key, (weight.to(self.device, self.dtype), bias.to(self.device, self.dtype)))

    def cached(self, digest: str) -> Head | None:
        return self.get(digest)

    def head(self, entry: TaskEntry) -> Head:
        """The entry's head, from the cache or loaded (may block on the store; raises Superseded)."""
        head = self.get(entry.digest)
        if head is not None:
            return head
        if self.load is None:
            raise Superseded(f"no head for task {entry.task_id!r} version {entry.version} and no loader")
        self.note_miss()
        head = self.load(entry)
        self.put(entry.digest, head)
        return head


def _nbytes(head: Head) -> int:
    return sum(t.numel() * t.element_size() for t in head)
