"""The API's pure ASGI middleware: every request's id, metrics and access-log line, a typed 500 for a bug
(`RequestContext`), and request bodies bounded for every endpoint with the typed 413 (`BodyLimit`).

The id is the client's `X-Request-ID` (first 64 characters) or a fresh one; it is answered in the
response's `X-Request-ID` and kept in the request state (`request.state.request_id`) for log lines. Pure
ASGI rather than Starlette's `BaseHTTPMiddleware`: that one runs every request through an extra task,
memory streams and events, which cost more per predict request than the handler itself under load.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.oip import error_body
from server.errors import PayloadTooLarge, ServerError
from server.metrics import Metrics

log = logging.getLogger("server.app")
access = logging.getLogger("server.access")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})  # others: "other"
# probes and scrapes: counted, not logged
QUIET = frozenset({"/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
REQUEST_ID = b"x-request-id"


def server_error_in(exc: BaseException) -> ServerError | None:
    """The ServerError inside `exc` (itself, a member of an exception group, or a cause), if any."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ServerError):
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)
    return None


def endpoint_of(scope: Scope, status: int) -> str:
    """The matched route's template (`/v1/tasks/{task_id}`), so metrics get no series per task id; for
    no route, `not_found` (or `method_not_allowed`): label values come from a closed set only."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    return "method_not_allowed" if status == 405 else "not_found"


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID:
            given = value.decode("latin-1")[:64]
            if given:
                return given
            break
    return uuid.uuid4().hex


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        raw_id = request_id.encode("latin-1")
        status, started = 500, False
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID]
                message = {**message, "headers": [*headers, (REQUEST_ID, raw_id)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:  # nothing can be answered any more: the server closes the connection
                log.exception("error after the response started", extra=self._where(scope, request_id))
                raise
            error = server_error_in(exc)  # e.g. a body over the limit, raised while the body streamed in
            if error is None:  # a bug: answer a typed 500 and keep serving
                log.exception("unhandled error", extra=self._where(scope, request_id))
                error = ServerError("internal error; see the server log")
            await send_error(send_with_id, error, scope["path"])
        finally:
            self._record(scope, request_id, status, time.perf_counter() - start)

    @staticmethod
    def _where(scope: Scope, request_id: str) -> dict[str, Any]:
        return {"request_id": request_id, "path": scope["path"][:256]}

    def _record(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        endpoint = endpoint_of(scope, status)
        method = scope["method"] if scope["method"] in METHODS else "other"
        self.metrics.requests.labels(endpoint, method, str(status)).inc()
        self.metrics.latency.labels(endpoint, method).observe(seconds)
        if endpoint in QUIET:
            return
        fields: dict[str, Any] = {
            "request_id": request_id,
            "method": scope["method"][:16],
            "endpoint": endpoint,
            "path": scope["path"][:256],
            "status": status,
            "ms": round(seconds * 1000, 2),
        }
        identity = scope["state"].get("identity")  # set once the key was checked
        if identity is not None:
            fields["tenant"], fields["key_id"] = identity.tenant, identity.key_id
        access.info("request", extra=fields)


async def send_error(send: Send, error: ServerError, path: str) -> None:
    """Answer `error` to a request for `path` as its JSON body (typed; the Open Inference Protocol's on
    /v2), status and headers (before any response was started)."""
    body = json.dumps(error_body(path, error)).encode()
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers().items()]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """A declared Content-Length over the limit is refused before the body is read; a chunked body is
    counted as it arrives and the read fails with PayloadTooLarge once it passes the limit (the app's
    handlers turn that into the same typed answer)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = PayloadTooLarge(
                f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}"
            )
            await send_error(send, error, scope["path"])
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)
