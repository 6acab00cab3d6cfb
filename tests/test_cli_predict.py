"""`recast predict --data FILE --out FILE` as a user runs it: real processes, a real task on the bundled
backbone, offline and against one live server, with bad rows mixed into the files."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from server_harness import serving, task_artifact

from recast_cli.main import build_parser
from recast_cli.predict_cmd import predict_file
from recast_client import Client
from recast_core.artifact import TaskArtifact
from recast_core.backbone import TextBackbone
from recast_core.bank import TemplateBank
from recast_core.datasets import Splits
from recast_core.task_model import Prediction, TextTaskModel
from server.settings import Settings

RECAST = str(Path(sys.executable).with_name("recast"))
LABELS = ("fact", "person", "place")
KEY = "files-admin-key"
MAX_INPUTS = 16  # the server's limit: the CSV needs seven requests


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RECAST, *args], capture_output=True, text=True, timeout=300, env=os.environ | (env or {})
    )


@dataclass(frozen=True)
class Expected:
    line: int  # where the row starts in the input
    id: str
    text: str | None  # None: a bad row
    error: str = ""  # a fragment of the bad row's error


@pytest.fixture(scope="module")
def artifact(default_bank: TemplateBank) -> TaskArtifact:
    made = task_artifact(default_bank, seed=11, labels=LABELS)
    return replace(made, head_weight=made.head_weight * 0.05)  # scores well inside (0, 1)


@pytest.fixture(scope="module")
def task_file(artifact: TaskArtifact, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "task.safetensors"
    artifact.save(path)
    return path


@pytest.fixture(scope="module")
def reference(backbone: TextBackbone, default_bank: TemplateBank, artifact: TaskArtifact) -> TextTaskModel:
    return TextTaskModel.from_artifact(backbone, default_bank, artifact)


@pytest.fixture(scope="module")
def csv_input(trec: Splits, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Expected]]:
    """100 real questions with bad rows among them, one per physical line except a quoted two-line text."""
    texts = list(trec.test.texts[:100])
    lines = ["id,text,source"]
    expected: list[Expected] = []

    def good(row_id: str, text: str) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([row_id, text, "trec"])
        expected.append(Expected(len(lines) + 1, row_id, text))
        lines.extend(buffer.getvalue().rstrip("\n").split("\n"))

    def bad(row_id: str, raw: str, error: str, bad_id: str | None = None) -> None:
        expected.append(Expected(len(lines) + 1, row_id if bad_id is None else bad_id, None, error))
        lines.append(raw)

    for i, text in enumerate(texts):
        good(f"q{i}", text)
        if i == 3:
            bad("e1", "e1,,trec", "empty text", bad_id="e1")
        elif i == 30:
            bad("e2", 'e2,"a "quoted" word",trec', "malformed CSV", bad_id="")
        elif i == 31:
            good("m1", "Who wrote\nHamlet ?")
        elif i == 50:
            bad("e3", "e3," + "word " * 1000 + ",trec", "the limit is 4096", bad_id="e3")
        elif i == 65:
            bad("e4", "e4,one,two,trec", "4 fields; the header has 3", bad_id="e4")
        elif i == 85:  # an unclosed quote: reported on its line, the rows after it still read
            bad("e5", 'e5,"never closed,trec', "malformed CSV", bad_id="")
    path = tmp_path_factory.mktemp("in") / "questions.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, expected


def read_csv_output(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def check_rows(
    rows: list[dict[str, str]], expected: list[Expected], reference: list[Prediction], tolerance: float
) -> None:
    """Input order, line numbers, ids, labels and scores of good rows, errors of bad ones."""
    assert [int(row["line"]) for row in rows] == [e.line for e in expected]
    answers = iter(reference)
    for row, want in zip(rows, expected, strict=True):
        assert row["id"] == want.id, row
        if want.text is None:
            assert want.error in row["error"] and not row["label"], row
            continue
        pred = next(answers)
        assert row["error"] == "" and row["label"] == pred.label, (row, pred)
        for label in LABELS:
            assert abs(float(row[f"score_{label}"]) - pred.scores[label]) < tolerance


@pytest.fixture(scope="module")
def offline_csv(
    bank_dir: Path,
    task_file: Path,
    csv_input: tuple[Path, list[Expected]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("out") / "predicted.csv"
    data = csv_input[0]
    proc = run(
        "predict", "--bank", str(bank_dir), "--task", str(task_file), "--data", str(data), "--out", str(out)
    )
    return proc, out


def test_offline_csv_keeps_order_and_reports_bad_rows(
    offline_csv: tuple[subprocess.CompletedProcess[str], Path],
    csv_input: tuple[Path, list[Expected]],
    reference: TextTaskModel,
) -> None:
    proc, out = offline_csv
    expected = csv_input[1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    columns, rows = read_csv_output(out)
    assert columns == ["line", "id", "label", *(f"score_{c}" for c in LABELS), "error"]
    good = [e.text for e in expected if e.text is not None]
    assert len(good) == 101 and "Who wrote\nHamlet ?" in good
    check_rows(rows, expected, reference.predict(good), tolerance=1e-5)
    bad = [e for e in expected if e.text is None]
    for want in bad:
        assert f"recast predict: line {want.line}: " in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"recast predict: {len(bad)} of {len(expected)} rows failed")
    )


def test_offline_jsonl_to_csv(
    backbone: TextBackbone,
    default_bank: TemplateBank,
    task_file: Path,
    reference: TextTaskModel,
    trec: Splits,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In this process (the CSV test runs the command): the session's backbone and bank, no reload."""
    texts = list(trec.test.texts[200:212])
    lines = [json.dumps({"id": i, "question": text}) for i, text in enumerate(texts)]
    lines[2:2] = ['{"id": "x1", "question": "unterminated']  # line 3
    lines[5:5] = ['{"id": "x2", "text": "no question key"}']  # line 6
    lines[7:7] = [""]  # line 8: blank, skipped
    lines[9:9] = ['{"id": "x3", "question": "\\ud800 a lone surrogate"}']  # line 10
    lines[11:11] = ['["not", "an", "object"]', '{"id": "x4", "question": 42}']  # lines 12, 13
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(lines), encoding="utf-8")  # no newline after the last line
    out = tmp_path / "out.csv"
    args = build_parser().parse_args(
        ["predict", "--bank", str(tmp_path), "--task", str(task_file), "--data", str(data), "--out", str(out),
         "--text-column", "question"]
    )  # fmt: skip
    code = predict_file(args, lambda _: (backbone, default_bank))
    stderr = capsys.readouterr().err
    assert code == 1, stderr
    _, rows = read_csv_output(out)
    bad = {3: ("", "not valid JSON"), 6: ("x2", "no 'question' key"), 10: ("x3", "not valid UTF-8"),
           12: ("", "not a JSON object"), 13: ("x4", "must be a string")}  # fmt: skip
    expected = []
    good = iter(enumerate(texts))
    for number in range(1, len(lines) + 1):
        if number == 8:
            continue
        if number in bad:
            expected.append(Expected(number, bad[number][0], None, bad[number][1]))
        else:
            i, text = next(good)
            expected.append(Expected(number, str(i), text))
    check_rows(rows, expected, reference.predict(texts), tolerance=1e-5)
    assert f"recast predict: {len(bad)} of {len(expected)} rows failed" in stderr
    assert all(f"recast predict: line {number}: " in stderr for number in bad)


def test_jsonl_ids_after_the_first_chunk_reach_the_csv(
    backbone: TextBackbone,
    default_bank: TemplateBank,
    task_file: Path,
    trec: Splits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CSV's columns are fixed by its header: an id first seen in a later chunk still has its column."""
    from recast_cli import predict_cmd

    monkeypatch.setattr(predict_cmd.OfflineBackend, "chunk_size", 3)
    texts = list(trec.test.texts[:7])
    records = [{"text": text} for text in texts]
    records[5]["id"] = "late"  # in the second chunk of three rows
    data = tmp_path / "late-ids.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    out = tmp_path / "late-ids.csv"
    args = build_parser().parse_args(
        ["predict", "--bank", str(tmp_path), "--task", str(task_file), "--data", str(data), "--out", str(out)]
    )
    assert predict_file(args, lambda _: (backbone, default_bank)) == 0
    header, rows = read_csv_output(out)
    assert header[:3] == ["line", "id", "label"]
    assert [row["id"] for row in rows] == ["", "", "", "", "", "late", ""]
    assert [int(row["line"]) for row in rows] == list(range(1, 8))


@pytest.fixture(scope="module")
def server_url(bank_dir: Path, task_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        bank=bank_dir,
        store=str(tmp_path_factory.mktemp("store")),
        api_keys=KEY,
        predict_requires_key=True,
        device="cpu",
        dtype="float32",  # bf16 on CPUs with native bf16 would move scores by more than 1e-4
        max_inputs=MAX_INPUTS,
        rate_limit_per_s=10.0,  # the first four requests at once overrun the burst: 429, retried
        rate_limit_burst=2,
        preload=f"questions={task_file}",
    )
    with serving(settings) as url:
        yield url


def test_server_matches_offline_through_retries(
    server_url: str,
    offline_csv: tuple[subprocess.CompletedProcess[str], Path],
    csv_input: tuple[Path, list[Expected]],
    tmp_path: Path,
) -> None:
    data, expected = csv_input
    out = tmp_path / "served.jsonl"
    proc = run(
        "predict", "--task-id", "questions", "--url", server_url, "--data", str(data), "--out", str(out),
        env={"RECAST_API_KEY": KEY},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    served = [json.loads(line) for line in out.read_text().splitlines()]
    _, offline = read_csv_output(offline_csv[1])
    assert [r["line"] for r in served] == [int(r["line"]) for r in offline] == [e.line for e in expected]
    for mine, theirs in zip(served, offline, strict=True):
        assert str(mine.get("id", "")) == theirs["id"]
        if theirs["error"]:
            assert "label" not in mine and mine["error"] == theirs["error"], (mine, theirs)
            continue
        assert mine["label"] == theirs["label"], (mine, theirs)
        for label in LABELS:
            assert abs(mine["scores"][label] - float(theirs[f"score_{label}"])) < 1e-4
    with Client(server_url, KEY) as client:  # where the command's request size comes from
        assert client.predict_limits() == {"max_inputs": MAX_INPUTS, "max_input_chars": 4096}
    metrics = httpx.get(f"{server_url}/metrics").text
    endpoint = re.escape('endpoint="/v1/tasks/{task_id}/predict",method="POST"')
    series = rf'^recast_requests_total\{{{endpoint},status="(\d+)"\}} (\S+)$'
    predicts = re.findall(series, metrics, re.MULTILINE)
    by_status = {status: float(count) for status, count in predicts}
    assert by_status.get("200", 0) >= len(expected) / MAX_INPUTS  # several chunks
    assert by_status.get("429", 0) >= 1  # refused under the rate limit, then retried


def test_server_errors_are_one_line(
    server_url: str, csv_input: tuple[Path, list[Expected]], tmp_path: Path
) -> None:
    data = str(csv_input[0])
    out = str(tmp_path / "o.csv")
    for env, task, fragment in (
        ({"RECAST_API_KEY": KEY}, "no-such-task", "no-such-task"),
        ({"RECAST_API_KEY": "wrong"}, "questions", "key"),
    ):
        proc = run("predict", "--task-id", task, "--url", server_url, "--data", data, "--out", out, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("recast predict: error:") and fragment in lines[0], lines


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing file", "no such file"),
        ("unknown column", "no column 'body'"),
        ("both", "one of --task"),
        ("neither", "one of --task"),
        ("no out", "needs --out"),
    ],
)
def test_usage_errors_exit_2(
    case: str, fragment: str, bank_dir: Path, csv_input: tuple[Path, list[Expected]], tmp_path: Path
) -> None:
    task = str(tmp_path / "never-read.safetensors")
    data, out = str(csv_input[0]), str(tmp_path / "o.csv")
    offline = ["--bank", str(bank_dir), "--task", task]
    args = {
        "missing file": [*offline, "--data", str(tmp_path / "nope.csv"), "--out", out],
        "unknown column": [*offline, "--data", data, "--out", out, "--text-column", "body"],
        "both": [*offline, "--task-id", "t", "--data", data, "--out", out],
        "neither": ["--data", data, "--out", out],
        "no out": [*offline, "--data", data],
    }[case]
    proc = run("predict", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("recast predict: error:") and fragment in lines[0], lines
    assert not Path(out).exists()
