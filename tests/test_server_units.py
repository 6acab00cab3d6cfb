"""Server pieces without the backbone: settings, the batcher's failure handling, preloads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError
from tiny_tasks import TINY_SPEC, tiny_artifact

from recast_core.artifact import TaskArtifact
from recast_core.task_model import Prediction
from server.errors import NotReady, Overloaded, ServerError
from server.runtime import _preload
from server.serving.batcher import Batcher
from server.serving.predictor import TaskRequest
from server.settings import Settings
from server.stores.directory import DirectoryStore
from server.tasks.catalog import TaskCatalog
from server.tasks.registry import TaskRegistry

SPEC = TINY_SPEC


def _artifact(seed: int) -> TaskArtifact:
    return tiny_artifact(seed, labels=("no", "yes"))


def test_settings_refuse_unsafe_or_contradictory_auth(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="RECAST_API_KEYS or RECAST_KEYS_FILE is required"):
        Settings(host="0.0.0.0")
    with pytest.raises(ValidationError, match="needs RECAST_API_KEYS or RECAST_KEYS_FILE"):
        Settings(predict_requires_key=True)
    assert Settings(host="0.0.0.0", api_keys="a, b").keys == ("a", "b")
    assert Settings(host="0.0.0.0", keys_file=tmp_path / "keys.json").keys_file == tmp_path / "keys.json"
    with pytest.raises(ValidationError, match="TASK_ID=ARTIFACT"):
        Settings(preload="no-equals-sign")


def test_preload_never_rolls_a_task_back(tmp_path: Path) -> None:
    catalog = TaskCatalog(DirectoryStore(tmp_path / "tasks"), TaskRegistry(SPEC))
    demo = tmp_path / "demo.safetensors"
    demo.write_bytes(_artifact(0).to_bytes())
    _preload(catalog, "demo", demo)
    assert catalog.registry.get("demo").version == 1
    catalog.upload("demo", _artifact(1).to_bytes())
    _preload(catalog, "demo", demo)  # a restart: the admin's newer upload stays
    assert catalog.registry.get("demo").version == 2
    catalog.delete("demo")
    _preload(catalog, "demo", demo)  # and a deleted task stays deleted
    assert catalog.registry.known_version("demo") == 3 and len(catalog.registry) == 0


def test_batcher_survives_a_bad_forward_and_refuses_overload(tmp_path: Path) -> None:
    catalog = TaskCatalog(DirectoryStore(tmp_path / "tasks"), TaskRegistry(SPEC))
    entry = catalog.upload("t", _artifact(0).to_bytes())
    head = catalog.registry.head(entry)
    calls: list[int] = []

    def forward(requests: Sequence[TaskRequest]) -> list[list[Prediction]]:
        calls.append(len(requests))
        if len(calls) == 1:
            return []  # a wrong answer count: those requests fail, the batcher goes on
        return [[Prediction("yes", {"no": 0.0, "yes": 1.0}) for _ in r.texts] for r in requests]

    async def scenario() -> None:
        batcher = Batcher(forward, max_batch_texts=8, max_wait=0.01, max_queue_texts=4)
        batcher.start()
        with pytest.raises(ServerError, match="forward failed for this request") as failed:
            await batcher.submit(TaskRequest(entry, head, ["a"]))
        assert failed.value.status == 500
        outputs = await batcher.submit(TaskRequest(entry, head, ["a", "b"]))
        assert [o.label for o in outputs] == ["yes", "yes"]
        with pytest.raises(Overloaded) as overloaded:
            await batcher.submit(TaskRequest(entry, head, ["x"] * 5))
        assert overloaded.value.status == 429 and overloaded.value.retry_after is not None
        assert batcher.healthy
        await batcher.stop()
        with pytest.raises(NotReady):
            await batcher.submit(TaskRequest(entry, head, ["late"]))

    asyncio.run(scenario())
    assert calls == [1, 1]


def test_a_failed_start_stops_every_thread_it_started(
    bank_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.metrics import Metrics
    from server.runtime import start_runtime
    from server.serving.predictor import Predictor

    def broken_warm_up(self: Predictor) -> None:
        raise RuntimeError("warm-up failed")

    monkeypatch.setattr(Predictor, "warm_up", broken_warm_up)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="warm-up failed"):
        start_runtime(Settings(bank=bank_dir, store=str(tmp_path / "tasks")), Metrics())
    deadline = time.monotonic() + 15
    while (left := [t for t in threading.enumerate() if t not in before and t.name != "tqdm_monitor"]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not left, f"threads left running after a failed start: {[t.name for t in left]}"
    DirectoryStore(tmp_path / "tasks").close()  # and the store's lock was released


def test_framework_http_errors_map_into_the_closed_vocabulary() -> None:
    from server.app import _typed

    assert _typed(404, "x").error_type == "not_found"
    assert _typed(413, "x").error_type == "payload_too_large"
    assert (_typed(418, "x").error_type, _typed(418, "x").status) == ("bad_input", 400)
    assert (_typed(502, "x").error_type, _typed(502, "x").status) == ("internal_error", 500)


def test_request_middleware_ids_metrics_and_typed_500(caplog: pytest.LogCaptureFixture) -> None:
    """Pure ASGI request middleware: the client's request id answered back (a fresh one otherwise), a
    bug answered as a typed 500 that carries the id, and every request counted by status."""
    import httpx
    from starlette.types import Receive, Scope, Send

    from server.api.middleware import RequestContext
    from server.metrics import Metrics

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/bug":
            raise RuntimeError("a bug in a handler")
        await send({"type": "http.response.start", "status": 204, "headers": [(b"x-request-id", b"stale")]})
        await send({"type": "http.response.body", "body": b""})

    metrics = Metrics()

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=RequestContext(app, metrics))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.get("/ok", headers={"X-Request-ID": "given-id"}),
                await client.get("/ok"),
                await client.post("/bug", headers={"X-Request-ID": "bug-id"}),
            ]

    given, fresh, bug = asyncio.run(calls())
    assert given.status_code == 204 and given.headers.get_list("x-request-id") == ["given-id"]
    assert len(fresh.headers["x-request-id"]) == 32 and fresh.headers["x-request-id"] != "stale"
    assert bug.status_code == 500 and bug.headers["x-request-id"] == "bug-id"
    assert bug.json()["error_type"] == "internal_error"
    assert "unhandled error" in caplog.text
    counted = {
        (s.labels["method"], s.labels["status"]): s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == "recast_requests_total"
    }
    assert counted == {("GET", "204"): 2.0, ("POST", "500"): 1.0}
