"""Does a training job starve prediction? Predict latency with and without a job running, side by side.

Usage:
    python -m benchmarks.training_load [--seconds 20] [--rounds 2] [--concurrency 4] [--examples 1000]
                                       [--write docs/benchmarks.md] [--json]

A real `recast serve` process (default bank, 100 synthetic tasks) answers one-text predicts sent by wrk
(benchmarks/wrk.py). Phases alternate round by round: `idle` (no job) and `training` (a training
job on TREC questions, `--examples` examples, runs the whole phase; a new one is started if it ends). The
ratios are p50/p99 latency and throughput of the training phases relative to the idle phases of the same
run. The job runs in its own process with the server's defaults (RECAST_TRAIN_THREADS=1,
RECAST_TRAIN_NICE=10, RECAST_TRAIN_IDLE_PRIORITY=true).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.kernels import natural_texts
from benchmarks.sections import replace_section
from benchmarks.server import DEFAULT_BANK, fill_store, server_process
from benchmarks.wrk import Workload, ensure_wrk
from benchmarks.wrk import run as run_wrk
from recast_core.backbone import load_text_backbone
from recast_core.datasets import load_splits
from server.runtime import load_or_build_bank


class Trainer:
    """Keeps one training job running on the server until stopped; counts the jobs that finished."""

    def __init__(self, url: str, examples: list[dict[str, str]]) -> None:
        self.url, self.examples = url, examples
        self.finished: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self._stop.is_set():
                body = {"examples": self.examples, "options": {"epochs": 50, "patience": 50}}
                created = http.post("/v1/tasks/bench-trained/train", json=body)
                created.raise_for_status()
                job_id = created.json()["job_id"]
                while not self._stop.wait(0.5):
                    job = http.get(f"/v1/jobs/{job_id}").json()
                    if job["state"] not in ("queued", "running"):
                        self.finished.append(job)
                        break
                else:
                    http.delete(f"/v1/jobs/{job_id}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    backbone = load_text_backbone()
    bank = load_or_build_bank(args.bank, backbone)
    trec = load_splits("trec").train
    examples = [
        {"text": t, "label": y} for t, y in list(zip(trec.texts, trec.labels, strict=True))[: args.examples]
    ]
    with tempfile.TemporaryDirectory(prefix="recast-trainload-") as tmp:
        work = Path(tmp)
        task_ids = [f"task-{i:07d}" for i in range(100)]
        fill_store(work / "tasks", bank, len(task_ids))
        env = {"RECAST_THREADS": str(args.server_threads)}
        wrk = ensure_wrk()
        workload = Workload.write(work / "wrk", task_ids, natural_texts(), "n100")

        def run_load(url: str, seconds: float, seed: int) -> dict[str, Any]:
            return run_wrk(wrk, url, workload, 1, seconds, args.concurrency, seed)

        with server_process(args.bank, work / "tasks", work / "server.log", env=env) as server:
            url = server["url"]
            trainer = Trainer(url, examples)
            phases: dict[str, list[dict[str, Any]]] = {"idle": [], "training": []}
            run_load(url, 3, seed=0)  # warm-up
            for round_ in range(args.rounds):
                for phase in ("idle", "training"):
                    if phase == "training":
                        trainer.start()
                        time.sleep(args.job_warmup)  # the job is past loading and embedding
                    result = run_load(url, args.seconds, seed=round_)
                    if phase == "training":
                        trainer.stop()
                    phases[phase].append(result)
                    print(
                        f"round {round_ + 1} {phase:8s}: {result['texts_per_s']:6.1f} texts/s, "
                        f"p50 {result['p50_ms']:6.1f} ms, p99 {result['p99_ms']:6.1f} ms, "
                        f"errors {result['errors']}",
                        flush=True,
                    )
    idle, busy = phases["idle"], phases["training"]

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    errors = sum(r["errors"] for rows in phases.values() for r in rows)
    return {
        "idle": {k: med(idle, k) for k in ("texts_per_s", "p50_ms", "p99_ms")},
        "training": {k: med(busy, k) for k in ("texts_per_s", "p50_ms", "p99_ms")},
        "p99_training_vs_idle": med(busy, "p99_ms") / med(idle, "p99_ms"),
        "p50_training_vs_idle": med(busy, "p50_ms") / med(idle, "p50_ms"),
        "throughput_training_vs_idle": med(busy, "texts_per_s") / med(idle, "texts_per_s"),
        "errors": errors,
        "jobs_finished_during_phases": len(trainer.finished),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} cores for torch, "
        f"Python {platform.python_version()}",
    }


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    command = (
        f"python -m benchmarks.training_load --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--concurrency {args.concurrency} --examples {args.examples}"
    )
    idle, busy = result["idle"], result["training"]
    return "\n".join(
        [
            "Predict latency while a training job runs (the job in its own process at the server's defaults:",
            "one torch thread, nice 10, Linux SCHED_IDLE), against the same load with no job, phases",
            "interleaved in one run (medians of the rounds):",
            "",
            f"    {command}",
            "",
            "| phase | texts/s | p50 ms | p99 ms |",
            "|---|---|---|---|",
            f"| no job | {idle['texts_per_s']:.1f} | {idle['p50_ms']:.1f} | {idle['p99_ms']:.1f} |",
            f"| training job running | {busy['texts_per_s']:.1f} | {busy['p50_ms']:.1f} "
            f"| {busy['p99_ms']:.1f} |",
            f"| ratio | {result['throughput_training_vs_idle']:.2f} | {result['p50_training_vs_idle']:.2f} "
            f"| {result['p99_training_vs_idle']:.2f} |",
            "",
            f"Errors: {result['errors']}. Machine: {result['machine']}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bank", type=Path, default=DEFAULT_BANK)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--job-warmup", type=float, default=10.0, help="seconds between job start and load")
    parser.add_argument("--write", type=Path, help="write the results into this markdown file's section")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = parser.parse_args()
    result = measure(args)
    text = render(result, args)
    print(text)
    if args.write is not None:
        replace_section(args.write, "training-load", text)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
