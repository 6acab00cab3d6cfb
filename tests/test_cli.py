"""The `recast` command as a user runs it: real processes, real bank, real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recast_core.data import load_labelled
from recast_core.train_options import LR_GRID

RECAST = str(Path(sys.executable).with_name("recast"))


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([RECAST, *args], capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cli_bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "bank"
    proc = run("mimic", "--out", str(out))
    assert "output cosine" in proc.stdout
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    run("datasets", "export", "trec", "--out", str(out))
    train = load_labelled(out / "train.csv")
    train.subset(range(400)).to_csv(out / "small.csv")
    load_labelled(out / "test.csv").subset(range(300)).to_csv(out / "small_test.csv")
    return out


def test_mimic_writes_bank_and_report(cli_bank: Path) -> None:
    report = json.loads((cli_bank / "mimicry.json").read_text())
    assert report["output_cosine"] > 0.9999
    assert report["max_relative_error"] < 1e-5
    assert report["seconds"] > 0 and len(report["fingerprint"]) == 64
    assert (cli_bank / "bank.safetensors").stat().st_size > 1_000_000


@pytest.mark.slow
def test_train_inspect_predict(cli_bank: Path, data_dir: Path, tmp_path: Path) -> None:
    task = tmp_path / "trec.safetensors"
    proc = run(
        "train",
        "--bank",
        str(cli_bank),
        "--data",
        str(data_dir / "small.csv"),
        "--test-data",
        str(data_dir / "small_test.csv"),
        "--out",
        str(task),
        "--epochs",
        "2",
        "--select-epochs",
        "1",
        "--capacity",
        "ffn_edit",
    )
    assert "4656 per-task parameters (ffn_edit, mean pooling)" in proc.stdout
    assert "validation accuracy" in proc.stdout and "test accuracy" in proc.stdout
    assert "coefficient learning rate" in proc.stdout and "chosen on validation" in proc.stdout
    info = json.loads(run("inspect", str(task)).stdout)
    assert info["training"]["lr"] in LR_GRID and len(info["training"]["lr_trials"]) == len(LR_GRID)
    assert info["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert info["trainable_parameters"] == 48 + 2 * 6 * 384 and info["head_parameters"] == 6 * 385
    assert info["bytes"] == task.stat().st_size < 40 * 1024 and info["schema_version"] == 3
    assert info["training"]["capacity"] == "ffn_edit"
    assert 0.5 < info["training"]["val_accuracy"] <= 1 and 0.5 < info["training"]["test_accuracy"] <= 1
    assert info["bank_fingerprint"] == json.loads((cli_bank / "mimicry.json").read_text())["fingerprint"]
    proc = run(
        "predict", "--bank", str(cli_bank), "--task", str(task), "Who wrote Hamlet?", "How far is Mars?"
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["Who wrote Hamlet?", "How far is Mars?"]
    assert lines[0]["label"] == "HUM" and lines[1]["label"] == "NUM"
    assert abs(sum(lines[0]["scores"].values()) - 1) < 1e-5


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("nocol.csv", b"sentence,label\nhello,a\nbye,b\n", "missing column(s) ['text']"),
        ("one.csv", b"text,label\nhello,a\nbye,a\n", "at least 2 classes"),
        ("empty.csv", b"", "empty"),
        ("latin1.csv", "text,label\ncaf\xe9,a\nthé,b\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_data_is_one_line_and_exit_2(tmp_path: Path, name: str, content: bytes, fragment: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    proc = run(
        "train", "--bank", str(tmp_path), "--data", str(path), "--out", str(tmp_path / "t.st"), ok=False
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recast train: error:") and fragment in lines[0], (
        proc.stderr
    )
    assert not (tmp_path / "t.st").exists()


def test_corrupt_artifact_and_missing_bank_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    proc = run("inspect", str(bad), ok=False)
    assert proc.returncode == 2 and "truncated header" in proc.stderr
    proc = run("predict", "--bank", str(tmp_path / "nope"), "--task", str(bad), "hi", ok=False)
    assert proc.returncode == 2 and "no template bank" in proc.stderr
