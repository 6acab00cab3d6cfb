"""API v1 training jobs: create a task from labelled examples, follow the job, cancel it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from server.api.deps import AdminCaller, ReadCaller, RuntimeDep, stored_id_of
from server.api.openapi import error_responses
from server.errors import UnsupportedMediaType
from server.training.data import (
    EPOCHS,
    MAX_LENGTH,
    SEED,
    TrainingOptions,
    TrainRequest,
    check_examples,
    from_csv,
    from_json,
    options_dict,
    parse_options,
)
from server.training.records import Job

router = APIRouter(prefix="/v1", tags=["jobs"])
OPTION_NAMES = tuple(TrainingOptions.model_fields)


class JobView(BaseModel):
    job_id: str
    task_id: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    phase: str = Field(description="queued, loading, embedding, training, done")
    progress: float = Field(description="0 to 1")
    created: str
    started: str | None
    finished: str | None
    examples: int
    labels: list[str]
    options: dict[str, Any]
    error: str | None = Field(description="why the job failed or was cancelled")
    result: dict[str, Any] | None = Field(
        description="on success: the task version published, validation accuracy, examples, seconds"
    )
    cancel_requested: bool = Field(description="a cancel was asked (the job ends as soon as its server acts)")


class JobList(BaseModel):
    jobs: list[JobView]


def _view(job: Job) -> JobView:
    return JobView(
        job_id=job.job_id,
        task_id=job.task_id,
        state=job.state,
        phase=job.phase,
        progress=job.progress,
        created=job.created,
        started=job.started,
        finished=job.finished,
        examples=job.examples,
        labels=job.labels,
        options=job.options,
        error=job.error,
        result=job.result,
        cancel_requested=job.cancel_requested,
    )


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` references replaced by the definitions themselves."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


TRAIN_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _inlined(TrainRequest.model_json_schema())},
        "text/csv": {"schema": {"type": "string", "description": "a header row, then one example per row"}},
    },
}


@router.post(
    "/tasks/{task_id}/train",
    status_code=202,
    response_model=JobView,
    responses=error_responses(400, 401, 403, 413, 415, 429, 503),
    openapi_extra={"requestBody": TRAIN_BODY},
)
async def train_task(
    task_id: str,
    request: Request,
    response: Response,
    caller: AdminCaller,
    runtime: RuntimeDep,
    text_column: Annotated[str, Query(max_length=128, description="CSV: the text column")] = "text",
    label_column: Annotated[str, Query(max_length=128, description="CSV: the label column")] = "label",
    epochs: Annotated[
        int | None, Query(ge=EPOCHS[0], le=EPOCHS[1], description="overrides options.epochs")
    ] = None,
    max_length: Annotated[
        int | None, Query(ge=MAX_LENGTH[0], le=MAX_LENGTH[1], description="overrides options.max_length")
    ] = None,
    seed: Annotated[int | None, Query(ge=SEED[0], le=SEED[1], description="overrides options.seed")] = None,
) -> JobView:
    """Train a task from labelled examples in the background (JSON `{"examples", "options"}`, or a CSV
    body with `text` and `label` columns); 202 with the job to follow at `/v1/jobs/{job_id}`. The task is
    published like an upload when the job succeeds."""
    stored_id_of(caller, task_id)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if content_type == "application/json":
        data, options = await run_in_threadpool(from_json, body)
    elif content_type in ("text/csv", "application/csv"):
        data, options = await run_in_threadpool(from_csv, body, text_column, label_column), TrainingOptions()
    else:
        raise UnsupportedMediaType(
            f"send the examples as application/json or text/csv, not {content_type or 'no content type'}"
        )
    overrides = {
        k: v for k, v in (("epochs", epochs), ("max_length", max_length), ("seed", seed)) if v is not None
    }
    if overrides:
        options = parse_options(options.model_dump() | overrides)
    settings = runtime.settings
    await run_in_threadpool(check_examples, data, settings.max_train_examples, settings.max_input_chars)
    job = await run_in_threadpool(runtime.jobs.submit, caller.tenant, task_id, data, options_dict(options))
    response.headers["Location"] = f"/v1/jobs/{job.job_id}"
    return _view(job)


@router.get("/jobs", response_model=JobList, responses=error_responses(400, 401, 403, 429, 503))
async def list_jobs(
    caller: ReadCaller, runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> JobList:
    """The tenant's newest training jobs, newest first."""
    jobs = await run_in_threadpool(runtime.jobs.list, caller.tenant, limit)
    return JobList(jobs=[_view(j) for j in jobs])


@router.get("/jobs/{job_id}", response_model=JobView, responses=error_responses(400, 401, 403, 404, 429, 503))
async def get_job(job_id: str, caller: ReadCaller, runtime: RuntimeDep) -> JobView:
    return _view(await run_in_threadpool(runtime.jobs.get, caller.tenant, job_id))


@router.delete(
    "/jobs/{job_id}",
    response_model=JobView,
    responses=error_responses(400, 401, 403, 404, 409, 429, 503),
    summary="Cancel a job",
)
async def cancel_job(job_id: str, caller: AdminCaller, runtime: RuntimeDep) -> JobView:
    """DELETE cancels the job; its record stays (listed, `cancelled`) until finished jobs are pruned. A
    queued job is dropped at once; a running one has its worker ended, on whichever replica runs it, and
    the answer waits for that (up to 15 s; if it is still `running` then, `cancel_requested` is true). A
    cancelled job publishes nothing. 409 `job_finished` once the job ended."""
    return _view(await run_in_threadpool(runtime.jobs.cancel, caller.tenant, job_id))
