"""Tenant-scoped API keys: hashed keys file, roles, per-key rate limits and tenant isolation, end to end."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import serving, task_artifact

from recast_cli.main import main as recast
from recast_core.bank import TemplateBank
from server.auth.keys import KeyRing, KeysFileError, create_key, hash_key, read_keys_file
from server.auth.ratelimit import RateLimiter
from server.errors import InvalidTaskId, RateLimited
from server.ids import check_stored_id, qualify, split_stored_id
from server.settings import Settings

ENV_KEY = "env-admin-secret"
OCTETS = {"Content-Type": "application/octet-stream"}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_stored_ids_keep_tenants_apart() -> None:
    assert qualify("default", "spam") == "spam"
    assert qualify("team-a", "spam") == "team-a~spam"
    assert split_stored_id("team-a~spam") == ("team-a", "spam")
    assert split_stored_id("spam") == ("default", "spam")
    for bad in ("Team~x", "a~b~c", "~x", "a~", "a/b"):
        with pytest.raises(InvalidTaskId):
            check_stored_id(bad)


def test_keys_file_is_hashed_validated_and_managed_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    assert recast(["keys", "create", "--file", str(path), "--tenant", "team-a", "--role", "admin"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("rk_") and len(key) > 40
    text = path.read_text()
    assert key not in text and hash_key(key) in text  # only the digest is stored
    assert path.stat().st_mode & 0o077 == 0  # readable by its owner only
    assert (
        recast(["keys", "create", "--file", str(path), "--tenant", "team-b", "--id", "b1", "--rate", "5"])
        == 0
    )
    capsys.readouterr()
    assert recast(["keys", "list", "--file", str(path)]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(k["tenant"], k["role"]) for k in listed] == [("team-a", "admin"), ("team-b", "predict")]
    assert listed[1] == {"id": "b1", "tenant": "team-b", "role": "predict", "rate_per_s": 5.0}
    assert recast(["keys", "create", "--file", str(path), "--tenant", "team-b", "--id", "b1"]) == 2
    assert "already has a key 'b1'" in capsys.readouterr().err
    assert recast(["keys", "create", "--file", str(path), "--tenant", "Bad Tenant"]) == 2
    assert "tenant must match" in capsys.readouterr().err
    assert recast(["keys", "revoke", "--file", str(path), "--id", "b1"]) == 0
    assert [r.id for r in read_keys_file(path)] == [listed[0]["id"]]
    assert recast(["keys", "revoke", "--file", str(path), "--id", "b1"]) == 2
    assert "no key 'b1'" in capsys.readouterr().err

    broken = tmp_path / "broken.json"
    for body, problem in (
        ("{", "not valid JSON"),
        ('{"keys": [{"id": "x", "tenant": "t", "role": "root", "sha256": "' + "0" * 64 + '"}]}', "role"),
        ('{"keys": [{"id": "x", "tenant": "t", "role": "admin", "sha256": "abc"}]}', "sha256"),
        (
            '{"keys": [{"id": "x", "tenant": "t", "role": "admin", "sha256": "' + "0" * 64 + '", "x": 1}]}',
            "unknown",
        ),
    ):
        broken.write_text(body)
        with pytest.raises(KeysFileError, match=problem):
            read_keys_file(broken)


def test_key_ring_reloads_a_changed_file_and_keeps_the_old_keys_on_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    first, record = create_key(path, "team-a", "admin")
    ring = KeyRing(("plain",), path)
    assert ring.lookup(first) == record
    assert ring.lookup("plain") is not None and ring.lookup("plain").tenant == "default"  # type: ignore[union-attr]
    second, _ = create_key(path, "team-b", "predict")
    time.sleep(1.1)  # the file is checked at most once a second
    assert ring.lookup(second) is not None
    path.write_text("{ not json")
    time.sleep(1.1)
    assert ring.lookup(first) == record and ring.lookup(second) is not None


def test_rate_limiter_refuses_past_the_burst_and_refills() -> None:
    limiter = RateLimiter(rate_per_s=20.0, burst=3)
    for _ in range(3):
        limiter.take("k")
    with pytest.raises(RateLimited) as refused:
        limiter.take("k")
    assert 0 < refused.value.retry_after <= 0.05 + 1e-9  # type: ignore[operator]
    limiter.take("other")  # buckets are per key
    time.sleep(0.06)
    limiter.take("k")
    RateLimiter(rate_per_s=0, burst=1).take("k")  # 0: unlimited
    for _ in range(100):
        RateLimiter(rate_per_s=0, burst=1).take("k")


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "keys.json"
    made = {
        "a_admin": create_key(path, "team-a", "admin")[0],
        "a_predict": create_key(path, "team-a", "predict")[0],
        "b_admin": create_key(path, "team-b", "admin")[0],
        "slow": create_key(path, "team-c", "admin", key_id="slow", rate_per_s=0.5, burst=2)[0],
    }
    return {"path": path, **made}


def test_tenants_see_and_touch_only_their_own_tasks(
    bank_dir: Path,
    tmp_path: Path,
    default_bank: TemplateBank,
    keys: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(
        bank=bank_dir,
        store=str(tmp_path / "tasks"),
        api_keys=ENV_KEY,
        keys_file=keys["path"],
        threads=2,
        max_wait_ms=2.0,
    )
    a, b = task_artifact(default_bank, 1, ("neg", "pos")), task_artifact(default_bank, 2, ("ham", "spam"))
    caplog.set_level(logging.INFO)
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        a_admin, b_admin = _bearer(keys["a_admin"]), _bearer(keys["b_admin"])
        # the same task id in two tenants: two different tasks
        assert http.put("/v1/tasks/shared", content=a.to_bytes(), headers=a_admin | OCTETS).status_code == 201
        assert http.put("/v1/tasks/shared", content=b.to_bytes(), headers=b_admin | OCTETS).status_code == 201
        assert http.put("/v1/tasks/only-a", content=a.to_bytes(), headers=a_admin | OCTETS).status_code == 201
        assert (
            http.put("/v1/tasks/public", content=b.to_bytes(), headers=_bearer(ENV_KEY) | OCTETS).status_code
            == 201
        )
        texts = {"inputs": ["hello there"]}
        got_a = http.post("/v1/tasks/shared/predict", json=texts, headers=_bearer(keys["a_predict"])).json()
        got_b = http.post("/v1/tasks/shared/predict", json=texts, headers=b_admin).json()
        assert got_a["task_id"] == "shared" and set(got_a["outputs"][0]["scores"]) == {"neg", "pos"}
        assert set(got_b["outputs"][0]["scores"]) == {"ham", "spam"}

        # another tenant's task answers 404, exactly like a task that does not exist
        for method, path, kwargs in (
            ("GET", "/v1/tasks/only-a", {}),
            ("POST", "/v1/tasks/only-a/predict", {"json": texts}),
            ("DELETE", "/v1/tasks/only-a", {}),
            (
                "PUT",
                "/v1/tasks/only-a",
                {"content": a.to_bytes(), "headers": b_admin | OCTETS | {"If-Match": "1"}},
            ),
        ):
            kwargs = {"headers": b_admin} | kwargs
            answer = http.request(method, path, **kwargs)
            want = (409, "version_conflict") if method == "PUT" else (404, "unknown_task")
            assert (answer.status_code, answer.json()["error_type"]) == want, (method, answer.text)
            assert "team-" not in answer.json()["error"]
        assert http.get("/v1/tasks/only-a", headers=a_admin).json()["version"] == 1  # untouched
        listing = http.get("/v1/tasks", headers=b_admin).json()
        assert [t["task_id"] for t in listing["tasks"]] == ["shared"] and listing["total"] == 1
        listing = http.get("/v1/tasks", params={"limit": 1}, headers=a_admin).json()
        assert [t["task_id"] for t in listing["tasks"]] == ["only-a"] and listing["next"] == "only-a"
        page2 = http.get("/v1/tasks", params={"after": "only-a"}, headers=a_admin).json()
        assert [t["task_id"] for t in page2["tasks"]] == ["shared"] and page2["next"] is None
        # no key: the default tenant, read and predict only
        anonymous = http.get("/v1/tasks").json()
        assert [t["task_id"] for t in anonymous["tasks"]] == ["public"]
        assert http.post("/v1/tasks/shared/predict", json=texts).status_code == 404
        assert http.post("/v1/tasks/public/predict", json=texts).status_code == 200

        # roles and credentials
        refused = http.put("/v1/tasks/x", content=a.to_bytes(), headers=_bearer(keys["a_predict"]) | OCTETS)
        assert (refused.status_code, refused.json()["error_type"]) == (403, "forbidden")
        assert http.delete("/v1/tasks/shared", headers=_bearer(keys["a_predict"])).status_code == 403
        assert http.delete("/v1/tasks/shared").status_code == 401
        assert http.get("/v1/tasks", headers=_bearer("rk_not-a-key")).status_code == 403

        # per-key rate limit: burst 2, then 429 rate_limited with Retry-After; other keys unaffected
        slow = _bearer(keys["slow"])
        statuses = [http.get("/v1/tasks", headers=slow).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        limited = http.get("/v1/tasks", headers=slow)
        assert limited.json()["error_type"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1
        assert http.get("/v1/tasks", headers=a_admin).status_code == 200

        # a revoked key stops working without a restart
        assert recast(["keys", "revoke", "--file", str(keys["path"]), "--id", "slow"]) == 0
        deadline = time.monotonic() + 5
        while http.get("/v1/tasks", headers=slow).status_code != 403:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.2)

        assert http.delete("/v1/tasks/shared", headers=b_admin).json()["deleted"] is True
        assert http.get("/v1/tasks/shared", headers=a_admin).status_code == 200  # team-a's is still there

    # plain keys never reach the log; the access log names the tenant and the key id
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in (ENV_KEY, keys["a_admin"], keys["a_predict"], keys["b_admin"], keys["slow"]):
        assert secret not in logged
    access = [r.__dict__ for r in caplog.records if r.name == "server.access"]
    assert any(
        r.get("tenant") == "team-b" and str(r.get("key_id", "")).startswith("team-b-admin") for r in access
    )
    assert any(r.get("tenant") == "default" and r.get("key_id") == "env-1" for r in access)

    # tenant tasks survive a restart on the same store
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert [
            t["task_id"] for t in http.get("/v1/tasks", headers=_bearer(keys["a_admin"])).json()["tasks"]
        ] == [
            "only-a",
            "shared",
        ]
        assert http.get("/v1/tasks/shared", headers=_bearer(keys["b_admin"])).status_code == 404
