"""Training jobs end to end on a real uvicorn server: create, follow, publish, predict; bad data; cancel."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import serving, training_settings

from recast_cli.main import main as recast
from recast_core.datasets import Splits, load_splits
from recast_core.train_options import LR_GRID
from server.errors import UnknownJob
from server.settings import Settings
from server.stores.directory import DirectoryStore
from server.stores.jobs import DirectoryJobStore
from server.tasks.catalog import TaskCatalog
from server.tasks.registry import TaskRegistry
from server.training.manager import JobManager
from server.training.records import Job

KEY = "jobs-admin"
ADMIN = {"Authorization": f"Bearer {KEY}"}
FAST = {"epochs": 2, "max_length": 32, "batch_size": 32, "select_epochs": 1}


@pytest.fixture(scope="module")
def sms() -> Splits:
    return load_splits("sms_spam")


def _examples(splits: Splits, count: int) -> list[dict[str, str]]:
    """`count` training examples, both classes represented."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(splits.train.labels):
        by_label.setdefault(label, []).append(i)
    picked = sorted(i for ids in by_label.values() for i in ids[: count // len(by_label)])
    return [{"text": splits.train.texts[i], "label": splits.train.labels[i]} for i in picked]


def _wait(http: httpx.Client, job_id: str, timeout: float = 240.0) -> tuple[dict[str, Any], list[float]]:
    """Poll the job until it ends; returns its last view and the progress values seen while it ran."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
        if job["state"] == "running":
            seen.append(job["progress"])
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job, seen
        assert time.monotonic() < deadline, f"job still {job['state']} after {timeout} s"
        time.sleep(0.3)


def test_a_job_trains_publishes_and_serves_a_task(
    bank_dir: Path, tmp_path: Path, sms: Splits, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = training_settings(bank_dir, tmp_path / "tasks", KEY)
    examples = _examples(sms, 240)
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        created = http.post(
            "/v1/tasks/spam/train",
            json={"examples": examples, "options": FAST | {"capacity": "ffn_edit"}},
            headers=ADMIN,
        )
        assert created.status_code == 202, created.text
        job = created.json()
        assert created.headers["Location"] == f"/v1/jobs/{job['job_id']}"
        assert job["state"] == "queued" and job["examples"] == len(examples)
        assert job["labels"] == ["ham", "spam"] and job["options"]["epochs"] == 2
        assert http.get("/v1/tasks/spam").status_code == 404  # nothing served before the job succeeds

        done, progress = _wait(http, job["job_id"])
        assert done["state"] == "succeeded", done
        assert progress and progress == sorted(progress) and all(0 <= p <= 1 for p in progress)
        result = done["result"]
        assert result["version"] == 1 and result["train_examples"] + result["val_examples"] == len(examples)
        assert result["val_accuracy"] >= 0.8  # SMS spam is easy; a broken training would be near 0.5
        # no lr in the options: it was chosen on validation, and the result says which
        assert result["lr"] in LR_GRID and len(result["lr_trials"]) == len(LR_GRID)
        assert result["capacity"] == "ffn_edit" and result["trained_parameters"] == 2 * 48 + 2 * 6 * 384

        task = http.get("/v1/tasks/spam").json()
        assert task["version"] == 1 and task["labels"] == ["ham", "spam"]
        assert task["trainable_parameters"] == 48 + 2 * 6 * 384  # served with its FFN edit
        texts = ["WINNER!! You have won a free prize, call now to claim", "ok see you at 5 then"]
        answer = http.post("/v1/tasks/spam/predict", json={"inputs": texts}).json()
        assert [o["label"] for o in answer["outputs"]] == ["spam", "ham"]
        assert [j["job_id"] for j in http.get("/v1/jobs", headers=ADMIN).json()["jobs"]] == [job["job_id"]]

        # the same from a CSV file through the command line (client, CSV body, progress): version 2
        data = tmp_path / "spam.csv"
        with data.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(examples)
        cli = ["tasks", "train", "spam", str(data), "--epochs", "1", "--wait", "--url", url, "--api-key", KEY]
        assert recast(cli) == 0
        done = json.loads(capsys.readouterr().out)
        assert (
            done["state"] == "succeeded" and done["result"]["version"] == 2 and done["options"]["epochs"] == 1
        )
        assert http.get("/v1/tasks/spam").json()["version"] == 2
        metrics = http.get("/metrics").text
        assert 'recast_training_jobs_total{state="succeeded"} 2.0' in metrics


def test_bad_training_requests_are_refused_up_front(bank_dir: Path, tmp_path: Path, sms: Splits) -> None:
    settings = Settings(
        bank=bank_dir, store=str(tmp_path / "tasks"), api_keys=KEY, threads=2, max_train_examples=50
    )
    examples = _examples(sms, 40)
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as http:

        def refused(body: Any, headers: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, str, str]:
            answer = http.post("/v1/tasks/t/train", headers=ADMIN | (headers or {}), **body, **kwargs)
            return answer.status_code, answer.json()["error_type"], answer.json()["error"]

        one_class = [e | {"label": "ham"} for e in examples]
        assert refused({"json": {"examples": one_class}})[:2] == (400, "bad_input")
        assert "at least 2 classes" in refused({"json": {"examples": one_class}})[2]
        lonely = [*examples[:10], {"text": "x", "label": "rare"}]
        assert "fewer than 2 examples" in refused({"json": {"examples": lonely}})[2]
        assert refused({"json": {"examples": examples * 2}})[2].startswith(
            "80 examples; a training job takes"
        )
        assert "epochs" in refused({"json": {"examples": examples, "options": {"epochs": 0}}})[2]
        assert "extra" in refused({"json": {"examples": examples, "options": {"nope": 1}}})[2].lower()
        assert refused({"json": {"examples": [{"text": "", "label": "a"}]}})[:2] == (400, "bad_input")
        assert refused({"content": b"{not json"}, {"Content-Type": "application/json"})[:2] == (
            400,
            "bad_input",
        )
        assert "missing column" in refused({"content": b"a,b\n1,2\n"}, {"Content-Type": "text/csv"})[2]
        assert refused({"content": b"x"}, {"Content-Type": "text/plain"})[:2] == (
            415,
            "unsupported_media_type",
        )
        # strict JSON (nothing coerced), one name per CSV column, bounded query options
        coerced = [*examples, {"text": "x", "label": True}]
        assert "examples.40.label" in refused({"json": {"examples": coerced}})[2]
        assert "options.lr" in refused({"json": {"examples": examples, "options": {"lr": "1e-3"}}})[2]
        csv_body = b"text,text,label\n" + b"".join(b"a,b,%d\n" % (i % 2) for i in range(8))
        status, _, message = refused({"content": csv_body}, {"Content-Type": "text/csv"})
        assert status == 400 and "'text'" in message and "more than once" in message
        for name, bad in (("epochs", 0), ("epochs", 51), ("max_length", 4), ("seed", -1), ("seed", 2**31)):
            status, kind, message = refused({"json": {"examples": examples}}, params={name: bad})
            assert (status, kind) == (400, "bad_input") and name in message
        assert refused({"json": {"examples": examples}}, params={"epochs": "true"})[:2] == (400, "bad_input")
        openapi = http.get("/openapi.json").json()
        train = openapi["paths"]["/v1/tasks/{task_id}/train"]["post"]
        bounds = {p["name"]: json.dumps(p["schema"]) for p in train["parameters"] if p["in"] == "query"}
        assert '"minimum": 1' in bounds["epochs"] and '"maximum": 50' in bounds["epochs"]
        assert '"minimum": 8' in bounds["max_length"] and '"maximum": 512' in bounds["max_length"]
        assert '"minimum": 0' in bounds["seed"] and f'"maximum": {2**31 - 1}' in bounds["seed"]
        cancel = openapi["paths"]["/v1/jobs/{job_id}"]["delete"]
        assert cancel["summary"] == "Cancel a job" and "cancel" in cancel["description"].lower()

        no_key = http.post("/v1/tasks/t/train", json={"examples": examples})
        assert no_key.status_code == 401
        assert http.get("/v1/jobs/" + "0" * 32, headers=ADMIN).json()["error_type"] == "unknown_job"
        assert http.get("/v1/jobs/not-a-job", headers=ADMIN).status_code == 404
        assert http.get("/v1/jobs", headers=ADMIN).json() == {"jobs": []}  # nothing was queued


def test_cancel_a_running_job_and_jobs_cut_short_by_a_stop_are_failed(
    bank_dir: Path, tmp_path: Path, sms: Splits
) -> None:
    settings = training_settings(bank_dir, tmp_path / "tasks", KEY)
    slow = {"epochs": 50, "patience": 50, "max_length": 64, "batch_size": 8}
    examples = _examples(sms, 300)
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        first = http.post(
            "/v1/tasks/a/train", json={"examples": examples, "options": slow}, headers=ADMIN
        ).json()
        queued = http.post(
            "/v1/tasks/b/train", json={"examples": examples, "options": slow}, headers=ADMIN
        ).json()
        # the second waits (one job at a time): cancelling it is immediate
        cancelled = http.delete(f"/v1/jobs/{queued['job_id']}", headers=ADMIN).json()
        assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled before it started"
        deadline = time.monotonic() + 300
        while http.get(f"/v1/jobs/{first['job_id']}", headers=ADMIN).json()["phase"] != "training":
            assert time.monotonic() < deadline, "the job never reached training"
            time.sleep(0.3)
        start = time.monotonic()
        stopped = http.delete(f"/v1/jobs/{first['job_id']}", headers=ADMIN)
        assert stopped.status_code == 200 and stopped.json()["state"] == "cancelled"
        assert time.monotonic() - start < 15
        again = http.delete(f"/v1/jobs/{first['job_id']}", headers=ADMIN)
        assert (again.status_code, again.json()["error_type"]) == (409, "job_finished")
        assert http.get("/v1/tasks/a").status_code == 404  # a cancelled job publishes nothing
        assert http.post("/v1/tasks/a/predict", json={"inputs": ["still serving?"]}).status_code == 404
        third = http.post(
            "/v1/tasks/c/train", json={"examples": examples, "options": slow}, headers=ADMIN
        ).json()
    # the server stopped with `third` unfinished: recorded as failed, not lost
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.get(f"/v1/jobs/{third['job_id']}", headers=ADMIN).json()
        assert job["state"] == "failed" and "stopped" in job["error"]
        states = {j["job_id"]: j["state"] for j in http.get("/v1/jobs", headers=ADMIN).json()["jobs"]}
        assert states == {
            first["job_id"]: "cancelled",
            queued["job_id"]: "cancelled",
            third["job_id"]: "failed",
        }


def test_unfinished_jobs_of_a_crashed_server_are_marked_failed(tmp_path: Path) -> None:
    """A SIGKILLed server cannot record anything: the next start finds its unfinished jobs and fails them."""
    store = DirectoryJobStore(tmp_path / "tasks" / ".jobs")
    stamp = "2026-01-01T00:00:00.000Z"
    for job_id, state in (("a" * 32, "running"), ("b" * 32, "queued"), ("c" * 32, "succeeded")):
        job = Job(job_id, "default", "t", state, stamp, stamp, "gone", 10, ["x", "y"], {})  # type: ignore[arg-type]
        store.create(job.to_record() | ({"finished": stamp} if state == "succeeded" else {}))
    catalog = TaskCatalog(DirectoryStore(tmp_path / "tasks"), TaskRegistry(None))  # type: ignore[arg-type]
    manager = JobManager(store, catalog, tmp_path / "bank", "f" * 64)
    try:
        states = {r["job_id"][0]: (r["state"], r["error"]) for r in store.list(None, 10)}
        assert states["a"][0] == states["b"][0] == "failed" and "stopped" in str(states["a"][1])
        assert states["c"] == ("succeeded", None)
    finally:
        manager.close()


def test_postgresql_job_store_is_shared_and_only_stale_jobs_are_failed(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """With PostgreSQL, other replicas' jobs are live while they heartbeat; a silent one is failed."""
    from datetime import UTC, datetime

    from server.stores.jobs import PostgresJobStore

    store = PostgresJobStore(postgres_dsn, "postgresql://test")
    fresh = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    stale = "2026-01-01T00:00:00.000Z"
    records = {
        "d" * 32: ("team-a", "running", fresh),
        "e" * 32: ("team-a", "running", stale),
        "f" * 32: ("team-b", "queued", fresh),
    }
    for job_id, (tenant, state, beat) in records.items():
        job = Job(job_id, tenant, "t", state, beat, beat, "other-replica", 10, ["x", "y"], {})  # type: ignore[arg-type]
        store.create(job.to_record())
    other = PostgresJobStore(postgres_dsn, "postgresql://test")
    assert other.get("team-a", "d" * 32) == store.get("team-a", "d" * 32) is not None
    assert store.get("team-a", "0" * 32) is None and store.get("team-a", "not-a-job") is None
    assert store.get("team-b", "d" * 32) is None  # another tenant's job
    catalog = TaskCatalog(DirectoryStore(tmp_path / "tasks"), TaskRegistry(None))  # type: ignore[arg-type]
    manager = JobManager(store, catalog, tmp_path / "bank", "f" * 64)
    try:
        states = {r["job_id"][0]: r["state"] for r in store.list(None, 10)}
        assert states == {"d": "running", "e": "failed", "f": "queued"}
        assert [j.job_id[0] for j in manager.list("team-a")] == ["d", "e"]  # newest first
        assert manager.get("team-b", "f" * 32).state == "queued"
        with pytest.raises(UnknownJob):
            manager.get("team-a", "f" * 32)  # another tenant's job is unknown
    finally:
        manager.close()
