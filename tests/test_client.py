"""The Python client and the `recast tasks` / `recast predict --task-id` verbs against a real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from server_harness import free_port, serving, task_artifact

from recast_cli.main import main
from recast_client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    Forbidden,
    InvalidArtifact,
    Overloaded,
    Unauthorized,
    UnknownTask,
    VersionConflict,
)
from recast_client.errors import BadInput
from recast_core.bank import TemplateBank
from server.settings import Settings

KEY = "client-test-key"


def _settings(bank_dir: Path, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "bank": bank_dir,
        "store": str(tmp_path / "tasks"),
        "api_keys": KEY,
        "threads": 2,
    }
    return Settings(**(values | overrides))


def test_sync_and_async_clients_and_typed_errors(
    bank_dir: Path, tmp_path: Path, default_bank: TemplateBank
) -> None:
    artifact = tmp_path / "spam.safetensors"
    artifact.write_bytes(task_artifact(default_bank, 3, labels=("ham", "spam")).to_bytes())
    with serving(_settings(bank_dir, tmp_path, max_queue_texts=2)) as url:
        with Client(url, KEY, retries=2, backoff=0.01, max_backoff=0.05) as client:
            assert client.ready()
            created = client.upload("spam", artifact)
            assert created["version"] == 1 and created["labels"] == ["ham", "spam"]
            assert client.upload("spam", artifact.read_bytes(), if_match=1)["version"] == 2
            with pytest.raises(VersionConflict) as conflict:
                client.upload("spam", artifact, if_match=1)
            assert conflict.value.status == 409
            answer = client.predict("spam", ["free prize", "see you later"])
            assert answer["version"] == 2 and len(answer["outputs"]) == 2
            assert [t["task_id"] for t in client.iter_tasks(page_size=1)] == ["spam"]
            assert client.get_task("spam")["trainable_parameters"] == 48
            assert client.backbone()["bank"]["fingerprint"] == default_bank.fingerprint
            with pytest.raises(UnknownTask) as unknown:
                client.predict("nope", ["x"])
            assert unknown.value.status == 404 and unknown.value.error_type == "unknown_task"
            with pytest.raises(InvalidArtifact) as invalid:
                client.upload("bad", b"not an artifact at all")
            assert invalid.value.reason == "artifact_corrupt"
            with pytest.raises(BadInput):
                client.predict("spam", [])
            # the queue holds 2 texts: 3 are refused with 429 every time; the client retries, then raises
            with pytest.raises(Overloaded) as overloaded:
                client.predict("spam", ["a", "b", "c"])
            assert overloaded.value.retry_after is not None and overloaded.value.retry_after >= 1
            metrics = client._http.get("/metrics").text
            assert "recast_overload_rejections_total 3.0" in metrics, "one try and two retries"
            assert client.delete("spam", if_match=2)["deleted"] is True
        with Client(url, api_key="", retries=0) as anonymous, pytest.raises(Unauthorized):
            anonymous.upload("x", artifact)
        with Client(url, api_key="wrong", retries=0) as wrong, pytest.raises(Forbidden):
            wrong.delete("x")

        async def async_flow() -> None:
            async with AsyncClient(url, KEY) as client:
                assert await client.ready()
                assert (await client.upload("async-task", artifact))["version"] == 1
                answers = await asyncio.gather(
                    *(client.predict("async-task", [f"text {i}"]) for i in range(6))
                )
                assert all(a["outputs"][0]["label"] in ("ham", "spam") for a in answers)
                assert [t["task_id"] async for t in client.iter_tasks()] == ["async-task"]
                with pytest.raises(UnknownTask):
                    await client.get_task("missing")

        asyncio.run(async_flow())
    with Client(f"http://127.0.0.1:{free_port()}", retries=0) as closed, pytest.raises(ConnectionFailed):
        closed.get_task("x")


def test_cli_verbs_against_a_server(
    bank_dir: Path, tmp_path: Path, default_bank: TemplateBank, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = tmp_path / "topic.safetensors"
    artifact.write_bytes(task_artifact(default_bank, 2, labels=("sports", "science", "arts")).to_bytes())
    with serving(_settings(bank_dir, tmp_path)) as url:
        server = ["--url", url, "--api-key", KEY]
        assert main(["tasks", "upload", "topic", str(artifact), *server]) == 0
        assert json.loads(capsys.readouterr().out)["version"] == 1
        assert main(["tasks", "list", *server]) == 0
        assert [json.loads(line)["task_id"] for line in capsys.readouterr().out.splitlines()] == ["topic"]
        texts = ["a goal in extra time", "a new planet"]
        assert main(["predict", "--url", url, "--task-id", "topic", *texts]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [line["text"] for line in lines] == texts
        assert all(line["label"] in ("sports", "science", "arts") for line in lines)
        assert main(["tasks", "delete", "topic", *server]) == 0
        capsys.readouterr()
        assert main(["tasks", "get", "topic", *server]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after the in-process server's log lines
        assert error == "recast tasks: error: no task 'topic'"
        assert main(["tasks", "upload", "x", str(tmp_path / "missing.safetensors"), *server]) == 2
        assert "no artifact file" in capsys.readouterr().err
        assert main(["tasks", "delete", "topic", "--url", url, "--api-key", "wrong"]) == 2
        assert "not valid" in capsys.readouterr().err


def test_the_client_knows_every_error_type_the_server_answers() -> None:
    import server.errors as server_errors
    from recast_client.errors import BY_TYPE, Retryable

    def subclasses(cls: type[server_errors.ServerError]) -> list[type[server_errors.ServerError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    for cls in subclasses(server_errors.ServerError):
        assert cls.error_type in BY_TYPE, cls
        assert issubclass(BY_TYPE[cls.error_type], Retryable) == (cls.status in (429, 503)), cls
