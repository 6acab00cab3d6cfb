"""Stand-ins for the training worker (server.training.worker.run), for the job tests; no tests here.

They run in the spawned worker process, which imports this module: it stays light (no torch), so a worker
is up in a fraction of a second instead of the seconds a real training takes to load.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

from server.training.messages import Progress


def hold(spec: Any, conn: Connection) -> None:
    """A training that never ends: progress every 50 ms until the process is ended."""
    done = 0
    while True:
        done += 1
        conn.send(Progress("training", done, 1_000_000))
        time.sleep(0.05)


def quiet(spec: Any, conn: Connection) -> None:
    """A training that never ends and says nothing: only heartbeats change its record."""
    while True:
        time.sleep(1)
