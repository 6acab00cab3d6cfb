"""API v1 tasks: upload, list, read and delete; handlers validate, then hand work to the catalog."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from server.api.deps import AdminCaller, ExpectedVersion, ReadCaller, RuntimeDep, stored_id_of
from server.api.openapi import error_responses
from server.errors import (
    BadInput,
    PayloadTooLarge,
    TaskUnavailable,
    UnknownTask,
    UnsupportedMediaType,
)
from server.ids import split_stored_id
from server.tasks.registry import TaskEntry, TaskRegistry

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
ARTIFACT_TYPE = "application/octet-stream"
ARTIFACT = {
    "type": "string",
    "format": "binary",
    "minLength": 1,
    "description": "the task artifact (.safetensors)",
}


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
    "/{task_id}",
    response_model=TaskDetail,
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
    | {201: {"model": TaskDetail, "description": "created (version 1)"}},
    openapi_extra={"requestBody": {"required": True, "content": {ARTIFACT_TYPE: {"schema": ARTIFACT}}}},
)
async def upload_task(
    task_id: str,
    request: Request,
    response: Response,
    caller: AdminCaller,
    expected: ExpectedVersion,
    runtime: RuntimeDep,
) -> TaskDetail:
    """Upload a task artifact (raw safetensors body, `application/octet-stream`); returns its new version."""
    stored_id = stored_id_of(caller, task_id)
    content_type = request.headers.get("content-type", ARTIFACT_TYPE).split(";")[0].strip().lower()
    if content_type != ARTIFACT_TYPE:
        raise UnsupportedMediaType(
            "upload the artifact as the raw body with Content-Type application/octet-stream, "
            f"not {content_type}"
        )
    limit = runtime.settings.max_upload_bytes
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
    existed = _is_live(runtime.registry, stored_id)
    start = time.perf_counter()
    entry = await run_in_threadpool(runtime.catalog.upload, stored_id, bytes(body), if_match=expected)
    seconds = time.perf_counter() - start  # validated, stored durably and servable
    runtime.metrics.upload_seconds.observe(seconds)
    response.status_code = 200 if existed and entry.version > 1 else 201  # 201: no live version before
    response.headers["ETag"] = f'"{entry.version}"'
    response.headers["Server-Timing"] = f"upload;dur={1000 * seconds:.3f}"
    return _detail(entry)


@router.get("", response_model=TaskPage, responses=error_responses(400, 401, 403, 429, 503))
async def list_tasks(
    caller: ReadCaller,
    runtime: RuntimeDep,
    after: Annotated[str, Query(max_length=128, description="last task id of the previous page")] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TaskPage:
    entries, total = await run_in_threadpool(runtime.registry.page, after, limit + 1, caller.tenant)
    last = split_stored_id(entries[limit - 1].task_id)[1] if len(entries) > limit else None
    entries = entries[:limit]
    return TaskPage(tasks=[_summary(e) for e in entries], total=total, next=last)


@router.get("/{task_id}", response_model=TaskDetail, responses=error_responses(400, 401, 403, 404, 429, 503))
async def get_task(task_id: str, response: Response, caller: ReadCaller, runtime: RuntimeDep) -> TaskDetail:
    entry = runtime.registry.get(stored_id_of(caller, task_id))
    response.headers["ETag"] = f'"{entry.version}"'
    return _detail(entry)


@router.delete(
    "/{task_id}", response_model=Deleted, responses=error_responses(400, 401, 403, 404, 409, 429, 503)
)
async def delete_task(
    task_id: str, caller: AdminCaller, expected: ExpectedVersion, runtime: RuntimeDep
) -> Deleted:
    stored_id = stored_id_of(caller, task_id)
    tombstone = await run_in_threadpool(runtime.catalog.delete, stored_id, if_match=expected)
    return Deleted(task_id=task_id, version=tombstone.version)
