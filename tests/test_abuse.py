"""Attacks a hostile user would make, replayed against a real `recast serve` process (keys file with three
tenants, loopback only), each asserting the behaviour that holds now.

One server for the module; every test leaves it serving. Bounded: the whole module takes about a minute.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import free_port, task_artifact

from benchmarks.server import rss_mib, server_process
from recast_core.bank import TemplateBank
from server.auth.keys import create_key

OCTET = {"Content-Type": "application/octet-stream"}
SURROGATE_BODY = b'{"inputs": ["\\ud800"]}'  # valid JSON, not text


@dataclass
class Live:
    url: str
    pid: int
    keys: dict[str, str]  # a_admin, b_admin, c_admin, anonymous: ""
    bank: TemplateBank
    metrics_port: int

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"} if self.keys.get(who) else {}


@pytest.fixture(scope="module")
def live(
    bank_dir: Path, default_bank: TemplateBank, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    work = tmp_path_factory.mktemp("abuse")
    keys_file = work / "keys.json"
    keys = {
        f"{t}_admin": create_key(keys_file, f"team-{t}", "admin", rate_per_s=10_000, burst=10_000)[0]
        for t in "abc"
    }
    env = {
        "RECAST_KEYS_FILE": str(keys_file),
        "RECAST_MAX_QUEUE_TEXTS": "128",
        "RECAST_MAX_LENGTH": "16",
        "RECAST_HEADER_TIMEOUT_S": "1",
        "RECAST_ANONYMOUS_RATE_LIMIT_PER_S": "5",
        "RECAST_ANONYMOUS_RATE_LIMIT_BURST": "20",
        "RECAST_THREADS": "1",
        "RECAST_METRICS_PORT": str(free_port()),
    }
    with server_process(bank_dir, work / "tasks", work / "server.log", timeout=600, env=env) as server:
        found = Live(server["url"], server["pid"], keys, default_bank, int(env["RECAST_METRICS_PORT"]))
        with httpx.Client(base_url=found.url, timeout=60) as http:
            for who in ("a_admin", "b_admin", "c_admin"):
                data = task_artifact(default_bank, len(who) + ord(who[0])).to_bytes()
                answer = http.put("/v1/tasks/t", content=data, headers=OCTET | found.auth(who))
                assert answer.status_code == 201, answer.text
        yield found


def _raw(url: str, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_a_lone_surrogate_fails_alone_while_other_tenants_are_answered(live: Live) -> None:
    def good(i: int) -> int:
        body = {"inputs": [f"an ordinary sentence number {i}"]}
        return httpx.post(
            f"{live.url}/v1/tasks/t/predict", json=body, headers=live.auth("b_admin"), timeout=60
        ).status_code

    def poisoned(_: int) -> httpx.Response:
        headers = {"Content-Type": "application/json"} | live.auth("a_admin")
        return httpx.post(
            f"{live.url}/v1/tasks/t/predict", content=SURROGATE_BODY, headers=headers, timeout=60
        )

    statuses: list[int] = []
    with ThreadPoolExecutor(7) as pool:
        for _ in range(
            10
        ):  # rounds of 6 requests of tenant b with 1 poisoned one of tenant a, in flight together
            goods = [pool.submit(good, i) for i in range(6)]
            bad = pool.submit(poisoned, 0).result()
            statuses += [f.result() for f in goods]
            assert bad.status_code == 400 and bad.json()["error_type"] == "bad_input"
            assert "inputs[0]" in bad.json()["error"] and "surrogate" in bad.json()["error"]
    assert statuses == [200] * 60


def test_random_methods_and_paths_do_not_grow_the_metrics(live: Live) -> None:
    before = len(httpx.get(f"{live.url}/metrics", timeout=30).content)
    for i in range(1000):  # a new method and path every time, without a key, on one keep-alive connection
        request = f"XRANDOM{i} /z{i}/{i * 7919} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        answer = _raw(live.url, request + b"", timeout=2) if i % 100 == 0 else None
        if answer is not None:
            assert b" 404 " in answer.split(b"\r\n", 1)[0] or b" 405 " in answer.split(b"\r\n", 1)[0]
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for i in range(1000):
            http.request(f"XR{i}", f"/z/{i}")
        after = http.get("/metrics").content
    assert len(after) - before < 4096, f"/metrics grew from {before} to {len(after)} bytes"
    assert b'method="other"' in after and b'endpoint="not_found"' in after
    assert b"XR1" not in after and b"/z/" not in after


def _upload(live: Live, data: bytes, who: str = "a_admin", task: str = "hostile") -> httpx.Response:
    return httpx.put(f"{live.url}/v1/tasks/{task}", content=data, headers=OCTET | live.auth(who), timeout=60)


def _with_metadata(data: bytes, **changes: Any) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] |= changes
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def test_hostile_artifacts_are_typed_422s(live: Live) -> None:
    valid = task_artifact(live.bank, 99).to_bytes()
    huge_int = _with_metadata(valid, training='{"n": ' + "9" * 5000 + "}")
    answer = _upload(live, huge_int)
    assert answer.status_code == 422 and answer.json()["reason"] == "artifact_metadata", answer.text
    assert "'training'" in answer.json()["error"]
    numeric = _with_metadata(valid, schema_version=2)
    answer = _upload(live, numeric)
    assert answer.status_code == 422 and "must be a string" in answer.json()["error"]
    big_created = _with_metadata(valid, created="2026-01-01T00:00:00" + "0" * 50_000)
    assert _upload(live, big_created).json()["reason"] == "artifact_metadata"
    flipped = bytearray(valid)
    flipped[-9] ^= 0x01
    answer = _upload(live, bytes(flipped))
    assert answer.status_code == 422 and answer.json()["reason"] == "artifact_checksum"
    artifact = task_artifact(live.bank, 98)
    artifact.head_weight[0, 0] = 3e38
    answer = _upload(live, artifact.to_bytes())
    assert answer.status_code == 422 and answer.json()["reason"] == "artifact_values"
    artifact = task_artifact(live.bank, 97)
    artifact.coefficients[0, 0] = 1e20
    assert _upload(live, artifact.to_bytes()).json()["reason"] == "artifact_values"
    answer = httpx.post(
        f"{live.url}/v1/tasks/t/predict", json={"inputs": ["still fine"]}, headers=live.auth("a_admin")
    )
    assert answer.status_code == 200
    assert all(isinstance(v, float) for v in answer.json()["outputs"][0]["scores"].values())


def test_a_flooding_pair_of_tenants_leaves_a_third_its_share(live: Live) -> None:
    stop = threading.Event()
    flood_statuses: list[int] = []

    def flood(who: str) -> None:
        with httpx.Client(base_url=live.url, timeout=60, headers=live.auth(who)) as http:
            while not stop.is_set():
                flood_statuses.append(
                    http.post("/v1/tasks/t/predict", json={"inputs": ["flood"] * 16}).status_code
                )

    threads = [
        threading.Thread(target=flood, args=(who,)) for who in ("a_admin", "b_admin") for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # the queue is full of a's and b's texts
    seconds: list[float] = []
    statuses: list[int] = []
    try:
        with httpx.Client(base_url=live.url, timeout=60, headers=live.auth("c_admin")) as http:
            for i in range(20):
                start = time.perf_counter()
                statuses.append(
                    http.post("/v1/tasks/t/predict", json={"inputs": [f"occasional {i}"]}).status_code
                )
                seconds.append(time.perf_counter() - start)
                time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    seconds.sort()
    print(
        f"\nthird tenant: {statuses.count(200)}/20 answered, p50 {seconds[10]:.2f} s, "
        f"max {seconds[-1]:.2f} s; "
        f"flood: {flood_statuses.count(200)} answered, {flood_statuses.count(429)} refused"
    )
    assert flood_statuses.count(429) > 0, "the flood never filled the queue: the test shows nothing"
    assert statuses.count(200) >= 19  # >= 95 %
    assert seconds[-1] < 5.0  # the bound: at most a few forwards of 64 texts behind (about 0.3 s each here)


def test_anonymous_callers_are_rate_limited_per_address(live: Live) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        statuses = [http.get("/v1/tasks").status_code for _ in range(40)]
        limited = http.get("/v1/tasks")
    assert statuses.count(429) > 0 and statuses[:15] == [200] * 15
    if limited.status_code == 429:
        assert limited.json()["error_type"] == "rate_limited" and int(limited.headers["retry-after"]) >= 1
    keyed = httpx.get(f"{live.url}/v1/tasks", headers=live.auth("c_admin"), timeout=30)
    assert keyed.status_code == 200  # a key has its own bucket
    time.sleep(4)  # the bucket refills at 5 requests/s


def test_small_protocol_abuses(live: Live) -> None:
    with httpx.Client(base_url=live.url, timeout=30, headers=live.auth("c_admin")) as http:
        redirect = http.get("/v1/tasks/", headers={"Host": "evil.example"})
        assert redirect.status_code == 404 and "location" not in redirect.headers
        assert redirect.json()["error_type"] == "not_found"
        assert http.head("/healthz").status_code == 200 and http.head("/readyz").status_code == 200
        assert "tasks" not in http.get("/readyz").json()
        assert httpx.get(f"{live.url}/v1/backbone", timeout=30).json()["tasks"] == 0  # the default tenant's
        assert http.get("/v1/backbone").json()["tasks"] == 1  # team-c's own
        two = http.get("/v1/tasks", headers=[("Authorization", "Bearer x"), ("Authorization", "Bearer y")])
        assert two.status_code == 400 and "one Authorization header" in two.json()["error"]
        data = task_artifact(live.bank, 5).to_bytes()
        created = http.put(
            "/v1/tasks/again", content=data, headers={"Content-Type": "Application/Octet-Stream"}
        )
        assert created.status_code == 201, created.text
        assert http.delete("/v1/tasks/again").status_code == 200
        recreated = http.put("/v1/tasks/again", content=data, headers=OCTET)
        assert recreated.status_code == 201 and recreated.json()["version"] == 3
        assert http.put("/v1/tasks/again", content=data, headers=OCTET).status_code == 200
        declared = (
            "PUT /v1/tasks/x HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Authorization: Bearer {live.keys['c_admin']}\r\nContent-Length: {1 << 30}\r\n\r\n"
        )
        too_big = _raw(live.url, declared.encode(), timeout=2).lower()
        assert too_big.startswith(b"http/1.1 413") and b"x-request-id:" in too_big, too_big[:300]
        assert b'"error_type": "payload_too_large"' in too_big
        metrics = http.get("/metrics").text
        assert 'status="413"' in metrics


def test_a_connection_that_never_finishes_its_headers_is_closed(live: Live) -> None:
    host, port = live.url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert sock.recv(100) == b""  # closed by the server
    assert time.monotonic() - start < 5  # RECAST_HEADER_TIMEOUT_S=1
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        start = time.monotonic()  # an idle connection that never sends a byte goes too
        assert sock.recv(100) == b""
        assert time.monotonic() - start < 5
    assert httpx.get(f"{live.url}/healthz", timeout=10).status_code == 200
    assert rss_mib(live.pid) > 0


def test_metrics_are_served_on_their_own_port_too(live: Live) -> None:
    own = httpx.get(f"http://127.0.0.1:{live.metrics_port}/metrics", timeout=30)
    assert own.status_code == 200 and "recast_requests_total" in own.text
    assert "recast_store_up 1.0" in own.text  # gauges of other state are read when scraped, on either port
    assert "recast_store_up 1.0" in httpx.get(f"{live.url}/metrics", timeout=30).text
