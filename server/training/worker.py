"""The process a training job runs in: its own backbone copy and torch threads, at a lower CPU priority.

A job runs apart from the serving process so that it never holds the server's interpreter or its torch
thread pool, can be cancelled by ending the process, and cannot take the server down if it fails. The
parent sends a `WorkerSpec`; the worker answers on the pipe with messages (server/training/messages.py):
`Progress` at most every PROGRESS_EVERY seconds, then `Succeeded` or `Failed`.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from server.training.messages import Failed, Progress, Succeeded

PROGRESS_EVERY = 0.25


@dataclass(frozen=True)
class WorkerSpec:
    bank_dir: Path
    bank_fingerprint: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    options: dict[str, Any]  # recast_core.fitting.TrainOptions fields
    threads: int
    nice: int
    idle_priority: bool  # Linux SCHED_IDLE: run only on CPU time nothing else wants
    backbone_dir: Path | None = None  # the server's backbone; None: the bundled MiniLM


def run(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of the worker process (multiprocessing, spawn)."""
    try:
        conn.send(_train(spec, conn))
    except Exception as exc:  # reported to the job, never lost
        from recast_core.errors import RecastError

        if isinstance(exc, RecastError):
            conn.send(Failed(" ".join(str(exc).split())))
        else:
            last = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
            conn.send(Failed(f"training failed: {type(exc).__name__}: {exc}{where}"))
    finally:
        conn.close()


def _train(spec: WorkerSpec, conn: Connection) -> Succeeded:
    if spec.nice > 0:
        os.nice(spec.nice)
    if spec.idle_priority and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    import torch

    from recast_core.backbone import load_text_backbone
    from recast_core.bank import load_bank
    from recast_core.data import LabelledTexts
    from recast_core.errors import BankError
    from recast_core.train_options import TrainOptions
    from recast_core.training import train_task

    torch.set_num_threads(spec.threads)
    last = 0.0

    def progress(phase: str, done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY or done == total:
            last = now
            conn.send(Progress(phase, done, total))

    progress("loading", 0, 1)
    backbone = load_text_backbone(spec.backbone_dir)
    bank = load_bank(spec.bank_dir)
    if bank.fingerprint != spec.bank_fingerprint:
        raise BankError(
            f"the bank at {spec.bank_dir} changed under the server (fingerprint {bank.fingerprint[:12]}, "
            f"serving {spec.bank_fingerprint[:12]}); restart the server"
        )
    progress("loading", 1, 1)
    result = train_task(
        backbone,
        bank,
        LabelledTexts(spec.texts, spec.labels),
        options=TrainOptions(**spec.options),
        progress=False,
        on_progress=progress,
    )
    return Succeeded(result.artifact.to_bytes(), result.summary)
