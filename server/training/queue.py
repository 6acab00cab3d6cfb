"""The fair per-tenant training queue and the retention of finished jobs.

Queue rules (`FairJobQueue`): at most `limit` (RECAST_MAX_QUEUED_JOBS) jobs wait, and a tenant may hold at
most max(1, limit // 2) of those places. A free runner starts the tenant with the fewest running jobs, then
the tenant that started a job least recently, then that tenant's oldest waiting job:

    tenant = argmin over waiting tenants t of (running[t], last_started[t], seq of t's oldest waiting job)

Retention rules (`prune_finished`): finished jobs are kept `keep_seconds` (KEEP_SECONDS, 7 days) and at
most `keep_finished` (KEEP_FINISHED, 200, the longest listing) per tenant, the most recently finished.
The job manager prunes a tenant when one of its jobs ends and every tenant every PRUNE_EVERY seconds.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from datetime import UTC, datetime, timedelta
from typing import Generic, Protocol, TypeVar

from server.errors import ServerError
from server.stores.jobs import JobStore

log = logging.getLogger("server.jobs")  # the job manager's logger: its messages as they always were

KEEP_FINISHED = 200  # finished jobs kept per tenant (the longest listing)
KEEP_SECONDS = 7 * 86400.0  # and for at most this long
PRUNE_EVERY = 600.0  # seconds between prunes of every tenant's finished jobs


class _Owned(Protocol):
    @property
    def tenant(self) -> str: ...


class Waiting(Protocol):
    """What the queue needs of a job: its tenant and a slot for its queue order."""

    seq: int

    @property
    def job(self) -> _Owned: ...


W = TypeVar("W", bound=Waiting)


class FairJobQueue(Generic[W]):
    """Waiting jobs per tenant: a tenant holds at most `share` of the `limit` places; `pop` starts the
    tenant with the fewest running jobs, then the least recently started, then the oldest waiting job."""

    def __init__(self, limit: int) -> None:
        self.limit, self.share = limit, max(1, limit // 2)
        self._waiting: dict[str, deque[W]] = {}
        self._started: dict[str, int] = {}
        self._seq = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def refusal(self, tenant: str) -> str | None:
        """Why a job of `tenant` cannot wait now, or None."""
        if len(self) >= self.limit:
            return f"{len(self)} training jobs are already waiting; retry later"
        if len(self._waiting.get(tenant, ())) >= self.share:
            return f"this tenant has {self.share} training jobs waiting, its share of the queue; retry later"
        return None

    def push(self, work: W) -> None:
        self._seq += 1
        work.seq = self._seq
        self._waiting.setdefault(work.job.tenant, deque()).append(work)

    def remove(self, work: W) -> bool:
        waiting = self._waiting.get(work.job.tenant)
        if waiting is None or work not in waiting:
            return False
        waiting.remove(work)
        if not waiting:
            del self._waiting[work.job.tenant]
        return True

    def pop(self, running: Counter[str]) -> W:
        tenant = min(
            self._waiting, key=lambda t: (running[t], self._started.get(t, 0), self._waiting[t][0].seq)
        )
        work = self._waiting[tenant][0]
        self.remove(work)
        self._seq += 1
        self._started[tenant] = self._seq
        return work

    def drain(self) -> list[W]:
        works = sorted((w for q in self._waiting.values() for w in q), key=lambda w: w.seq)
        self._waiting.clear()
        return works


def prune_finished(store: JobStore, tenant: str | None, keep_finished: int, keep_seconds: float) -> None:
    """Delete the finished jobs of `tenant` (or of every tenant) beyond the retention; a store that is
    away is logged, and pruned again next time."""
    cutoff = datetime.now(UTC) - timedelta(seconds=keep_seconds)
    try:
        store.prune(tenant, keep_finished, cutoff)
    except ServerError as exc:  # pruned again when the next job ends
        log.warning("finished jobs not pruned", extra={"tenant": tenant, "error": exc.message})
