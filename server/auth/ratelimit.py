"""Per-key rate limits: a token bucket for each API key (requests per second, with a burst)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from server.errors import RateLimited


class RateLimiter:
    """Buckets by name (a key id, or `anonymous@<address>`); a bucket starts full.

    Buckets are kept least recently used first and bounded: a bucket untouched long enough to be full
    again is the same as no bucket, so those are dropped when there are many; beyond `max_buckets` the
    least recently used go too (a caller that spreads over that many addresses gets fresh buckets)."""

    def __init__(self, rate_per_s: float, burst: int, max_buckets: int = 100_000) -> None:
        self.rate_per_s, self.burst, self.max_buckets = rate_per_s, burst, max_buckets
        # name -> (tokens, monotonic time, seconds to refill completely)
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key_id: str, rate_per_s: float | None = None, burst: int | None = None) -> None:
        """Spend one token of `key_id`'s bucket, or raise RateLimited with the seconds until one is back."""
        rate = rate_per_s if rate_per_s is not None else self.rate_per_s
        capacity = float(burst if burst is not None else self.burst)
        if rate <= 0:
            return  # unlimited
        now = time.monotonic()
        refill = capacity / rate
        with self._lock:
            tokens, last, _ = self._buckets.pop(key_id, (capacity, now, refill))
            tokens = min(capacity, tokens + (now - last) * rate)
            if len(self._buckets) >= self.max_buckets:
                self._prune(now)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now, refill)
                wait = (1.0 - tokens) / rate
                raise RateLimited(
                    f"rate limit of key {key_id!r} reached ({rate:g} requests/s, burst {capacity:g}); "
                    f"retry in {wait:.2f} s",
                    retry_after=wait,
                )
            self._buckets[key_id] = (tokens - 1.0, now, refill)

    def _prune(self, now: float) -> None:
        """Drop buckets that are full again (oldest first), then the least recently used beyond the cap."""
        for name, (_, last, refill) in list(self._buckets.items()):
            if now - last < refill:
                break  # in LRU order, the rest were used more recently still (refill times are alike)
            del self._buckets[name]
        while len(self._buckets) >= self.max_buckets:
            self._buckets.popitem(last=False)
