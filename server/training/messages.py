"""What a training worker sends its job over the pipe: `Progress` messages, then one outcome (`Succeeded`
or `Failed`). Light (no torch): the worker process and the server both import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """`done` of `total` steps of `phase` (loading, embedding, training) are done."""

    phase: str
    done: int
    total: int


@dataclass(frozen=True)
class Succeeded:
    """The trained task's artifact and the training summary."""

    artifact: bytes
    summary: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """Why the training failed: a data or option problem, or an unexpected error (one line)."""

    reason: str


Outcome = Succeeded | Failed
Message = Progress | Succeeded | Failed
