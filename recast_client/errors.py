"""The server's error vocabulary on the client side: one exception class per `error_type`."""

from __future__ import annotations

from typing import Any


class RecastClientError(Exception):
    """Base of every error the client raises; `status` and `error_type` come from the server's answer."""

    error_type = "client_error"

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        error_type: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body or {}
        if error_type is not None:
            self.error_type = error_type


class ConnectionFailed(RecastClientError):
    """The server could not be reached (refused, timed out, reset)."""

    error_type = "connection_failed"


class BadInput(RecastClientError):
    error_type = "bad_input"


class InvalidTaskId(BadInput):
    error_type = "invalid_task_id"


class Unauthorized(RecastClientError):
    error_type = "unauthorized"


class Forbidden(RecastClientError):
    error_type = "forbidden"


class UnknownTask(RecastClientError):
    error_type = "unknown_task"


class NotFound(RecastClientError):
    error_type = "not_found"


class MethodNotAllowed(RecastClientError):
    error_type = "method_not_allowed"


class VersionConflict(RecastClientError):
    error_type = "version_conflict"


class UnknownJob(RecastClientError):
    error_type = "unknown_job"


class JobFinished(RecastClientError):
    error_type = "job_finished"


class PayloadTooLarge(RecastClientError):
    error_type = "payload_too_large"


class UnsupportedMediaType(RecastClientError):
    error_type = "unsupported_media_type"


class InvalidArtifact(RecastClientError):
    """The server rejected an artifact; `reason` names the check that failed (e.g. fingerprint_mismatch)."""

    error_type = "invalid_artifact"

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", ""))


class Retryable(RecastClientError):
    """The server asked to come back later; `retry_after` is its hint in seconds (None if it gave none)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Overloaded(Retryable):
    error_type = "overloaded"


class RateLimited(Retryable):
    """The API key sent more requests than its rate limit allows."""

    error_type = "rate_limited"


class NotReady(Retryable):
    error_type = "not_ready"


class StoreUnavailable(Retryable):
    error_type = "store_unavailable"


class TaskUnavailable(Retryable):
    """The task's stored artifact failed verification; it answers again once a new version is uploaded."""

    error_type = "task_unavailable"


class ServerFailure(RecastClientError):
    """A 5xx the vocabulary does not name (a bug on the server)."""

    error_type = "internal_error"


BY_TYPE: dict[str, type[RecastClientError]] = {
    cls.error_type: cls
    for cls in (
        BadInput,
        InvalidTaskId,
        Unauthorized,
        Forbidden,
        UnknownTask,
        NotFound,
        MethodNotAllowed,
        VersionConflict,
        UnknownJob,
        JobFinished,
        PayloadTooLarge,
        UnsupportedMediaType,
        InvalidArtifact,
        TaskUnavailable,
        Overloaded,
        RateLimited,
        NotReady,
        StoreUnavailable,
        ServerFailure,
    )
}


def error_from(status: int, body: Any, retry_after: str | None) -> RecastClientError:
    """The typed exception for an error answer (`body` as parsed JSON, or anything for a non-JSON body)."""
    body = body if isinstance(body, dict) else {}
    error_type = str(body.get("error_type", "")) or ("internal_error" if status >= 500 else "client_error")
    message = str(body.get("error", "")) or f"HTTP {status}"
    cls = BY_TYPE.get(error_type, ServerFailure if status >= 500 else RecastClientError)
    if issubclass(cls, Retryable):
        hint = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
        return cls(message, retry_after=hint, status=status, error_type=error_type, body=body)
    return cls(message, status=status, error_type=error_type, body=body)
