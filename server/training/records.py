"""A training job's record: what every replica reads and writes through the job store."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# what a succeeded job's result reports of its training summary, after the task version it published
RESULT_FIELDS = (
    "val_accuracy",
    "probe_val_accuracy",
    "train_examples",
    "val_examples",
    "epochs_run",
    "lr",
    "lr_trials",
    "capacity",
    "pooling",
    "trained_parameters",
    "seconds",
)


def now_stamp() -> str:
    """The current UTC time as a record stamp (ISO 8601, milliseconds, `Z`)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_result(version: int, summary: dict[str, Any]) -> dict[str, Any]:
    """A succeeded job's `result`: the task version it published and what its training summary reports."""
    return {"version": version} | {name: summary.get(name) for name in RESULT_FIELDS}


def age(stamp: str) -> float:
    """Seconds since a record stamp."""
    return (datetime.now(UTC) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()


@dataclass(frozen=True)
class Job:
    job_id: str
    tenant: str
    task_id: str
    state: State
    created: str
    updated: str  # the heartbeat of an unfinished job
    owner: str  # the server process running it
    examples: int
    labels: list[str]
    options: dict[str, Any]
    phase: str = "queued"
    progress: float = 0.0
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    cancel_requested: bool = False
    revision: int = 0  # of the stored record this was read from or written as

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in known})
