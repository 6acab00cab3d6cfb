"""The server's closed error vocabulary: every error answers `{"error": message, "error_type": type}`."""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the API reports; `status` is the fixed HTTP status of `error_type`."""

    error_type = "internal_error"
    status = 500

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(max(1, round(self.retry_after)))}


class BadInput(ServerError):
    error_type, status = "bad_input", 400


class InvalidTaskId(ServerError):
    error_type, status = "invalid_task_id", 400


class UnknownTask(ServerError):
    error_type, status = "unknown_task", 404


class VersionConflict(ServerError):
    error_type, status = "version_conflict", 409


class UnknownJob(ServerError):
    error_type, status = "unknown_job", 404


class JobFinished(ServerError):
    """A job that already ended cannot be cancelled."""

    error_type, status = "job_finished", 409


class ArtifactRejected(ServerError):
    """An uploaded artifact failed validation; `reason` is the artifact error's own type."""

    error_type, status = "invalid_artifact", 422

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type, "reason": self.reason}


class Unauthorized(ServerError):
    """No or malformed credentials (answered with `WWW-Authenticate: Bearer`)."""

    error_type, status = "unauthorized", 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServerError):
    """Credentials were given but are not valid."""

    error_type, status = "forbidden", 403


class NotFound(ServerError):
    """No such route."""

    error_type, status = "not_found", 404


class MethodNotAllowed(ServerError):
    error_type, status = "method_not_allowed", 405


class PayloadTooLarge(ServerError):
    error_type, status = "payload_too_large", 413


class UnsupportedMediaType(ServerError):
    error_type, status = "unsupported_media_type", 415


class Overloaded(ServerError):
    """The request queue is full: retry after `retry_after` seconds."""

    error_type, status = "overloaded", 429


class RateLimited(ServerError):
    """The API key spent its request budget: retry after `retry_after` seconds."""

    error_type, status = "rate_limited", 429


class NotReady(ServerError):
    """The server is starting or stopping: retry after `retry_after` seconds."""

    error_type, status = "not_ready", 503


class TaskUnavailable(ServerError):
    """The task exists but cannot be served now (e.g. its stored artifact is corrupt at rest)."""

    error_type, status = "task_unavailable", 503


class StoreError(ServerError):
    """The durable store failed; nothing was changed."""

    error_type, status = "store_unavailable", 503
