"""The server end to end: the real app and lifespan under a real uvicorn server on loopback, real MiniLM."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import serving, task_artifact

from recast_core.artifact import TaskArtifact
from recast_core.backbone import TextBackbone
from recast_core.bank import TemplateBank
from recast_core.task_model import TextTaskModel
from server.settings import Settings

KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/octet-stream"}
TEXTS = ["Who wrote Hamlet?", "How far is the Moon?", "free entry in a weekly prize draw", "ok see you at 5"]


def _settings(bank_dir: Path, store: Path | str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "bank": bank_dir,
        "store": str(store),
        "api_keys": KEY,
        "max_wait_ms": 5.0,
        "threads": 2,
        "dtype": "float32",  # compared with the float32 offline model within 1e-4
    }
    return Settings(**(values | overrides))


def _expected(backbone: TextBackbone, bank: TemplateBank, artifact: TaskArtifact) -> list[dict[str, Any]]:
    model = TextTaskModel.from_artifact(backbone, bank, artifact)
    return [{"label": p.label, "scores": p.scores} for p in model.predict(TEXTS, max_length=64)]


def _assert_outputs(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [o["label"] for o in got] == [o["label"] for o in want]
    for g, w in zip(got, want, strict=True):
        assert g["scores"].keys() == w["scores"].keys()
        for label, p in w["scores"].items():
            assert abs(g["scores"][label] - p) < 1e-4, (label, g["scores"][label], p)


@pytest.fixture(scope="module")
def artifacts(default_bank: TemplateBank) -> dict[str, TaskArtifact]:
    return {
        "sentiment": task_artifact(default_bank, 1),
        "topic": task_artifact(default_bank, 2, labels=("sports", "science", "arts")),
        "spam": task_artifact(default_bank, 3, labels=("ham", "spam")),
    }


def test_upload_predict_list_delete_and_metrics(
    bank_dir: Path,
    tmp_path: Path,
    backbone: TextBackbone,
    default_bank: TemplateBank,
    artifacts: dict[str, TaskArtifact],
) -> None:
    with (
        serving(_settings(bank_dir, tmp_path / "tasks")) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json()["status"] == "ready"
        assert "/v1/tasks/{task_id}/predict" in http.get("/openapi.json").json()["paths"]
        assert http.get("/docs").status_code == 200
        info = http.get("/v1/backbone").json()
        assert info["bank"]["fingerprint"] == default_bank.fingerprint
        assert info["kernel"]["path"] == "torch" and info["store"] == "directory"

        data = artifacts["sentiment"].to_bytes()
        created = http.put("/v1/tasks/sentiment", content=data, headers=ADMIN)
        assert created.status_code == 201, created.text
        assert created.json()["version"] == 1 and created.headers["etag"] == '"1"'
        assert float(created.headers["server-timing"].partition("upload;dur=")[2]) > 0
        assert created.json()["trainable_parameters"] == default_bank.num_slots * default_bank.num_templates
        assert http.put("/v1/tasks/sentiment", content=data, headers=ADMIN).json()["version"] == 2

        answer = http.post("/v1/tasks/sentiment/predict", json={"inputs": TEXTS})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["task_id"] == "sentiment" and body["version"] == 2
        _assert_outputs(body["outputs"], _expected(backbone, default_bank, artifacts["sentiment"]))
        assert answer.headers["x-request-id"]

        for name in ("topic", "spam"):
            http.put(f"/v1/tasks/{name}", content=artifacts[name].to_bytes(), headers=ADMIN)
        page = http.get("/v1/tasks", params={"limit": 2}).json()
        assert [t["task_id"] for t in page["tasks"]] == ["sentiment", "spam"] and page["total"] == 3
        rest = http.get("/v1/tasks", params={"limit": 2, "after": page["next"]}).json()
        assert [t["task_id"] for t in rest["tasks"]] == ["topic"] and rest["next"] is None
        detail = http.get("/v1/tasks/topic").json()
        assert detail["labels"] == ["sports", "science", "arts"] and detail["training"] == {"seed": 2}

        deleted = http.delete("/v1/tasks/spam", headers=ADMIN)
        assert deleted.json() == {"task_id": "spam", "version": 2, "deleted": True}
        gone = http.post("/v1/tasks/spam/predict", json={"inputs": ["hi"]})
        assert gone.status_code == 404 and gone.json()["error_type"] == "unknown_task"

        metrics = http.get("/metrics").text
        assert "recast_uploads_total 4.0" in metrics
        assert "recast_tasks_resident 2.0" in metrics
        assert (
            'recast_requests_total{endpoint="/v1/tasks/{task_id}/predict",method="POST",status="200"} 1.0'
            in metrics
        )
        assert "recast_kernel_info{detail=" in metrics and 'path="torch"' in metrics
        assert "recast_batch_texts_count" in metrics
        assert "recast_upload_seconds_count 4.0" in metrics

    # a new server on the same store serves the same tasks and versions
    with (
        serving(_settings(bank_dir, tmp_path / "tasks")) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        assert [t["task_id"] for t in http.get("/v1/tasks").json()["tasks"]] == ["sentiment", "topic"]
        again = http.post("/v1/tasks/sentiment/predict", json={"inputs": TEXTS}).json()
        assert again["version"] == 2
        _assert_outputs(again["outputs"], _expected(backbone, default_bank, artifacts["sentiment"]))


def _error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body: dict[str, Any] = response.json()
    assert body["error_type"] == error_type and body["error"], body
    return body


def test_every_error_answers_its_status_and_typed_body(
    bank_dir: Path, tmp_path: Path, default_bank: TemplateBank, artifacts: dict[str, TaskArtifact]
) -> None:
    settings = _settings(
        bank_dir, tmp_path / "tasks", max_upload_bytes=64 << 10, max_inputs=8, max_queue_texts=6
    )
    data = artifacts["topic"].to_bytes()
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        octet = {"Content-Type": "application/octet-stream"}
        no_key = _error(http.put("/v1/tasks/t", content=data, headers=octet), 401, "unauthorized")
        assert "Bearer" in no_key["error"]
        assert http.put("/v1/tasks/t", content=data, headers=octet).headers["www-authenticate"] == "Bearer"
        _error(
            http.put("/v1/tasks/t", content=data, headers=octet | {"Authorization": "Basic x"}),
            401,
            "unauthorized",
        )
        _error(
            http.put("/v1/tasks/t", content=data, headers=ADMIN | {"Authorization": "Bearer nope"}),
            403,
            "forbidden",
        )
        _error(http.delete("/v1/tasks/t", headers={"Authorization": "Bearer nope"}), 403, "forbidden")

        _error(http.put("/v1/tasks/-bad", content=data, headers=ADMIN), 400, "invalid_task_id")
        _error(
            http.put("/v1/tasks/t", content=data, headers=ADMIN | {"Content-Type": "text/plain"}),
            415,
            "unsupported_media_type",
        )
        _error(http.put("/v1/tasks/t", content=b"", headers=ADMIN), 400, "bad_input")
        _error(http.put("/v1/tasks/t", content=b"x" * (65 << 10), headers=ADMIN), 413, "payload_too_large")
        bad = _error(http.put("/v1/tasks/t", content=data[:-7], headers=ADMIN), 422, "invalid_artifact")
        assert bad["reason"] == "artifact_corrupt"
        foreign = task_artifact(default_bank, 9)
        foreign = TaskArtifact(
            foreign.coefficients, foreign.head_weight, foreign.head_bias, foreign.labels, "0" * 64
        )
        assert (
            _error(
                http.put("/v1/tasks/t", content=foreign.to_bytes(), headers=ADMIN), 422, "invalid_artifact"
            )["reason"]
            == "fingerprint_mismatch"
        )
        assert (
            'recast_upload_rejections_total{reason="fingerprint_mismatch"} 1.0' in http.get("/metrics").text
        )

        assert http.put("/v1/tasks/t", content=data, headers=ADMIN | {"If-Match": "0"}).status_code == 201
        _error(
            http.put("/v1/tasks/t", content=data, headers=ADMIN | {"If-Match": "0"}), 409, "version_conflict"
        )
        assert (
            http.put("/v1/tasks/t", content=data, headers=ADMIN | {"If-Match": '"1"'}).json()["version"] == 2
        )
        _error(
            http.put("/v1/tasks/t", content=data, headers=ADMIN | {"If-Match": "9" * 40}), 400, "bad_input"
        )
        _error(http.put("/v1/tasks/t", content=data, headers=ADMIN | {"If-Match": "soon"}), 400, "bad_input")
        _error(http.delete("/v1/tasks/t", headers=ADMIN | {"If-Match": "1"}), 409, "version_conflict")

        _error(http.post("/v1/tasks/missing/predict", json={"inputs": ["x"]}), 404, "unknown_task")
        _error(http.get("/v1/tasks/missing"), 404, "unknown_task")
        _error(http.get("/v3/anything"), 404, "not_found")
        v2 = http.get("/v2/anything")  # the Open Inference Protocol's paths answer its own error shape
        assert v2.status_code == 404 and list(v2.json()) == ["error"], v2.text
        _error(http.patch("/v1/tasks/t"), 405, "method_not_allowed")
        _error(http.post("/v1/tasks/t/predict", json={"inputs": []}), 400, "bad_input")
        _error(http.post("/v1/tasks/t/predict", json={"inputs": ["x"] * 9}), 400, "bad_input")
        _error(http.post("/v1/tasks/t/predict", json={"inputs": [3]}), 400, "bad_input")
        _error(http.post("/v1/tasks/t/predict", json={"texts": ["x"]}), 400, "bad_input")
        _error(
            http.post(
                "/v1/tasks/t/predict", content=b"{not json", headers={"Content-Type": "application/json"}
            ),
            400,
            "bad_input",
        )
        _error(http.post("/v1/tasks/t/predict", json={"inputs": ["x" * 5000]}), 400, "bad_input")
        huge = b'{"inputs": ["' + b"x" * (400 << 10) + b'"]}'

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
            for start in range(0, len(huge), 8192):
                yield huge[start : start + 8192]

        _error(
            http.post("/v1/tasks/t/predict", content=chunked(), headers={"Content-Type": "application/json"}),
            413,
            "payload_too_large",
        )
        _error(
            http.post("/v1/tasks/t/predict", content=huge, headers={"Content-Type": "application/json"}),
            413,
            "payload_too_large",
        )
        overloaded = _error(http.post("/v1/tasks/t/predict", json={"inputs": ["x"] * 7}), 429, "overloaded")
        assert (
            overloaded["error"]
            and int(http.post("/v1/tasks/t/predict", json={"inputs": ["x"] * 7}).headers["retry-after"]) >= 1
        )
        # the server keeps serving after every one of these
        assert http.post("/v1/tasks/t/predict", json={"inputs": ["still here"]}).status_code == 200


@pytest.mark.parametrize("head_cache_bytes", [1 << 30, 0], ids=["heads_resident", "heads_from_store"])
def test_concurrent_predicts_during_reuploads_are_never_mixed(
    bank_dir: Path,
    tmp_path: Path,
    backbone: TextBackbone,
    default_bank: TemplateBank,
    artifacts: dict[str, TaskArtifact],
    head_cache_bytes: int,
) -> None:
    """With no memory for heads every predict reads its head back from the store while uploads replace it."""
    odd, even = artifacts["sentiment"], task_artifact(default_bank, 7, labels=("low", "high"))
    want = {1: _expected(backbone, default_bank, odd), 0: _expected(backbone, default_bank, even)}
    settings = _settings(bank_dir, tmp_path / "tasks", head_cache_bytes=head_cache_bytes)
    with (
        serving(settings) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        http.put("/v1/tasks/hot", content=odd.to_bytes(), headers=ADMIN)
        for name in ("topic", "spam"):
            http.put(f"/v1/tasks/{name}", content=artifacts[name].to_bytes(), headers=ADMIN)

        def ask(i: int) -> dict[str, Any]:
            task = ("hot", "hot", "topic", "spam")[i % 4]
            response = http.post(f"/v1/tasks/{task}/predict", json={"inputs": TEXTS})
            assert response.status_code == 200, response.text
            return dict(response.json())

        def upload(i: int) -> int:
            data = (even if i % 2 == 0 else odd).to_bytes()
            return int(http.put("/v1/tasks/hot", content=data, headers=ADMIN).json()["version"])

        with cf.ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(ask, i) for i in range(48)]
            versions = [pool.submit(upload, i) for i in range(2, 14)]
            results = [a.result() for a in answers]
            assert sorted(v.result() for v in versions) == list(range(2, 14))
        seen = set()
        for body in results:
            if body["task_id"] == "hot":
                seen.add(body["version"] % 2)
                _assert_outputs(body["outputs"], want[body["version"] % 2])
            else:
                _assert_outputs(
                    body["outputs"], _expected(backbone, default_bank, artifacts[body["task_id"]])
                )
        metrics = http.get("/metrics").text
        assert "recast_batch_tasks_bucket" in metrics
        multi_task = [
            line for line in metrics.splitlines() if line.startswith('recast_batch_tasks_bucket{le="1.0"}')
        ]
        count = next(line for line in metrics.splitlines() if line.startswith("recast_batch_tasks_count"))
        assert float(multi_task[0].split()[-1]) < float(count.split()[-1]), (
            "some forwards mixed several tasks"
        )


def test_a_client_that_disconnects_does_not_stall_others(
    bank_dir: Path, tmp_path: Path, artifacts: dict[str, TaskArtifact]
) -> None:
    with (
        serving(_settings(bank_dir, tmp_path / "tasks", max_wait_ms=50.0)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        http.put("/v1/tasks/spam", content=artifacts["spam"].to_bytes(), headers=ADMIN)
        host, port = url.removeprefix("http://").split(":")
        body = b'{"inputs": ["' + b"abandoned request " * 20 + b'"]}'
        for _ in range(5):  # send a full request, then hang up before the answer
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /v1/tasks/spam/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
        with cf.ThreadPoolExecutor(4) as pool:
            codes = list(
                pool.map(
                    lambda _: http.post("/v1/tasks/spam/predict", json={"inputs": TEXTS}).status_code,
                    range(8),
                )
            )
        assert codes == [200] * 8
        assert http.get("/readyz").json()["queued_texts"] == 0


def test_first_start_builds_and_caches_the_bank(
    tmp_path: Path, default_bank: TemplateBank, artifacts: dict[str, TaskArtifact]
) -> None:
    bank = tmp_path / "fresh-bank"
    with serving(_settings(bank, tmp_path / "tasks")) as url, httpx.Client(base_url=url, timeout=60) as http:
        fingerprint = http.get("/v1/backbone").json()["bank"]["fingerprint"]
    assert (bank / "bank.safetensors").is_file() and (bank / "mimicry.json").is_file()
    assert fingerprint == default_bank.fingerprint, (
        "svd mimicry is deterministic: same bank, same fingerprint"
    )


def test_two_replicas_on_one_postgresql_see_each_others_changes(
    bank_dir: Path,
    tmp_path: Path,
    postgres_dsn: str,
    backbone: TextBackbone,
    default_bank: TemplateBank,
    artifacts: dict[str, TaskArtifact],
) -> None:
    def wait_for(http: httpx.Client, path: str, status: int, version: int | None = None) -> float:
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            response = http.get(path)
            if response.status_code == status and (version is None or response.json()["version"] == version):
                return time.monotonic() - start
            time.sleep(0.01)
        raise AssertionError(f"{path} did not answer {status} (version {version}) within 1 s")

    settings = _settings(bank_dir, postgres_dsn)
    with (
        serving(settings) as url_a,
        serving(settings) as url_b,
        httpx.Client(base_url=url_a, timeout=60) as a,
        httpx.Client(base_url=url_b, timeout=60) as b,
    ):
        assert a.get("/v1/backbone").json()["store"] == "postgresql"
        assert (
            a.put("/v1/tasks/shared", content=artifacts["topic"].to_bytes(), headers=ADMIN).status_code == 201
        )
        wait_for(b, "/v1/tasks/shared", 200, version=1)
        answer = b.post("/v1/tasks/shared/predict", json={"inputs": TEXTS}).json()
        _assert_outputs(answer["outputs"], _expected(backbone, default_bank, artifacts["topic"]))
        b.put("/v1/tasks/shared", content=artifacts["spam"].to_bytes(), headers=ADMIN)
        wait_for(a, "/v1/tasks/shared", 200, version=2)
        assert a.delete("/v1/tasks/shared", headers=ADMIN | {"If-Match": "2"}).status_code == 200
        wait_for(b, "/v1/tasks/shared", 404)
    # a replica started later loads the current state, tombstones included
    with serving(settings) as url_c, httpx.Client(base_url=url_c, timeout=60) as c:
        assert c.get("/v1/tasks/shared").status_code == 404
        assert (
            c.put("/v1/tasks/shared", content=artifacts["topic"].to_bytes(), headers=ADMIN).json()["version"]
            == 4
        )
