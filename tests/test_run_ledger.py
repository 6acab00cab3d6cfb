"""The accuracy table's shared results.json: claims divide the runs; records of several processes all land."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run_ledger import Ledger

BUDGET = {"max_train": 8, "seeds": (0, 1)}


def _row(task: str, method: str, seed: int) -> dict[str, object]:
    return {"task": task, "method": method, "seed": seed, "test_accuracy": 0.5}


def test_a_run_is_claimed_once_and_not_again_once_recorded(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, BUDGET)
    run = ("trec", "recast", 0)
    assert ledger.claim(run)
    assert not ledger.claim(run)  # claimed by a live process (this one)
    ledger.record(run, _row(*run))
    assert not ledger.claim(run)  # finished
    assert [(r["task"], r["method"], r["seed"]) for r in ledger.runs()] == [run]
    other = ("trec", "lora_r8", 1)
    assert ledger.claim(other)
    ledger.release(other)  # a failed run gives its claim back
    assert ledger.claim(other)


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, BUDGET)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    run = ("digits@vit", "recast_ffn", 2)
    (tmp_path / ".claims" / "digits-at-vit__recast_ffn__2").write_text(dead.stdout.decode().strip())
    assert ledger.claim(run)


def test_another_budget_is_refused(tmp_path: Path) -> None:
    Ledger(tmp_path, BUDGET).record(("trec", "recast", 0), _row("trec", "recast", 0))
    with pytest.raises(SystemExit, match="budget"):
        Ledger(tmp_path, {"max_train": 9}).runs()


def _worker(out: str, worker: int) -> None:
    ledger = Ledger(Path(out), BUDGET)
    for seed in range(15):
        run = ("sms_spam", f"m{worker}", seed)
        assert ledger.claim(run)
        ledger.record(run, _row(*run))


def test_records_of_concurrent_processes_all_land(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(str(tmp_path), w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (f"m{w}", s) for w in range(4) for s in range(15)
    )
    assert not list((tmp_path / ".claims").iterdir())
