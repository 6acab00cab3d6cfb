"""Per-key rate limits: a token bucket for each API key (requests per second, with a burst)."""

from __future__ import annotations

import threading
import time

from server.errors import RateLimited


class RateLimiter:
    """Buckets by key id; a bucket starts full. One entry per key that was used (keys are few)."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, monotonic time)
        self._lock = threading.Lock()

    def take(self, key_id: str, rate_per_s: float | None = None, burst: int | None = None) -> None:
        """Spend one token of `key_id`'s bucket, or raise RateLimited with the seconds until one is back."""
        rate = rate_per_s if rate_per_s is not None else self.rate_per_s
        capacity = float(burst if burst is not None else self.burst)
        if rate <= 0:
            return  # unlimited
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimited(
                    f"rate limit of key {key_id!r} reached ({rate:g} requests/s, burst {capacity:g}); "
                    f"retry in {wait:.2f} s",
                    retry_after=wait,
                )
            self._buckets[key_id] = (tokens - 1.0, now)
