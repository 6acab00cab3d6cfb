"""OpenAI-shaped sentence embeddings, batched with predictions through the cross-task batcher.

    POST /v1/embeddings  {"model": "all-MiniLM-L6-v2" | TASK_ID, "input": TEXT | [TEXT, ...],
                          "encoding_format": "float" | "base64", "dimensions": H, "user": ...}
    -> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...] | BASE64}],
        "model": ..., "usage": {"prompt_tokens": N, "total_tokens": N}}

`model` naming the backbone (as GET /v1/backbone reports it, or `sentence-transformers/<name>`) gives the
plain backbone's pooled sentence embeddings, the same for every tenant; any other `model` is a task id of
the caller's tenant (another tenant's task is unknown, as for predict) and gives the embeddings that
task's head reads (its coefficients, FFN edit and pooling). Every vector is L2-normalised; base64 is the
vector's little-endian float32 bytes. Token counts are the token ids the encoder reads per text (special
tokens included, after truncation to RECAST_MAX_LENGTH). `user` is accepted and ignored.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from server.api.deps import BatcherDep, PredictCaller, RuntimeDep, stored_id_of
from server.api.openapi import error_responses
from server.auth.identity import Identity
from server.errors import BadInput, InvalidTaskId, NotReady, UnknownTask
from server.runtime import Runtime
from server.serving.predictor import TaskRequest, check_texts
from server.tasks.heads import Head
from server.tasks.registry import TaskEntry

router = APIRouter(prefix="/v1", tags=["embeddings"])
HUB_PREFIX = "sentence-transformers/"  # the backbone's name as the Hugging Face Hub spells it


class EmbeddingsRequest(BaseModel):
    # the bounds the schema shows on `input` are the server's own (RECAST_MAX_INPUTS,
    # RECAST_MAX_INPUT_CHARS): see server/api/openapi.py; the handler checks them
    model: str = Field(description="the backbone's name (GET /v1/backbone) or one of your task ids")
    input: str | list[str] = Field(description="a text, or 1 to RECAST_MAX_INPUTS texts")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float: JSON numbers; base64: little-endian float32 bytes"
    )
    dimensions: int | None = Field(
        default=None, description="the model's size if given (hidden_size of GET /v1/backbone)"
    )
    user: str | None = Field(default=None, description="accepted and ignored")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="the unit vector, or its float32 bytes in base64")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    responses=error_responses(400, 401, 403, 404, 413, 429, 503),
)
async def embeddings(
    body: EmbeddingsRequest, caller: PredictCaller, runtime: RuntimeDep, batcher: BatcherDep
) -> EmbeddingsResponse:
    """Unit-length sentence embeddings of 1..RECAST_MAX_INPUTS texts by the backbone or one of your tasks
    (OpenAI's embeddings API); rows in input order."""
    settings = runtime.settings
    task = await _task_of(runtime, caller, body.model)  # an unknown model is a 404 before anything else
    texts = [body.input] if isinstance(body.input, str) else body.input
    check_texts(texts, settings.max_inputs, settings.max_input_chars, field="input")
    size = runtime.backbone.hidden_size
    if body.dimensions is not None and body.dimensions != size:
        raise BadInput(
            f"dimensions must be {size} for model {body.model!r} (its embedding size) or left out; "
            f"got {body.dimensions}: this server does not shorten embeddings"
        )
    tokens = await run_in_threadpool(runtime.predictor.encode, texts)  # at the edge, off the loop
    if task is None:
        work = runtime.predictor.backbone_request(caller.tenant, texts, tokens)
    else:
        work = TaskRequest(task[0], task[1], texts, tokens, kind="embed")
    try:
        vectors = await asyncio.wait_for(batcher.embed(work), settings.request_timeout_s)
    except TimeoutError:
        raise NotReady(
            f"no answer within {settings.request_timeout_s} s; retry later", retry_after=1
        ) from None
    rows = vectors.numpy().astype("<f4", copy=False)  # (texts, H) float32, little-endian
    data = [
        Embedding(index=i, embedding=_encoded(row) if body.encoding_format == "base64" else row.tolist())
        for i, row in enumerate(rows)
    ]
    count = sum(len(ids) for ids in tokens)
    return EmbeddingsResponse(
        data=data, model=body.model, usage=Usage(prompt_tokens=count, total_tokens=count)
    )


def _encoded(row: np.ndarray) -> str:
    """The vector as OpenAI's base64 encoding: its little-endian float32 bytes."""
    return base64.b64encode(row.tobytes()).decode("ascii")


async def _task_of(runtime: Runtime, caller: Identity, model: str) -> tuple[TaskEntry, Head] | None:
    """The caller's task named `model` with its head (taken together), or None if `model` names the
    backbone; UnknownTask (404) otherwise."""
    name = runtime.backbone.name
    if model in (name, HUB_PREFIX + name):
        return None
    unknown = f"no model {model[:140]!r}: name the backbone ({name!r}) or one of your task ids"
    try:
        stored_id = stored_id_of(caller, model)
        registry = runtime.registry
        entry = registry.get(stored_id)  # this version (and its head) answers the whole request
    except (InvalidTaskId, UnknownTask):
        raise UnknownTask(unknown) from None
    head = registry.heads.get(entry.digest)
    if head is None:  # evicted under the memory budget: read back from the store, off the event loop
        resolved: tuple[TaskEntry, Head] = await run_in_threadpool(registry.resolve, stored_id)
        return resolved
    return entry, head
