"""API v1 routes. Handlers validate, then hand work to the catalog (store + registry) or the batcher."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from recast_core.device import dtype_name
from server.errors import (
    BadInput,
    NotReady,
    PayloadTooLarge,
    StoreError,
    TaskUnavailable,
    UnknownTask,
    UnsupportedMediaType,
)
from server.openapi import error_responses
from server.predictor import TaskRequest, check_texts
from server.registry import TaskEntry, TaskRegistry
from server.request_context import app_state, identify, stored_id_of
from server.task_ids import split_stored_id

router = APIRouter()
ARTIFACT_TYPE = "application/octet-stream"
ARTIFACT = {
    "type": "string",
    "format": "binary",
    "minLength": 1,
    "description": "the task artifact (.safetensors)",
}


class PredictRequest(BaseModel):
    # the bounds the schema shows are the server's own (RECAST_MAX_INPUTS, RECAST_MAX_INPUT_CHARS): see
    # server/openapi.py; the handler checks them
    inputs: list[str] = Field(description="texts to classify (1 to RECAST_MAX_INPUTS)")


class Output(BaseModel):
    label: str
    scores: dict[str, float]


class PredictResponse(BaseModel):
    task_id: str
    version: int
    outputs: list[Output]


class TaskSummary(BaseModel):
    task_id: str
    version: int
    labels: list[str]
    updated: str
    size_bytes: int


class TaskDetail(TaskSummary):
    created: str
    bank_fingerprint: str
    digest: str
    trainable_parameters: int
    head_parameters: int
    training: dict[str, Any]


class TaskPage(BaseModel):
    tasks: list[TaskSummary]
    total: int
    next: str | None = Field(description="pass as `after` for the next page; null on the last page")


class Deleted(BaseModel):
    task_id: str
    version: int
    deleted: bool = True


def _summary(entry: TaskEntry) -> TaskSummary:
    return TaskSummary(
        task_id=split_stored_id(entry.task_id)[1],
        version=entry.version,
        labels=list(entry.labels),
        updated=entry.updated,
        size_bytes=entry.size_bytes,
    )


def _detail(entry: TaskEntry) -> TaskDetail:
    return TaskDetail(
        **_summary(entry).model_dump(),
        created=entry.created,
        bank_fingerprint=entry.bank_fingerprint,
        digest=entry.digest,
        trainable_parameters=entry.trainable_parameters,
        head_parameters=entry.head_parameters,
        training=entry.training,
    )


IF_MATCH_PATTERN = r'^(W/)?"?[0-9]{1,18}"?$'
IfMatch = Annotated[
    str | None,
    Header(
        pattern=IF_MATCH_PATTERN,
        description='the task version the change applies to: `3` or `"3"` (the ETag); `0`: only if the task '
        "does not exist",
    ),
]


def _if_match(value: str | None) -> int | None:
    """`If-Match: 3` or `If-Match: "3"` (the ETag we send); 0 means the task must not exist yet."""
    if value is None:
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise BadInput(f"If-Match must be a task version number, got {value[:40]!r}")
    return int(text)


def _is_live(registry: TaskRegistry, stored_id: str) -> bool:
    """Whether the task has a live version (one whose stored artifact failed verification counts)."""
    try:
        registry.get(stored_id)
    except UnknownTask:
        return False
    except TaskUnavailable:
        return True
    return True


@router.put(
    "/v1/tasks/{task_id}",
    response_model=TaskDetail,
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
    | {201: {"model": TaskDetail, "description": "created (version 1)"}},
    tags=["tasks"],
    openapi_extra={"requestBody": {"required": True, "content": {ARTIFACT_TYPE: {"schema": ARTIFACT}}}},
)
async def upload_task(
    task_id: str,
    request: Request,
    response: Response,
    authorization: Annotated[str | None, Header()] = None,
    if_match: IfMatch = None,
) -> TaskDetail:
    """Upload a task artifact (raw safetensors body, `application/octet-stream`); returns its new version."""
    state = app_state(request)
    stored_id = stored_id_of(identify(request, authorization, "admin"), task_id)
    expected = _if_match(if_match)
    content_type = request.headers.get("content-type", ARTIFACT_TYPE).split(";")[0].strip().lower()
    if content_type != ARTIFACT_TYPE:
        raise UnsupportedMediaType(
            "upload the artifact as the raw body with Content-Type application/octet-stream, "
            f"not {content_type}"
        )
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"artifact of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"artifact exceeds the limit of {limit} bytes")
    if not body:
        raise BadInput("empty body: send the task artifact (.safetensors) as the request body")
    runtime, _ = state.require()
    existed = _is_live(runtime.registry, stored_id)
    start = time.perf_counter()
    entry = await run_in_threadpool(runtime.catalog.upload, stored_id, bytes(body), if_match=expected)
    seconds = time.perf_counter() - start  # validated, stored durably and servable
    state.metrics.upload_seconds.observe(seconds)
    response.status_code = 200 if existed and entry.version > 1 else 201  # 201: no live version before
    response.headers["ETag"] = f'"{entry.version}"'
    response.headers["Server-Timing"] = f"upload;dur={1000 * seconds:.3f}"
    return _detail(entry)


@router.get(
    "/v1/tasks", response_model=TaskPage, responses=error_responses(400, 401, 403, 429, 503), tags=["tasks"]
)
async def list_tasks(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    after: Annotated[str, Query(max_length=128, description="last task id of the previous page")] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TaskPage:
    identity = identify(request, authorization, "read")
    runtime, _ = app_state(request).require()
    entries, total = await run_in_threadpool(runtime.registry.page, after, limit + 1, identity.tenant)
    last = split_stored_id(entries[limit - 1].task_id)[1] if len(entries) > limit else None
    entries = entries[:limit]
    return TaskPage(tasks=[_summary(e) for e in entries], total=total, next=last)


@router.get(
    "/v1/tasks/{task_id}",
    response_model=TaskDetail,
    responses=error_responses(400, 401, 403, 404, 429, 503),
    tags=["tasks"],
)
async def get_task(
    task_id: str,
    request: Request,
    response: Response,
    authorization: Annotated[str | None, Header()] = None,
) -> TaskDetail:
    stored_id = stored_id_of(identify(request, authorization, "read"), task_id)
    runtime, _ = app_state(request).require()
    entry = runtime.registry.get(stored_id)
    response.headers["ETag"] = f'"{entry.version}"'
    return _detail(entry)


@router.delete(
    "/v1/tasks/{task_id}",
    response_model=Deleted,
    responses=error_responses(400, 401, 403, 404, 409, 429, 503),
    tags=["tasks"],
)
async def delete_task(
    task_id: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    if_match: IfMatch = None,
) -> Deleted:
    state = app_state(request)
    stored_id = stored_id_of(identify(request, authorization, "admin"), task_id)
    expected = _if_match(if_match)
    runtime, _ = state.require()
    tombstone = await run_in_threadpool(runtime.catalog.delete, stored_id, if_match=expected)
    return Deleted(task_id=task_id, version=tombstone.version)


@router.post(
    "/v1/tasks/{task_id}/predict",
    response_model=PredictResponse,
    responses=error_responses(400, 401, 403, 404, 413, 429, 503),
    tags=["predict"],
)
async def predict(
    task_id: str,
    body: PredictRequest,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> PredictResponse:
    """Classify 1..RECAST_MAX_INPUTS texts with the task's current version; outputs in input order."""
    state = app_state(request)
    settings = state.settings
    stored_id = stored_id_of(identify(request, authorization, "predict"), task_id)
    check_texts(body.inputs, settings.max_inputs, settings.max_input_chars)
    runtime, batcher = state.require()
    registry = runtime.registry
    entry = registry.get(stored_id)  # this version (and its head) answers the whole request
    head = registry.heads.get(entry.digest)
    if head is None:  # evicted under the memory budget: read back from the store, off the event loop
        entry, head = await run_in_threadpool(registry.resolve, stored_id)
    tokens = await run_in_threadpool(runtime.predictor.encode, body.inputs)  # at the edge, off the loop
    try:
        work = TaskRequest(entry, head, body.inputs, tokens)
        outputs = await asyncio.wait_for(batcher.submit(work), settings.request_timeout_s)
    except TimeoutError:
        raise NotReady(
            f"no answer within {settings.request_timeout_s} s; retry later", retry_after=1
        ) from None
    return PredictResponse(
        task_id=task_id,
        version=entry.version,
        outputs=[Output(label=o.label, scores=o.scores) for o in outputs],
    )


@router.get("/v1/backbone", tags=["server"], responses=error_responses(400, 401, 403, 429, 503))
async def backbone(request: Request, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    """The backbone, bank and kernel serving; `tasks` counts the caller's tenant's tasks."""
    identity = identify(request, authorization, "read")
    runtime, _ = app_state(request).require()
    _, tasks = await run_in_threadpool(runtime.registry.page, "", 1, identity.tenant)
    bank = runtime.bank
    return {
        "model": runtime.backbone.name,
        "hidden_size": runtime.backbone.hidden_size,
        "bank": {
            "fingerprint": bank.fingerprint,
            "config": bank.config.to_dict(),
            "coefficients_per_task": bank.num_slots * bank.num_templates,
            "bytes": bank.nbytes(),
        },
        "kernel": {
            "path": runtime.kernels.path.value,
            "detail": runtime.kernels.detail,
            "variants": runtime.kernels.variant_choices(),
        },
        "device": str(runtime.device),
        "dtype": dtype_name(runtime.dtype),
        "store": runtime.store.kind,
        "tasks": tasks,
    }


@router.get("/healthz", tags=["server"])
@router.head("/healthz", tags=["server"], operation_id="healthz_head")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["server"], responses=error_responses(400, 503))
@router.head("/readyz", tags=["server"], responses=error_responses(400, 503), operation_id="readyz_head")
async def readyz(
    request: Request,
    strict: Annotated[bool, Query(description="also answer 503 while the task store is unreachable")] = False,
) -> dict[str, Any]:
    """Readiness: backbone, bank and tasks loaded, batcher running (503 `not_ready` otherwise).

    While the task store is unreachable or catching up, the replica still answers predictions for its
    resident tasks (uploads and deletes answer 503 `store_unavailable`), so it stays ready with
    `"status": "degraded"`; with `strict=true` it answers 503 `store_unavailable` instead. Taking every
    replica out of a load balancer because a shared database is down would stop predictions as well."""
    runtime, batcher = app_state(request).require()
    store_ok = runtime.store.healthy
    if not store_ok and strict:
        raise StoreError(
            f"the task store ({runtime.store.kind}) is unreachable or catching up; uploads and deletes "
            "fail until it is back, resident tasks still answer predictions",
            retry_after=2,
        )
    return {  # no task counts here: readiness needs no key, and tenants' task counts are theirs
        "status": "ready" if store_ok else "degraded",
        "store": "ok" if store_ok else "unavailable",
        "queued_texts": batcher.queued_texts,
    }


@router.get("/metrics", tags=["server"], response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    state = app_state(request)
    text = await run_in_threadpool(generate_latest, state.metrics.registry)  # off the event loop
    return Response(text, media_type=CONTENT_TYPE_LATEST)
