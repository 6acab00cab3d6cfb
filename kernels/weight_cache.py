"""A small LRU of composed weights, so a batch whose rows all belong to one hot task runs a plain GEMM."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch


class ComposedWeightCache:
    """Composed (out, in) weights keyed by the caller, evicted least-recently-used beyond `max_bytes`.

    A key must identify immutable inputs (for example: layer, task id, task version); the cache never
    looks at the tensors behind a key again. Thread-safe.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, compose: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached weight of `key`, composing (and caching, if it fits) on a miss."""
        with self._lock:
            weight = self._entries.get(key)
            if weight is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return weight
            self.misses += 1
        weight = compose()
        size = weight.numel() * weight.element_size()
        if size > self.max_bytes:
            return weight
        with self._lock:
            if key not in self._entries:
                self._entries[key] = weight
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return weight

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
