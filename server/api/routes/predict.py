"""API v1 predictions: a task's current version classifies the request's texts, batched across tasks."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from recast_core.task_model import Prediction
from server.api.deps import BatcherDep, PredictCaller, RuntimeDep, stored_id_of
from server.api.openapi import error_responses
from server.errors import NotReady
from server.runtime import Runtime
from server.serving.batcher import Batcher
from server.serving.predictor import TaskRequest, check_texts
from server.tasks.heads import Head
from server.tasks.registry import TaskEntry

router = APIRouter(prefix="/v1/tasks", tags=["predict"])


class PredictRequest(BaseModel):
    # the bounds the schema shows are the server's own (RECAST_MAX_INPUTS, RECAST_MAX_INPUT_CHARS): see
    # server/api/openapi.py; the handler checks them
    inputs: list[str] = Field(description="texts to classify (1 to RECAST_MAX_INPUTS)")


class Output(BaseModel):
    label: str
    scores: dict[str, float]


class PredictResponse(BaseModel):
    task_id: str
    version: int
    outputs: list[Output]


@router.post(
    "/{task_id}/predict",
    response_model=PredictResponse,
    responses=error_responses(400, 401, 403, 404, 413, 429, 503),
)
async def predict(
    task_id: str, body: PredictRequest, caller: PredictCaller, runtime: RuntimeDep, batcher: BatcherDep
) -> PredictResponse:
    """Classify 1..RECAST_MAX_INPUTS texts with the task's current version; outputs in input order."""
    entry, outputs = await classify(runtime, batcher, stored_id_of(caller, task_id), body.inputs)
    return PredictResponse(
        task_id=task_id,
        version=entry.version,
        outputs=[Output(label=o.label, scores=o.scores) for o in outputs],
    )


async def classify(
    runtime: Runtime, batcher: Batcher, stored_id: str, texts: list[str]
) -> tuple[TaskEntry, list[Prediction]]:
    """The task's current version and its predictions for `texts` (checked against the server's limits),
    through the cross-task batcher; the API versions that classify (/v1 predict, /v2 infer) share it."""
    settings = runtime.settings
    check_texts(texts, settings.max_inputs, settings.max_input_chars)
    registry = runtime.registry
    entry = registry.get(stored_id)  # this version (and its head) answers the whole request
    head = registry.heads.get(entry.digest)
    if head is None:  # evicted under the memory budget: read back from the store, off the event loop
        resolved: tuple[TaskEntry, Head] = await run_in_threadpool(registry.resolve, stored_id)
        entry, head = resolved
    tokens = await run_in_threadpool(runtime.predictor.encode, texts)  # at the edge, off the loop
    try:
        work = TaskRequest(entry, head, texts, tokens)
        outputs = await asyncio.wait_for(batcher.submit(work), settings.request_timeout_s)
    except TimeoutError:
        raise NotReady(
            f"no answer within {settings.request_timeout_s} s; retry later", retry_after=1
        ) from None
    return entry, outputs
