"""The accuracy table's results.json shared by several processes: runs are claimed before they start and
recorded under a lock, so that the same command started N times divides the plan between its processes
and no finished run is lost or done twice.

A claim is a file `.claims/TASK__METHOD__SEED` holding the claimer's pid; a claim whose process is gone is
stale and taken over (an interrupted run is redone).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recast_core.files import write_atomic

Run = tuple[str, str, int]  # (task, method, seed)

__all__ = ["Ledger", "Run"]


class Ledger:
    def __init__(self, out: Path, budget: dict[str, Any]) -> None:
        self.path = out / "results.json"
        self.budget = json.loads(json.dumps(budget))  # as JSON gives it back (tuples become lists)
        self._claims = out / ".claims"
        self._claims.mkdir(parents=True, exist_ok=True)
        self._lock_path = out / ".results.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        stored = json.loads(self.path.read_text())
        if stored.get("budget") != self.budget:
            raise SystemExit(
                f"{self.path} was produced with budget {stored.get('budget')}, not {self.budget}; "
                "move it away to start afresh"
            )
        runs: list[dict[str, Any]] = stored["runs"]
        return runs

    def runs(self) -> list[dict[str, Any]]:
        """Every finished run, in the order they were recorded."""
        with self._locked():
            return self._read()

    def _claim_file(self, run: Run) -> Path:
        task, method, seed = run
        return self._claims / f"{task.replace('@', '-at-')}__{method}__{seed}"

    def claim(self, run: Run) -> bool:
        """True if this process may do `run` now: not finished, not claimed by a live process."""
        with self._locked():
            if any((r["task"], r["method"], r["seed"]) == run for r in self._read()):
                return False
            path = self._claim_file(run)
            if path.exists() and _alive(int(path.read_text() or 0)):
                return False
            path.write_text(str(os.getpid()))
            return True

    def record(self, run: Run, row: dict[str, Any]) -> None:
        """Append `row` to results.json (atomically: an interrupted write keeps the finished runs)."""
        with self._locked():
            runs = [*self._read(), row]
            text = json.dumps({"budget": self.budget, "runs": runs}, indent=1) + "\n"
            write_atomic(self.path, text.encode())
            self._claim_file(run).unlink(missing_ok=True)

    def release(self, run: Run) -> None:
        with self._locked():
            self._claim_file(run).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
