"""Operations: the backbone served, liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from recast_core.device import dtype_name
from server.api.deps import AppStateDep, BatcherDep, ReadCaller, RuntimeDep
from server.api.openapi import error_responses
from server.errors import StoreError

router = APIRouter(tags=["server"])


@router.get("/v1/backbone", responses=error_responses(400, 401, 403, 429, 503))
async def backbone(caller: ReadCaller, runtime: RuntimeDep) -> dict[str, Any]:
    """The backbone, bank and kernel serving; `tasks` counts the caller's tenant's tasks."""
    _, tasks = await run_in_threadpool(runtime.registry.page, "", 1, caller.tenant)
    bank = runtime.bank
    return {
        "model": runtime.backbone.name,
        "hidden_size": runtime.backbone.hidden_size,
        "family": runtime.backbone.family,
        "pooling": runtime.backbone.pooling,
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


@router.get("/healthz")
@router.head("/healthz", operation_id="healthz_head")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(400, 503))
@router.head("/readyz", responses=error_responses(400, 503), operation_id="readyz_head")
async def readyz(
    runtime: RuntimeDep,
    batcher: BatcherDep,
    strict: Annotated[bool, Query(description="also answer 503 while the task store is unreachable")] = False,
) -> dict[str, Any]:
    """Readiness: backbone, bank and tasks loaded, batcher running (503 `not_ready` otherwise).

    While the task store is unreachable or catching up, the replica still answers predictions for its
    resident tasks (uploads and deletes answer 503 `store_unavailable`), so it stays ready with
    `"status": "degraded"`; with `strict=true` it answers 503 `store_unavailable` instead. Taking every
    replica out of a load balancer because a shared database is down would stop predictions as well."""
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


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: AppStateDep) -> Response:
    text = await run_in_threadpool(generate_latest, state.metrics.registry)  # off the event loop
    return Response(text, media_type=CONTENT_TYPE_LATEST)
