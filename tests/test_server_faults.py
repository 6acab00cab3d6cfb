"""Faults against real `recast serve` processes: SIGKILL in an upload storm, overload far past capacity, and
PostgreSQL stopped and restarted under load with two replicas."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from pg_cluster import PgCluster
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


@contextmanager
def replicas(bank: Path, store: str, logs: list[Path], env: dict[str, str]) -> Iterator[list[dict[str, Any]]]:
    """Several `recast serve` processes on one store, started side by side (each until /readyz is 200)."""
    with ExitStack() as stack, ThreadPoolExecutor(len(logs)) as pool:
        starting = [
            pool.submit(stack.enter_context, server_process(bank, store, log, timeout=300, env=env))
            for log in logs
        ]
        yield [future.result() for future in starting]


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> float:
    """Seconds until `condition()` held, polled every 50 ms; AssertionError naming `what` after `seconds`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - start


@dataclass
class Traffic:
    """What the load threads sent and got: (start, end, status, error_type) per request, monotonic clock."""

    predicts: list[tuple[float, float, int, str]] = field(default_factory=list)
    uploads: list[tuple[float, float, int, str]] = field(default_factory=list)
    acked: dict[str, tuple[int, str]] = field(default_factory=dict)  # task -> newest acked (version, sha256)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def send(
        self, into: list[tuple[float, float, int, str]], http: httpx.Client, method: str, path: str, **kw: Any
    ) -> Any:
        """Send one request and record it (a transport error or an untyped body is status -1); the body
        if it succeeded."""
        start = time.monotonic()
        try:
            response = http.request(method, path, **kw)
            body = response.json()
            status, error_type = response.status_code, "" if response.is_success else str(body["error_type"])
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            body, status, error_type = None, -1, type(exc).__name__
        with self.lock:
            into.append((start, time.monotonic(), status, error_type))
        return body if status in (200, 201) else None

    def predicting(self, url: str, tasks: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(1_000_000):
                if self.stop.is_set():
                    return
                path = f"/v1/tasks/{tasks[i % len(tasks)]}/predict"
                self.send(self.predicts, http, "POST", path, json={"inputs": ["hi"]})

    def uploading(self, url: str, prefix: str, blobs: list[bytes]) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(1_000_000):
                if self.stop.is_set():
                    return
                task, data = f"{prefix}-{i % 3}", blobs[i % len(blobs)]
                stored = self.send(
                    self.uploads, http, "PUT", f"/v1/tasks/{task}", content=data, headers=OCTET
                )
                if stored is not None:
                    with self.lock:
                        if stored["version"] > self.acked.get(task, (0, ""))[0]:
                            self.acked[task] = (stored["version"], hashlib.sha256(data).hexdigest())
                self.stop.wait(0.05)


@dataclass(frozen=True)
class Outage:
    mode: str  # pg_ctl stop -m MODE
    stopping: float  # monotonic: pg_ctl stop called
    down: float  # stop returned: PostgreSQL is gone
    restarting: float  # pg_ctl start called
    up: float  # start returned
    ready: float  # both replicas answer /readyz 200 again
    probe_ms: float  # slowest refused upload or delete sent while it was down

    def __str__(self) -> str:
        return (
            f"{self.mode}: down {self.restarting - self.down:.1f} s, ready again "
            f"{self.ready - self.up:.2f} s after PostgreSQL was up, refusals within {self.probe_ms:.0f} ms"
        )


def _outage(
    cluster: PgCluster, mode: str, replicas: list[httpx.Client], blob: bytes, resident: str
) -> Outage:
    """Stop PostgreSQL (`mode`) for about four seconds under whatever load runs, check what clients see
    while it is down, start it on the same port and wait until every replica is ready again."""
    stopping = time.monotonic()
    try:
        cluster.stop(mode)
        down = time.monotonic()
        # readiness reflects the outage, with a typed body
        strict = {"strict": "true"}
        wait_until(
            lambda: all(h.get("/readyz", params=strict).status_code == 503 for h in replicas),
            5,
            "/readyz 503",
        )
        probe_ms = 0.0
        for n, http in enumerate(replicas):
            readyz = http.get("/readyz", params=strict)
            assert readyz.json()["error_type"] == "store_unavailable", readyz.text
            assert int(readyz.headers["retry-after"]) >= 1
            # still in the load balancer: resident tasks answer, the body and the metric say degraded
            degraded = http.get("/readyz")
            assert degraded.status_code == 200 and degraded.json()["store"] == "unavailable", degraded.text
            assert "recast_store_up 0.0" in http.get("/metrics").text
            # uploads and deletes: a quick, typed 503 and nothing acknowledged
            start = time.monotonic()
            put = http.put(f"/v1/tasks/outage-{mode}-{n}", content=blob, headers=OCTET)
            removed = http.delete(f"/v1/tasks/{resident}")
            probe_ms = max(probe_ms, 1000 * (time.monotonic() - start))
            for response in (put, removed):
                assert response.status_code == 503, response.text
                assert response.json()["error_type"] == "store_unavailable"
                assert int(response.headers["retry-after"]) >= 1
            assert http.get(f"/v1/tasks/{resident}").status_code == 200
        time.sleep(max(0.0, down + 4 - time.monotonic()))  # the load goes on through the outage
        restarting = time.monotonic()
    finally:
        if not cluster.running:
            cluster.start()
    up = time.monotonic()
    wait_until(
        lambda: all(h.get("/readyz", params={"strict": "true"}).status_code == 200 for h in replicas),
        15,
        "ready again",
    )
    return Outage(mode, stopping, down, restarting, up, time.monotonic(), probe_ms)


def test_postgresql_stopped_and_restarted_under_load(
    bank_dir: Path, tmp_path: Path, default_bank: TemplateBank, postgres_cluster: PgCluster
) -> None:
    """Two replicas on one PostgreSQL under predicts and uploads; PostgreSQL is stopped (fast, then
    immediate) and started again on the same port."""
    database = f"faults_{uuid.uuid4().hex[:10]}"  # a database of its own: other tests' tasks stay apart
    with psycopg.connect(postgres_cluster.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
        # the test cluster runs with synchronous_commit=off for speed; here commits are durable as in
        # production, so an immediate stop must not lose an acknowledged upload
        admin.execute(f"ALTER DATABASE {database} SET synchronous_commit = on")
    dsn = postgres_cluster.dsn.rsplit("/", 1)[0] + f"/{database}"
    blobs = [task_artifact(default_bank, seed).to_bytes() for seed in range(4)]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    traffic = Traffic()
    resident = [f"resident-{i}" for i in range(4)]
    with replicas(bank_dir, dsn, logs, {"RECAST_THREADS": "1"}) as servers, ExitStack() as clients:
        a, b = (clients.enter_context(httpx.Client(base_url=s["url"], timeout=30)) for s in servers)
        for i, task in enumerate(resident):
            assert a.put(f"/v1/tasks/{task}", content=blobs[i], headers=OCTET).status_code == 201
        wait_until(lambda: all(b.get(f"/v1/tasks/{t}").status_code == 200 for t in resident), 2, "B hears A")

        threads = [
            threading.Thread(target=traffic.predicting, args=(s["url"], resident)) for s in servers * 2
        ]
        threads += [
            threading.Thread(target=traffic.uploading, args=(s["url"], f"load-{n}", blobs))
            for n, s in zip("ab", servers, strict=True)
        ]
        for thread in threads:
            thread.start()
        outages = []
        try:
            for mode in ("fast", "immediate"):
                time.sleep(2)  # load with PostgreSQL up: uploads acknowledged
                outages.append(_outage(postgres_cluster, mode, [a, b], blobs[0], resident[0]))
            time.sleep(2)
        finally:
            traffic.stop.set()
            for thread in threads:
                thread.join(timeout=30)

        # after recovery, an upload on A is served by B within a second or two
        fresh = a.put("/v1/tasks/after-restart", content=blobs[1], headers=OCTET)
        assert fresh.status_code == 201, fresh.text
        propagate = wait_until(
            lambda: b.post("/v1/tasks/after-restart/predict", json={"inputs": ["x"]}).status_code == 200,
            2,
            "after-restart upload served by B",
        )

        with psycopg.connect(dsn) as conn:
            rows = {
                task: (version, None if data is None else hashlib.sha256(data).hexdigest())
                for task, version, data in conn.execute("SELECT task_id, version, data FROM recast_tasks")
            }
        acked = dict(traffic.acked)
        for task, (version, digest) in acked.items():  # every acknowledged upload is stored
            assert task in rows and rows[task][0] >= version, (task, version, rows.get(task))
            if rows[task][0] == version:
                assert rows[task][1] == digest, f"{task} v{version} holds other bytes"
        assert not [t for t in rows if t.startswith("outage-")], "refused uploads were not stored"
        live = {task: row for task, row in rows.items() if row[1] is not None}

        def view(http: httpx.Client, task: str) -> tuple[int, str]:
            detail = http.get(f"/v1/tasks/{task}").json()
            return detail["version"], detail["digest"]

        for http in (a, b):  # both replicas serve exactly what the database holds
            wait_until(lambda h=http: all(view(h, t) == row for t, row in live.items()), 2, "in sync")
            listed = http.get("/v1/tasks", params={"limit": 1000}).json()["tasks"]
            assert {t["task_id"] for t in listed} == set(live)
        for log in logs:  # each replica rescanned the table after each lost connection
            assert log.read_text().count("resyncing tasks from the store") >= len(outages), log.name

    predicts, uploads = traffic.predicts, traffic.uploads
    assert {status for _, _, status, _ in predicts} == {200}, "every predict on a resident task answered"
    assert {(s, e) for _, _, s, e in uploads} <= {(200, ""), (201, ""), (503, "store_unavailable")}
    assert max(u[1] - u[0] for u in uploads) < 5, "no upload hangs"
    report = []
    for n, outage in enumerate(outages):
        during = [p for p in predicts if p[0] >= outage.down and p[1] <= outage.restarting]
        assert len(during) >= 10, f"{outage.mode}: {len(during)} predicts answered while down"
        refused = [u for u in uploads if u[0] >= outage.down and u[1] <= outage.restarting]
        assert refused and all(u[2] == 503 for u in refused), f"{outage.mode}: uploads while down refused"
        until = outages[n + 1].stopping if n + 1 < len(outages) else float("inf")
        after = [u for u in uploads if outage.ready <= u[0] and u[1] < until]
        assert after and all(u[2] == 200 for u in after), f"{outage.mode}: uploads work once ready again"
        report.append(
            f"{outage}; {len(during)} predicts answered while down, {len(refused)} uploads refused "
            f"(503 within {1000 * max(u[1] - u[0] for u in refused):.0f} ms), "
            f"{len(after)} acknowledged once ready"
        )
    startup = max(s["startup_s"] for s in servers)
    print(
        f"replicas ready {startup:.1f} s after launch\n"
        + "\n".join(report)
        + f"\nupload on A served by B after {propagate:.2f} s; {len(acked)} tasks, "
        f"{sum(u[2] in (200, 201) for u in uploads)} acknowledged uploads, all stored and served by both"
    )
