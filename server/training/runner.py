"""One training job's worker process: started, followed through its pipe, and always reaped.

The worker (server/training/worker.py) sends `Progress` messages and then one outcome, `Succeeded` or
`Failed` (server/training/messages.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing.context import SpawnContext
from threading import Event
from typing import Any

from server.training.messages import Failed, Outcome, Progress, Succeeded
from server.training.worker import WorkerSpec

SAVE_EVERY = 1.0  # seconds between recorded progress updates


def run_worker(
    context: SpawnContext,
    worker: Callable[..., None],
    spec: WorkerSpec,
    name: str,
    *,
    cancelled: Event,
    started: Callable[[Any], None],
    progress: Callable[[bool, str, float], None],
) -> tuple[Outcome | None, int | None]:
    """Run `worker(spec, pipe)` in a new process until it sends its outcome, exits or `cancelled` is set.

    `started(process)` is called once the process runs (so a cancel can terminate it); `progress(save,
    phase, overall)` for every progress message, with `save` true at most every SAVE_EVERY seconds.
    Returns the outcome (None if there was none) and the process's exit code."""
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=worker, args=(spec, child), name=name, daemon=True)
    process.start()
    child.close()
    started(process)
    outcome: Outcome | None = None
    saved = time.monotonic()
    try:
        while outcome is None and not cancelled.is_set():
            if not parent.poll(0.5):
                if not process.is_alive() and not parent.poll(0):
                    break
                continue
            try:
                message = parent.recv()
            except EOFError:
                break
            if isinstance(message, Progress):
                save = time.monotonic() - saved >= SAVE_EVERY
                share = message.done / message.total if message.total else 0.0
                progress(save, message.phase, overall(message.phase, share))
                saved = time.monotonic() if save else saved
            elif isinstance(message, Succeeded | Failed):
                outcome = message
    finally:
        if outcome is None or process.is_alive():
            process.terminate()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
        parent.close()
    return outcome, process.exitcode


def overall(phase: str, share: float) -> float:
    """One progress number for the whole job: loading 5 %, embedding and probe 15 %, training 80 %."""
    start, width = {"loading": (0.0, 0.05), "embedding": (0.05, 0.15), "training": (0.2, 0.8)}.get(
        phase, (0.0, 0.0)
    )
    return round(min(1.0, start + width * share), 4)
