"""What the OpenAPI schema promises, kept true: typed error bodies, no FastAPI 422, the task id pattern.

Each route lists the statuses it can answer with (`responses=error_responses(...)`); each status documents
the body `{"error", "error_type"[, "reason"]}` with the error types that status carries, taken from the
closed vocabulary in server/errors.py, and the headers that always come with it. FastAPI's generic
422 "Validation Error" is removed from the schema: invalid requests are answered with 400 `bad_input`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from server.errors import ServerError
from server.ids import TASK_ID

DESCRIPTIONS = {
    400: "bad input, or an invalid task id",
    401: "no API key, or a malformed Authorization header",
    403: "the API key is not valid, or its role may not do this",
    404: "no such task (or no such route)",
    409: "version conflict (If-Match)",
    413: "request body too large",
    415: "the artifact was not sent as application/octet-stream",
    422: "invalid artifact; `reason` names the check that failed",
    429: "overloaded, or the API key's rate limit reached; retry after Retry-After seconds",
    503: "not ready, or the task store unavailable; retry later",
}
RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
HEADERS: dict[int, dict[str, dict[str, Any]]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": RETRY_AFTER | {"required": True}},
    503: {"Retry-After": RETRY_AFTER},
}


def error_types(status: int) -> list[str]:
    """The error types answered with `status` (every ServerError subclass with that status)."""
    found, pending = set(), list(ServerError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.status == status:
            found.add(cls.error_type)
    return sorted(found)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can answer with these error statuses."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        types = error_types(status)
        if not types:
            raise ValueError(f"no error type of server/errors.py answers with status {status}")
        properties: dict[str, Any] = {
            "error": {"type": "string", "description": "what went wrong"},
            "error_type": {"type": "string", "enum": types},
        }
        required = ["error", "error_type"]
        if status == 422:
            properties["reason"] = {"type": "string", "description": "the artifact check that failed"}
            required.append("reason")
        schema = {"title": f"Error{status}", "type": "object", "properties": properties, "required": required}
        response: dict[str, Any] = {
            "description": DESCRIPTIONS[status],
            "content": {"application/json": {"schema": schema}},
        }
        if status in HEADERS:
            response["headers"] = HEADERS[status]
        responses[status] = response
    return responses


def install(app: FastAPI, max_inputs: int, max_input_chars: int) -> None:
    """Serve the schema as the server behaves: FastAPI's 422 removed, task ids with their pattern, predict
    and embeddings inputs bounded by this server's limits."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _as_served(generate(), max_inputs, max_input_chars)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _as_served(schema: dict[str, Any], max_inputs: int, max_input_chars: int) -> None:
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses", {})
            ref = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if ref.get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            for parameter in operation.get("parameters", []):
                _not_nullable(parameter)
                if parameter.get("in") == "path" and parameter.get("name") == "task_id":
                    parameter["schema"] = parameter.get("schema", {}) | {"pattern": f"^{TASK_ID.pattern}$"}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    inputs = components.get("PredictRequest", {}).get("properties", {}).get("inputs")
    if inputs is not None:
        inputs |= {"minItems": 1, "maxItems": max_inputs}
        inputs["items"] = inputs.get("items", {}) | {"maxLength": max_input_chars}
    embedded = components.get("EmbeddingsRequest", {}).get("properties", {}).get("input", {})
    for option in embedded.get("anyOf", []):  # one text, or a list of texts
        if option.get("type") == "string":
            option["maxLength"] = max_input_chars
        elif option.get("type") == "array":
            option |= {"minItems": 1, "maxItems": max_inputs}
            option["items"] = option.get("items", {}) | {"maxLength": max_input_chars}


def _not_nullable(parameter: dict[str, Any]) -> None:
    """An optional header or query parameter is absent or a string, never JSON null: FastAPI's
    `anyOf: [{...}, {"type": "null"}]` for `str | None` becomes the non-null schema."""
    schema = parameter.get("schema", {})
    options = schema.get("anyOf")
    if isinstance(options, list):
        kept = [option for option in options if option.get("type") != "null"]
        if len(kept) == 1:
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            parameter["schema"] = kept[0] | rest
