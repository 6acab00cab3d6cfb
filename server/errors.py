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


class BadInput(ServerError):
    error_type, status = "bad_input", 400


class InvalidTaskId(ServerError):
    error_type, status = "invalid_task_id", 400


class UnknownTask(ServerError):
    error_type, status = "unknown_task", 404


class VersionConflict(ServerError):
    error_type, status = "version_conflict", 409


class ArtifactRejected(ServerError):
    """An uploaded artifact failed validation; `reason` is the artifact error's own type."""

    error_type, status = "invalid_artifact", 422

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type, "reason": self.reason}
