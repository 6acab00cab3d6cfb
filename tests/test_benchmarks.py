"""The benchmarks run end to end at a tiny budget (smoke tests; their real figures live in docs/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.accuracy import METHODS, POOLING_OF, TASKS
from benchmarks.vision import VISION_TASKS

KEYS = {
    "task",
    "method",
    "seed",
    "test_accuracy",
    "val_accuracy",
    "trainable_params",
    "head_params",
    "artifact_bytes",
    "train_seconds",
}


@pytest.mark.slow
def test_accuracy_quick_writes_every_task_and_method(tmp_path: Path) -> None:
    """Every method on one text task and on each vision backbone (the full table is the benchmark's)."""
    out = tmp_path / "docs"
    tasks = ("trec", "digits@vit", "digits@resnet")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.accuracy",
        "--quick",
        "--out",
        str(out),
        "--cache",
        str(tmp_path),
        "--tasks",
        *tasks,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert set(tasks) <= set(TASKS)
    planned = {(t, m) for t in tasks for m in METHODS if not (t in VISION_TASKS and m in POOLING_OF)}
    assert {(r["task"], r["method"]) for r in runs} == planned
    for row in runs:
        assert set(row) >= KEYS, row
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["artifact_bytes"] > 0
    by_method = {r["method"]: r for r in runs if r["task"] == "trec"}
    assert by_method["recast"]["trainable_params"] == 96  # 48 per K set, K = 2
    assert by_method["recast_ffn"]["trainable_params"] == 96 + 2 * 6 * 384  # and the FFN edit
    assert by_method["recast_pool"]["trainable_params"] == 96 + 384  # and the pooling query
    assert by_method["recast_ffn_pool"]["trainable_params"] == 96 + 2 * 6 * 384 + 384
    assert by_method["recast_ffn"]["stored_params"] == 48 + 2 * 6 * 384
    assert by_method["linear_probe"]["trainable_params"] == 0
    assert by_method["lora_r8"]["trainable_params"] == 6 * (3 * 8 * 768 + 8 * 768 + 2 * 8 * (384 + 1536))
    assert by_method["full_ft"]["trainable_params"] > 22_000_000
    assert by_method["recast"]["artifact_bytes"] < by_method["lora_r8"]["artifact_bytes"] / 50
    table = (out / "results.md").read_text()
    assert all(m in table for m in METHODS) and (out / "results.png").stat().st_size > 1000


def test_soak_briefly_has_no_errors_and_reports_every_window(bank_dir: Path, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    cmd = [sys.executable, "-m", "benchmarks.soak", "--minutes", "0.4", "--window", "6", "--warmup", "3"]
    cmd += ["--tasks", "60", "--concurrency", "3", "--mutations-per-s", "4", "--bank", str(bank_dir)]
    cmd += ["--write", str(doc), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["error_rate"] == 0.0 and result["error_samples"] == []
    # 3 connections never overload the server so much that more than a tenth of requests are refused
    assert result["throttled_429"] <= result["requests"] // 10 and result["requests"] > 20
    windows = result["windows"]
    assert [w["window"] for w in windows] == [0, 1, 2, 3]
    for w in windows:
        assert w["answered"] > 0 and w["errors"] == 0
        assert 0 < w["p50_ms"] <= w["p99_ms"] < 30_000
        assert 100 < w["rss_mib"] < 16_000
    assert 0 < result["p99_drift"] < 100 and abs(result["rss_growth_mib"]) < 1000
    assert result["uploads"] > 0 and result["uploads_servable_on_next_request"] == result["uploads"]
    assert result["deletes"] > 0 and result["deletes_404_on_next_request"] == result["deletes"]
    assert result["recreated_servable_on_next_request"] == result["recreated"] == result["deletes"]
    assert result["all_changes_servable"] and result["tasks_listed_after"] == 60
    section = doc.read_text()
    assert "<!-- soak:begin -->" in section and "<!-- soak:end -->" in section
    assert "python -m benchmarks.soak --minutes 0.4 --tasks 60" in section and "| 3 |" in section


def test_the_gpu_benchmark_says_so_and_succeeds_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU host runs the benchmark for real")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no CUDA device")


def test_the_server_benchmark_drives_the_server_with_wrk(bank_dir: Path, tmp_path: Path) -> None:
    """Every phase answered without errors by a real server under wrk, the limit measured beside it."""
    doc = tmp_path / "benchmarks.md"
    cmd = [sys.executable, "-m", "benchmarks.server", "--tasks", "1", "20", "--texts-per-request", "1", "4"]
    cmd += [
        "--seconds",
        "2",
        "--rounds",
        "1",
        "--concurrency",
        "4",
        "--uploads",
        "5",
        "--bank",
        str(bank_dir),
    ]
    cmd += ["--dtype", "float32", "--write", str(doc), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {(r["texts_per_request"], r["tasks"]): r for r in result["rows"]}
    assert set(rows) == {(1, 1), (1, 20), (4, 1), (4, 20)}
    for r in rows.values():
        assert r["errors"] == 0 and r["texts_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["plain_limit_texts_per_s"] > 0 and r["limit_batch"] == min(64, 4 * r["texts_per_request"])
        assert r["mean_batch_texts"] >= 1 and r["wrk_cpu_percent"] < r["server_cpu_percent"], r
    assert rows[(1, 1)]["vs_one_task"] == 1.0 and rows[(4, 1)]["vs_one_task"] == 1.0
    assert result["uploads"]["servable_on_next_request"] == 5 and result["dtype"] == "float32"
    section = doc.read_text()
    assert "<!-- server:begin -->" in section and "| 4 | 20 |" in section and "wrk" in section


def test_kernel_ratios_pair_each_method_with_the_base_of_its_own_round() -> None:
    from benchmarks.kernels import paired_ratios

    # A slow spell (3x) covers rounds 2 and 3 of plain but only round 2 of the method: the ratio of the
    # two medians would say 2.7 x plain; within most rounds the method is 0.9 x plain.
    times = {"plain": [1.0, 3.0, 3.0], "hetero": [1.0 / 0.9, 3.0 / 0.9, 1.0 / 0.9]}
    assert paired_ratios(times) == pytest.approx({"hetero": 0.9})
    with pytest.raises(ValueError):  # every method has a time in every round
        paired_ratios({"plain": [1.0, 2.0], "hetero": [1.0]})


def test_the_kernel_benchmark_runs_a_part_of_its_table(tmp_path: Path) -> None:
    """A tiny run of `benchmarks.kernels` with a subset of methods: every kind of batch, the CPU named,
    the variants reported, the missing columns shown as such; a subset is never written over a record."""
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--batches", "2", "--natural", "3", "--rounds", "1"]
    cmd += ["--methods", "hetero", "homo", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["batch"], r["natural"]) for r in rows] == [(2, False), (3, True)]
    for row in rows:
        assert row["hetero_vs_plain"] > 0 and row["homo_vs_plain"] > 0 and "peft_mixed_vs_plain" not in row
        assert row["variants"], row  # the variant the dispatcher picked for the mixed batch
    assert "| 2 x 64 |" in done.stdout and "| - | - | - |" in done.stdout
    from kernels import cpu_features

    assert cpu_features.describe() in done.stdout
    refused = subprocess.run(
        [*cmd[:-1], "--write", str(tmp_path / "b.md")], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "not written over the record" in refused.stderr
    assert not (tmp_path / "b.md").exists()
