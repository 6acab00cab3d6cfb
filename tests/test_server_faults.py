"""Faults against a real `recast serve` process: SIGKILL in an upload storm, overload far past capacity."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx
from server_harness import task_artifact

from benchmarks.server import rss_mib, server_process
from recast_core.bank import TemplateBank

OCTET = {"Content-Type": "application/octet-stream"}


def test_sigkill_during_an_upload_storm_loses_no_acknowledged_upload(
    bank_dir: Path, tmp_path: Path, default_bank: TemplateBank
) -> None:
    store = tmp_path / "tasks"
    blobs = [task_artifact(default_bank, seed).to_bytes() for seed in range(6)]
    acked: dict[str, tuple[int, str]] = {}  # task -> newest acknowledged (version, sha256)
    lock = threading.Lock()
    stop = threading.Event()

    def storm(worker: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            for i in range(10_000):
                if stop.is_set():
                    return
                task, data = f"storm-{worker}-{i % 5}", blobs[(worker + i) % len(blobs)]
                try:
                    response = http.put(f"/v1/tasks/{task}", content=data, headers=OCTET)
                except httpx.HTTPError:
                    return  # the server died mid-request: this upload was never acknowledged
                if response.status_code in (200, 201):
                    with lock:
                        version = response.json()["version"]
                        if version > acked.get(task, (0, ""))[0]:
                            acked[task] = (version, hashlib.sha256(data).hexdigest())

    with server_process(bank_dir, store, tmp_path / "first.log", timeout=300) as server:
        threads = [threading.Thread(target=storm, args=(w, server["url"])) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        os.kill(server["pid"], signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert sum(v for v, _ in acked.values()) > 20, "the storm acknowledged uploads before the kill"

    with (
        server_process(bank_dir, store, tmp_path / "second.log", timeout=300) as server,
        httpx.Client(base_url=server["url"], timeout=30) as http,
    ):
        listed = {t["task_id"]: t for t in http.get("/v1/tasks", params={"limit": 1000}).json()["tasks"]}
        for task, (version, digest) in acked.items():
            assert task in listed, f"acknowledged task {task} lost"
            detail = http.get(f"/v1/tasks/{task}").json()
            assert detail["version"] >= version, (task, detail["version"], version)
            if detail["version"] == version:
                assert detail["digest"] == digest, f"{task} v{version} holds other bytes"
        for task in listed:  # nothing half-written: every stored task is servable
            assert (
                http.post(f"/v1/tasks/{task}/predict", json={"inputs": ["still whole?"]}).status_code == 200
            )
    assert not list(store.glob("*/.*.tmp")), "interrupted writes are cleaned up at start"


def test_overload_far_past_capacity_gets_quick_429s_and_the_server_recovers(
    bank_dir: Path, tmp_path: Path, default_bank: TemplateBank
) -> None:
    store = tmp_path / "tasks"
    queue = {"RECAST_MAX_QUEUE_TEXTS": "64"}
    with server_process(bank_dir, store, tmp_path / "server.log", timeout=300, env=queue) as server:
        url = server["url"]
        with httpx.Client(base_url=url, timeout=30) as http:
            assert (
                http.put(
                    "/v1/tasks/t", content=task_artifact(default_bank, 1).to_bytes(), headers=OCTET
                ).status_code
                == 201
            )
        rss_before = rss_mib(server["pid"])
        statuses: list[int] = []
        refused_ms: list[float] = []
        lock = threading.Lock()

        def flood() -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                for _ in range(15):
                    start = time.perf_counter()
                    response = http.post("/v1/tasks/t/predict", json={"inputs": ["overload me"] * 16})
                    with lock:
                        statuses.append(response.status_code)
                        if response.status_code == 429:
                            assert int(response.headers["retry-after"]) >= 1
                            assert response.json()["error_type"] == "overloaded"
                            refused_ms.append(1000 * (time.perf_counter() - start))

        threads = [threading.Thread(target=flood) for _ in range(40)]  # 640 texts wanted, 64 may wait
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0
        refused_ms.sort()
        assert refused_ms[len(refused_ms) // 2] < 500, "refusals are quick, not queued"
        assert rss_mib(server["pid"]) < rss_before + 300, "memory stays bounded under overload"
        with httpx.Client(base_url=url, timeout=30) as http:  # and it recovers at once
            assert http.post("/v1/tasks/t/predict", json={"inputs": ["calm again"]}).status_code == 200
            assert http.get("/readyz").status_code == 200
