"""A thread-safe LRU bounded by bytes: the composed-weight, packed-template and head caches are all one."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteBudgetLRU(Generic[V]):
    """Values by key, the least recently used evicted beyond `max_bytes` (each value weighs `size(value)`).

    A value heavier than the whole budget is not kept. `hits` counts lookups that found their key; what
    counts as a miss is the owner's call (`note_miss`), since an owner may look a key up more than once
    before it loads the value."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes, self._size = max_bytes, size
        self._values: OrderedDict[Hashable, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
                self.hits += 1
            return value

    def get_or_load(self, key: Hashable, load: Callable[[], V]) -> V:
        """The value of `key`, or `load()`'s (counted as a miss, and kept if it fits the budget)."""
        value = self.get(key)
        if value is not None:
            return value
        self.note_miss()
        value = load()
        self.put(key, value)
        return value

    def note_miss(self) -> None:
        with self._lock:
            self.misses += 1

    def put(self, key: Hashable, value: V) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return
            self._values[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._values.popitem(last=False)
                self._bytes -= self._size(old)
