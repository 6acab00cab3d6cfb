"""The Open Inference Protocol v2 REST API (KServe v2; Triton's HTTP API): each task of the caller's tenant
is a model, its current version the one version served.

    GET  /v2/health/live, /v2/health/ready, /v2                       no key needed
    GET  /v2/models/{task}[/versions/{v}][/ready]                     a key that may read
    POST /v2/models/{task}[/versions/{v}]/infer                       a key that may predict
    POST /v2/repository/index                                         an admin key

A task takes one input, `text` (BYTES, shape [-1]) and answers `label` (BYTES [-1]) and `probabilities`
(FP32 [-1, C], in the order of the labels its metadata lists). Inference runs through the same cross-task
batcher as /v1 predict. Errors answer the protocol's `{"error": message}` with the status /v1 gives the
same error (server/app.py picks the body by path); the wire format is server/api/oip.py's.
"""

from __future__ import annotations

from importlib import metadata
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, StrictBool

from server.api import oip
from server.api.deps import AdminCaller, BatcherDep, PredictCaller, ReadCaller, RuntimeDep, stored_id_of
from server.api.openapi import DESCRIPTIONS, HEADERS
from server.api.routes.predict import classify
from server.auth.identity import Identity
from server.errors import UnknownTask
from server.ids import split_stored_id
from server.runtime import Runtime
from server.serving.batcher import Batcher
from server.tasks.registry import TaskEntry, TaskRegistry

router = APIRouter(prefix=oip.PREFIX, tags=["v2"])
NAME = "recast-serve"
EXTENSIONS = ["binary_tensor_data", "model_repository"]  # of the repository extension: the index
PLATFORM = "recast"
INDEX_PAGE = 1000


def _version() -> str:
    try:
        return metadata.version(NAME)
    except metadata.PackageNotFoundError:
        return "0"


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a /v2 route: the protocol's error body `{"error"}` for each status."""
    schema = {
        "title": "InferenceError",
        "type": "object",
        "properties": {"error": {"type": "string", "description": "what went wrong"}},
        "required": ["error"],
    }
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": DESCRIPTIONS[status],
            "content": {oip.JSON_TYPE: {"schema": schema}},
        }
        if status in HEADERS:
            response["headers"] = HEADERS[status]
        responses[status] = response
    return responses


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` written in place (the OpenAPI document has its own root)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(dict(defs[ref.removeprefix("#/$defs/")]))
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


BINARY = {"type": "string", "format": "binary"}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": f"JSON tensors, or a JSON header of `{oip.HEADER_LENGTH}` bytes followed by binary "
        "tensor data",
        "content": {
            oip.JSON_TYPE: {"schema": _inline(oip.InferenceRequest.model_json_schema())},
            oip.BINARY_TYPE: {"schema": BINARY},
        },
    }
}
INFER_RESPONSES = errors(400, 401, 403, 404, 413, 429, 503) | {
    200: {
        "description": f"outputs as JSON tensors, or a JSON header of `{oip.HEADER_LENGTH}` bytes followed "
        "by binary tensor data when the request asked for binary outputs",
        "content": {
            oip.JSON_TYPE: {"schema": _inline(oip.InferenceResponse.model_json_schema())},
            oip.BINARY_TYPE: {"schema": BINARY},
        },
        "headers": {
            oip.HEADER_LENGTH: {"description": "bytes of the JSON header", "schema": {"type": "integer"}}
        },
    }
}
HeaderLength = Annotated[
    int | None,
    Header(
        alias=oip.HEADER_LENGTH,
        ge=1,
        description="bytes of the JSON header when binary tensor data follows it",
    ),
]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, list[str]]


class IndexRequest(BaseModel):
    ready: StrictBool | None = None


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str


@router.get("/health/live", response_model=Live)
async def live() -> Live:
    """Liveness: the process answers."""
    return Live(live=True)


@router.get("/health/ready", response_model=Ready, responses=errors(503))
async def ready(runtime: RuntimeDep, batcher: BatcherDep) -> Ready:
    """Readiness: backbone, bank and tasks loaded, batcher running (503 otherwise)."""
    return Ready(ready=True)


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=NAME, version=_version(), extensions=EXTENSIONS)


def _current(runtime: Runtime, stored_id: str, version: str | None) -> TaskEntry:
    """The task's current entry; 404 when it has none, or when `version` names another version."""
    entry = runtime.registry.get(stored_id)
    _check_version(entry, version)
    return entry


def _check_version(entry: TaskEntry, version: str | None) -> None:
    if version is not None and version != str(entry.version):
        task_id = split_stored_id(entry.task_id)[1]
        raise UnknownTask(
            f"model {task_id!r} has no version {version[:20]!r} to serve: its current version is "
            f"{entry.version}, the only one served"
        )


def _metadata(task_id: str, entry: TaskEntry) -> ModelMetadata:
    return ModelMetadata(
        name=task_id,
        versions=[str(entry.version)],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=oip.INPUT, datatype="BYTES", shape=[-1])],
        outputs=[
            TensorMetadata(name=oip.LABEL, datatype="BYTES", shape=[-1]),
            TensorMetadata(name=oip.PROBABILITIES, datatype="FP32", shape=[-1, len(entry.labels)]),
        ],
        parameters={"labels": list(entry.labels)},
    )


READ_ERRORS = errors(400, 401, 403, 404, 429, 503)


@router.get("/models/{task_id}", response_model=ModelMetadata, responses=READ_ERRORS)
async def model_metadata(task_id: str, caller: ReadCaller, runtime: RuntimeDep) -> ModelMetadata:
    """The task as a model: its input, its outputs and its labels (`parameters.labels`, the order of the
    probabilities)."""
    return _metadata(task_id, _current(runtime, stored_id_of(caller, task_id), None))


@router.get("/models/{task_id}/versions/{version}", response_model=ModelMetadata, responses=READ_ERRORS)
async def model_version_metadata(
    task_id: str, version: str, caller: ReadCaller, runtime: RuntimeDep
) -> ModelMetadata:
    """As the model's metadata, for its current version only (another version answers 404)."""
    return _metadata(task_id, _current(runtime, stored_id_of(caller, task_id), version))


@router.get("/models/{task_id}/ready", response_model=ModelReady, responses=READ_ERRORS)
async def model_ready(task_id: str, caller: ReadCaller, runtime: RuntimeDep) -> ModelReady:
    """200 when the task can be served; 404 when the tenant has no such task."""
    _current(runtime, stored_id_of(caller, task_id), None)
    return ModelReady(name=task_id, ready=True)


@router.get("/models/{task_id}/versions/{version}/ready", response_model=ModelReady, responses=READ_ERRORS)
async def model_version_ready(
    task_id: str, version: str, caller: ReadCaller, runtime: RuntimeDep
) -> ModelReady:
    _current(runtime, stored_id_of(caller, task_id), version)
    return ModelReady(name=task_id, ready=True)


@router.post(
    "/models/{task_id}/infer", response_class=Response, responses=INFER_RESPONSES, openapi_extra=INFER_BODY
)
async def infer(
    task_id: str,
    request: Request,
    caller: PredictCaller,
    runtime: RuntimeDep,
    batcher: BatcherDep,
    header_length: HeaderLength = None,
) -> Response:
    """Classify the `text` input's elements with the task's current version."""
    return await _infer(task_id, None, request, caller, runtime, batcher, header_length)


@router.post(
    "/models/{task_id}/versions/{version}/infer",
    response_class=Response,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_BODY,
)
async def infer_version(
    task_id: str,
    version: str,
    request: Request,
    caller: PredictCaller,
    runtime: RuntimeDep,
    batcher: BatcherDep,
    header_length: HeaderLength = None,
) -> Response:
    """As infer, for the task's current version only (another version answers 404)."""
    return await _infer(task_id, version, request, caller, runtime, batcher, header_length)


async def _infer(
    task_id: str,
    version: str | None,
    request: Request,
    caller: Identity,
    runtime: Runtime,
    batcher: Batcher,
    header_length: int | None,
) -> Response:
    stored_id = stored_id_of(caller, task_id)
    _current(runtime, stored_id, version)
    inference = oip.decode_request(await request.body(), header_length)
    entry, predictions = await classify(runtime, batcher, stored_id, inference.texts)
    _check_version(entry, version)  # replaced while the request waited: not the version asked for
    probabilities = np.array(
        [[p.scores[label] for label in entry.labels] for p in predictions], dtype=np.float32
    ).reshape(len(predictions), len(entry.labels))
    content, headers = oip.encode_response(
        task_id,
        str(entry.version),
        inference.id,
        [p.label for p in predictions],
        probabilities,
        inference.outputs,
    )
    return Response(content, headers=headers)


@router.post("/repository/index", response_model=list[IndexEntry], responses=errors(400, 401, 403, 429, 503))
async def repository_index(
    caller: AdminCaller, runtime: RuntimeDep, body: IndexRequest | None = None
) -> list[IndexEntry]:
    """The tenant's tasks, each READY at its current version (`{"ready": true}` lists the same)."""
    entries = await run_in_threadpool(_every_task, runtime.registry, caller.tenant)
    return [
        IndexEntry(name=split_stored_id(e.task_id)[1], version=str(e.version), state="READY") for e in entries
    ]


def _every_task(registry: TaskRegistry, tenant: str) -> list[TaskEntry]:
    entries: list[TaskEntry] = []
    after = ""
    while True:
        page, _ = registry.page(after, INDEX_PAGE, tenant)
        entries += page
        if len(page) < INDEX_PAGE:
            return entries
        after = split_stored_id(page[-1].task_id)[1]
