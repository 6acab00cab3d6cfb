"""Classifier heads within a memory budget: coefficients of every task stay resident, heads are cached.

A head is (C, H) floats, plus the task's FFN edit ((L, H') scale and shift) when it has one, so for a
million tasks the heads are most of the memory; they live in an LRU keyed by the artifact digest
(content-addressed: a head is never confused with another version's) and are read back from the store on
a miss. A miss for a version the store no longer holds (the task was replaced or deleted meanwhile) raises
Superseded; the caller then serves the task's current version instead.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.lru import ByteBudgetLRU
from recast_core.artifact import TaskArtifact

if TYPE_CHECKING:
    from server.tasks.registry import TaskEntry


@dataclass(frozen=True, eq=False)
class Head:
    """What a task adds on top of its coefficients: the classifier and, optionally, the FFN edit and the
    pooling query."""

    weight: torch.Tensor  # (C, H)
    bias: torch.Tensor  # (C,)
    edit: tuple[torch.Tensor, torch.Tensor] | None = None  # FFN output (scale, shift), each (L, H')
    query: torch.Tensor | None = None  # (H,) attention-pooling query; None: the mean pool

    @classmethod
    def of(cls, artifact: TaskArtifact) -> Head:
        return cls(artifact.head_weight, artifact.head_bias, artifact.edit, artifact.pool_query)

    @property
    def classes(self) -> int:
        return int(self.weight.shape[0])

    def to(self, device: torch.device, dtype: torch.dtype) -> Head:
        edit = None if self.edit is None else (self.edit[0].to(device, dtype), self.edit[1].to(device, dtype))
        query = None if self.query is None else self.query.to(device, dtype)
        return Head(self.weight.to(device, dtype), self.bias.to(device, dtype), edit, query)

    @property
    def nbytes(self) -> int:
        parts = (self.weight, self.bias, *(self.edit or ()), *(() if self.query is None else (self.query,)))
        return sum(t.numel() * t.element_size() for t in parts)


class Superseded(Exception):
    """The entry's version is no longer in the store: serve the task's current version instead."""


class HeadCache(ByteBudgetLRU[Head]):
    """digest -> head, evicted least-recently-used beyond `max_bytes`; `load(entry)` fills misses.

    Heads (and edits) are kept on the serving `device` in the serving `dtype` (converted as they are put),
    so a batch reads them where its embeddings are; `max_bytes` counts them as stored."""

    def __init__(
        self,
        max_bytes: int,
        load: Callable[[TaskEntry], Head] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(max_bytes, lambda head: head.nbytes)
        self.load = load
        self.device, self.dtype = torch.device(device), dtype

    def put(self, key: Hashable, value: Head) -> None:
        super().put(key, value.to(self.device, self.dtype))

    def head(self, entry: TaskEntry) -> Head:
        """The entry's head, from the cache or loaded (may block on the store; raises Superseded)."""
        return self.get_or_load(entry.digest, lambda: self._load(entry))

    def _load(self, entry: TaskEntry) -> Head:
        if self.load is None:
            raise Superseded(f"no head for task {entry.task_id!r} version {entry.version} and no loader")
        return self.load(entry)
