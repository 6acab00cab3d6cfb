"""The FastAPI application: `create_app(settings)`; its lifespan builds the runtime and the batcher.

Every error answers `{"error", "error_type"}` with the status fixed by its type (server/errors.py); every
request gets an id (`X-Request-ID`, taken from the client when given) that its log lines carry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from wsgiref.simple_server import WSGIServer

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import start_http_server
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server.api.middleware import BodyLimit, RequestContext, server_error_in
from server.api.oip import error_body
from server.api.openapi import install as install_openapi
from server.api.routes import embeddings, jobs, ops, predict, tasks, v2
from server.api.routes.console import install as install_console
from server.errors import (
    BadInput,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    UnsupportedMediaType,
)
from server.metrics import Metrics
from server.runtime import start_runtime
from server.serving.batcher import Batcher
from server.settings import Settings
from server.state import AppState

log = logging.getLogger("server.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    state = AppState(settings, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not state.auth.keys.enabled:
            log.warning("no API keys configured: task upload and delete need no key on this server")
        runtime = await asyncio.to_thread(start_runtime, settings, state.metrics)
        batcher = Batcher(
            runtime.predictor.predict,
            max_batch_texts=settings.max_batch_texts,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait=settings.max_wait_ms / 1000,
            max_queue_texts=settings.max_queue_texts,
            metrics=state.metrics,
        )
        batcher.start()
        # gauges of state owned elsewhere, read whenever the metrics are scraped
        state.metrics.store_up.set_function(lambda: 1.0 if runtime.store.healthy else 0.0)
        state.metrics.jobs_queued.set_function(lambda: float(runtime.jobs.queued))
        exporter = _metrics_port(settings, state.metrics)
        state.runtime, state.batcher, state.ready = runtime, batcher, True
        try:
            yield
        finally:
            state.ready = False
            if exporter is not None:
                exporter.shutdown()
            await batcher.stop()
            await asyncio.to_thread(runtime.close)
            log.info("server stopped")

    # no request body beyond what an upload or a full predict request can need (6 bytes per escaped char)
    max_body = max(settings.max_upload_bytes, settings.max_inputs * (6 * settings.max_input_chars + 8) + 1024)
    app = FastAPI(
        title="recast-serve",
        version="1",
        summary="Many tasks on one shared backbone: RECAST template banks with per-task coefficients",
        lifespan=lifespan,
    )
    app.state.recast = state
    app.router.redirect_slashes = False  # a redirect would echo the Host header; /v1/tasks/ is a typed 404
    for routes in (tasks, predict, embeddings, ops, jobs, v2):
        app.include_router(routes.router)
    install_console(app)
    install_openapi(app, settings.max_inputs, settings.max_input_chars)
    _install_error_handlers(app)
    # the body limit inside the request middleware: its 413s get a request id, a metric and a log line
    app.add_middleware(BodyLimit, max_bytes=max_body)
    app.add_middleware(RequestContext, metrics=state.metrics)
    return app


def _metrics_port(settings: Settings, metrics: Metrics) -> WSGIServer | None:
    """/metrics also on RECAST_METRICS_PORT (Prometheus scrapes it apart from the API), if set."""
    if settings.metrics_port is None:
        return None
    server, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    log.info("metrics served", extra={"host": settings.host, "port": settings.metrics_port})
    return server


def _error_response(error: ServerError, request: Request) -> JSONResponse:
    """`error` as its body (the Open Inference Protocol's `{"error"}` on /v2), status and headers."""
    body = error_body(request.url.path, error)
    return JSONResponse(body, status_code=error.status, headers=error.headers())


def _install_error_handlers(app: FastAPI) -> None:
    async def server_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServerError)
        return _error_response(exc, request)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return _error_response(BadInput(f"invalid request: {problems}"), request)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        known = server_error_in(exc)  # e.g. PayloadTooLarge raised while FastAPI read the body
        if known is not None:
            return _error_response(known, request)
        if exc.status_code == 400:
            return _error_response(BadInput(str(exc.detail)), request)
        if exc.status_code == 404:
            return _error_response(NotFound(f"no route {request.method} {request.url.path}"), request)
        if exc.status_code == 413:
            return _error_response(PayloadTooLarge("request body too large"), request)
        if exc.status_code == 405:
            not_allowed = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
            response = _error_response(not_allowed, request)
            response.headers["Allow"] = _allowed_methods(request)  # RFC 9110: a 405 names what is allowed
            return response
        return _error_response(_typed(exc.status_code, str(exc.detail)), request)

    app.add_exception_handler(ServerError, server_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


GENERIC: dict[int, type[ServerError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    503: NotReady,
}


def _typed(status: int, message: str) -> ServerError:
    """An error of the closed vocabulary for an HTTP status raised by the framework: the generic type of
    that status, else bad_input for a 4xx and internal_error for anything else."""
    if status in GENERIC:
        return GENERIC[status](message)
    return BadInput(message) if 400 <= status < 500 else ServerError(message)


def _allowed_methods(request: Request) -> str:
    """Every method some route answers on the request's path (Starlette names only the first route's)."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    )
