"""Schemathesis against the live OpenAPI schema of a real server (uvicorn on loopback, real MiniLM).

The schema is fetched over HTTP from the running server; every operation it documents gets generated
requests (coverage cases and fuzzed cases, valid and invalid), once with a valid admin key and once
without a key. Every answer must carry a documented status, content type, headers and body, and none may
be a 5xx. Path ids are drawn partly from tasks seeded before the run and uploads partly carry real
artifacts, so predict, get, delete and upload reach their success paths as well as their errors.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis.strategies as st
import pytest
import schemathesis
from schemathesis import Case
from schemathesis.core.parameters import ParameterLocation as Location
from schemathesis.engine import events, from_schema
from schemathesis.specs.openapi.schemas import OpenApiSchema
from server_harness import serving, task_artifact

from recast_core.artifact import TaskArtifact
from recast_core.backbone import TextBackbone
from recast_core.bank import TemplateBank
from recast_core.task_model import TextTaskModel
from server.api.openapi import error_types
from server.settings import Settings

KEY = "fuzz-admin-key"
BEARER = {"Authorization": f"Bearer {KEY}"}
SEEDED = ("my-task", "spam", "topic.v2")
UPLOAD, DELETE = "PUT /v1/tasks/{task_id}", "DELETE /v1/tasks/{task_id}"
PROBE = ["Who wrote Hamlet?", "free entry in a weekly prize draw"]
MAX_LENGTH = 16  # tokens per text on the fuzzed server: keeps each forward cheap
MAX_EXAMPLES = 50  # per operation and generation mode in the fuzzing phase (coverage adds its fixed cases)
V2_EXAMPLES = 15  # likewise for each Open Inference Protocol operation
DEADLINE = 45.0  # seconds: a run still going then is stopped (the budget above needs about half)
SEED = 6
REJECTIONS = ["400", "401", "403", "404", "405", "409", "413", "415", "422", "429"]
ACCEPTANCE = ["200", "201", "202", "401", "403", "404", "409", "422", "429"]
TRAIN = "POST /v1/tasks/{task_id}/train"
# Open Inference Protocol inference: a tensor's shape must agree with its elements and binary data with the
# header's sizes, which no schema can say
INFER = ("POST /v2/models/{task_id}/infer", "POST /v2/models/{task_id}/versions/{version}/infer")


AnyCase = Case[Any]


@dataclass
class LiveServer:
    url: str
    artifacts: dict[str, TaskArtifact]
    store: Path
    restored: int = 0

    def restore(self, task_id: str) -> None:
        """Upload a seeded task again (after a generated delete or upload changed it)."""
        headers = BEARER | {"Content-Type": "application/octet-stream"}
        data = self.artifacts[task_id].to_bytes()
        response = httpx.put(f"{self.url}/v1/tasks/{task_id}", content=data, headers=headers, timeout=60)
        assert response.status_code in (200, 201), response.text
        self.restored += 1


@dataclass
class Run:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stop_reason: str = ""
    stopped: bool = False  # at the deadline

    def reached(self, label: str, status: int) -> bool:
        return self.statuses[(label, status)] > 0

    def table(self) -> str:
        lines = [f"{sum(self.statuses.values())} requests in {self.seconds:.1f} s ({self.stop_reason})"]
        lines += [f"  {label:36s} {status}  x{n}" for (label, status), n in sorted(self.statuses.items())]
        return "\n".join(lines)


@pytest.fixture(scope="module")
def live(
    bank_dir: Path, default_bank: TemplateBank, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("fuzz-api") / "tasks"
    settings = Settings(
        bank=bank_dir,
        store=str(store),
        api_keys=KEY,
        threads=2,
        max_wait_ms=1.0,
        max_inputs=8,
        max_input_chars=512,
        max_length=MAX_LENGTH,
        max_upload_bytes=64 << 10,
    )
    artifacts = {
        "my-task": task_artifact(default_bank, 11),
        "spam": task_artifact(default_bank, 12, labels=("ham", "spam")),
        "topic.v2": task_artifact(default_bank, 13, labels=("sports", "science", "arts")),
    }
    with serving(settings) as url:
        server = LiveServer(url, artifacts, store)
        for task_id in SEEDED:
            server.restore(task_id)
        yield server


def _live_schema(live: LiveServer, headers: dict[str, str]) -> OpenApiSchema:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["all"],
            "request-timeout": 30,
            "headers": headers,
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            # no ids learnt from earlier responses: the hook below mixes in the seeded ones, reproducibly
            "phases": {
                "stateful": {"enabled": False},
                "coverage": {"extra-data-sources": {"responses": False}},
                "fuzzing": {"extra-data-sources": {"responses": False}},
            },
            # every check. Schema-valid requests must be accepted (a 400 means the schema promised more
            # than the server takes); what no schema can say is allowed: an unknown task or job (404),
            # a conflict (409), schema-valid bytes that are not an artifact (422), the rate limit (429)
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ACCEPTANCE},
                # a body over the server's size limit is rejected before it is parsed: 413 is a rejection
                "negative_data_rejection": {"expected-statuses": REJECTIONS},
            },
            # training data has rules beyond any JSON schema (two classes of two examples at least, a CSV
            # body with its columns): a schema-valid body may be bad data, answered 400 naming the row
            "operations": [
                {
                    "include-name": name,
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTANCE, "400"]}},
                }
                for name in (TRAIN, *INFER)
            ]
            # the /v2 operations answer from one task lookup and share their code with each other and with
            # /v1: fewer examples each keeps the run within its deadline
            + [{"include-path-regex": "^/v2", "generation": {"max-examples": V2_EXAMPLES}}],
        }
    )
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=config)
    uploads = tuple(artifact.to_bytes() for artifact in live.artifacts.values())

    @schema.hook
    def flatmap_case(context: Any, case: AnyCase) -> st.SearchStrategy[AnyCase]:
        """Valid task ids become seeded ids half the time; valid upload bodies become real artifacts."""
        meta = case.meta
        ids: st.SearchStrategy[str | None] = st.none()
        if "task_id" in (case.path_parameters or {}) and not (meta and meta.is_negative_at(Location.PATH)):
            ids = st.sampled_from((None, *SEEDED))
        bodies: st.SearchStrategy[Any] = st.none()
        valid_body = not (meta and meta.is_negative_at(Location.BODY))
        if case.operation.label == UPLOAD and valid_body:
            bodies = st.sampled_from((None, *uploads))
        if case.operation.label in INFER and valid_body:  # a request of the model's own input
            tensors = {
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(PROBE)], "data": PROBE}]
            }
            inference = tensors if "json" in (case.media_type or "") else json.dumps(tensors).encode()
            bodies = st.sampled_from((None, inference))

        def apply(choice: tuple[str | None, Any]) -> AnyCase:
            task_id, body = choice
            if task_id is not None:
                case.path_parameters = {**case.path_parameters, "task_id": task_id}
            if body is not None:
                case.body = body
            return case

        return st.tuples(ids, bodies).map(apply)

    @schema.hook
    def after_call(context: Any, case: AnyCase, response: Any) -> None:
        task_id = (case.path_parameters or {}).get("task_id")
        if task_id in SEEDED and case.operation.label in (UPLOAD, DELETE) and response.status_code < 300:
            live.restore(task_id)

    return schema


def _execute(schema: OpenApiSchema) -> Run:
    run = Run()
    stream = from_schema(schema).execute()
    start = time.monotonic()
    for event in stream:
        if time.monotonic() - start > DEADLINE and not run.stopped:
            run.stopped = True
            stream.stop()  # the engine finishes the request in flight, then reports EngineFinished
        if isinstance(event, events.ScenarioFinished):
            label = event.recorder.label
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    run.statuses[(label, interaction.response.status_code)] += 1
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        run.failures.append(
                            f"{label}: {check.name}: {failure.title}\n{failure.message}\n"
                            f"{check.failure_info.code_sample[:2000]}"
                        )
        elif isinstance(event, events.NonFatalError):
            run.failures.append(f"{event.label}: {event.info.title}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            run.failures.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            run.seconds, run.stop_reason = event.running_time, event.stop_reason.value
    return run


def _expected(backbone: TextBackbone, bank: TemplateBank, artifact: TaskArtifact) -> list[str]:
    model = TextTaskModel.from_artifact(backbone, bank, artifact)
    return [p.label for p in model.predict(PROBE, max_length=MAX_LENGTH)]


@pytest.mark.parametrize("with_key", [True, False], ids=["admin_key", "no_key"])
def test_every_documented_operation_answers_as_documented(
    live: LiveServer, backbone: TextBackbone, default_bank: TemplateBank, with_key: bool
) -> None:
    run = _execute(_live_schema(live, BEARER if with_key else {}))
    print(
        f"\n{'with' if with_key else 'without'} a key: {run.table()}\nseeded tasks restored: {live.restored}"
    )
    unique = list(dict.fromkeys(run.failures))
    assert not unique, f"{len(unique)} failures:\n\n" + "\n\n".join(unique[:10])
    assert not any(status >= 500 for _, status in run.statuses), run.table()

    task, tasks, predict = "/v1/tasks/{task_id}", "GET /v1/tasks", "POST /v1/tasks/{task_id}/predict"
    if run.stopped:  # a very slow machine: what ran was checked, what it reached is not asserted
        warnings.warn(f"schemathesis run stopped at its {DEADLINE:.0f} s deadline", stacklevel=1)
    else:
        for label in (f"GET {task}", predict):
            assert run.reached(label, 200), f"no generated request reached a seeded task: {label}"
        assert run.reached(tasks, 200) and run.reached(predict, 400) and run.reached(f"GET {task}", 404)
        if with_key:
            assert run.reached(INFER[0], 200) and run.reached(INFER[0], 400), "no inference reached a task"
            assert run.reached(f"PUT {task}", 422), "no generated upload was rejected as an artifact"
            assert run.reached(f"PUT {task}", 200) or run.reached(f"PUT {task}", 201), "no upload succeeded"
            assert run.reached(f"DELETE {task}", 200), "no delete reached a seeded task"
        else:
            for label in (f"PUT {task}", f"DELETE {task}"):
                assert run.reached(label, 401), f"{label} without a key did not answer 401"

    # the server still answers correctly, and the store holds no partial writes
    answer = httpx.post(f"{live.url}/v1/tasks/spam/predict", json={"inputs": PROBE}, timeout=60)
    assert answer.status_code == 200, answer.text
    want = _expected(backbone, default_bank, live.artifacts["spam"])
    assert [o["label"] for o in answer.json()["outputs"]] == want
    assert not [p for p in live.store.rglob("*") if p.name.endswith(".tmp")]


def test_a_405_names_every_method_its_path_allows(live: LiveServer) -> None:
    """RFC 9110: a 405 carries Allow; Starlette's named only the first route matching the path."""
    for method, path, allowed in (
        ("OPTIONS", "/v1/tasks/spam", {"DELETE", "GET", "PUT"}),
        ("PATCH", "/v1/tasks/spam", {"DELETE", "GET", "PUT"}),
        ("GET", "/v1/tasks/spam/predict", {"POST"}),
        ("TRACE", "/healthz", {"GET", "HEAD"}),
    ):
        answer = httpx.request(method, f"{live.url}{path}", timeout=60)
        assert answer.status_code == 405 and answer.json()["error_type"] == "method_not_allowed"
        assert {m.strip() for m in answer.headers["allow"].split(",")} == allowed, answer.headers


def test_the_schema_documents_typed_errors_and_no_validation_422(live: LiveServer) -> None:
    schema = httpx.get(f"{live.url}/openapi.json", timeout=60).json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    vocabulary = {status: set(error_types(status)) for status in range(400, 600)}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                body = response["content"]["application/json"]["schema"]
                if path.startswith("/v2"):  # the Open Inference Protocol's error body
                    assert body["required"] == ["error"] and set(body["properties"]) == {"error"}
                    continue
                assert {"error", "error_type"} <= set(body["required"]), (method, path, status)
                assert set(body["properties"]["error_type"]["enum"]) == vocabulary[int(status)]
    upload = schema["paths"]["/v1/tasks/{task_id}"]["put"]
    assert {"200", "201", "413", "415", "422"} <= set(upload["responses"])
    assert "application/octet-stream" in upload["requestBody"]["content"]
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    task_id = next(p for p in upload["parameters"] if p["name"] == "task_id")
    assert task_id["in"] == "path" and task_id["schema"]["pattern"].startswith("^[A-Za-z0-9]")
