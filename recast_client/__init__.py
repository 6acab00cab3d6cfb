"""Python client for a recast-serve server (sync and async); typed errors mirror the server's vocabulary."""

from __future__ import annotations

from recast_client.client import AsyncClient, Client
from recast_client.errors import (
    BadInput,
    ConnectionFailed,
    Forbidden,
    InvalidArtifact,
    NotReady,
    Overloaded,
    RateLimited,
    RecastClientError,
    Retryable,
    Unauthorized,
    UnknownTask,
    VersionConflict,
)

__all__ = [
    "AsyncClient",
    "BadInput",
    "Client",
    "ConnectionFailed",
    "Forbidden",
    "InvalidArtifact",
    "NotReady",
    "Overloaded",
    "RateLimited",
    "RecastClientError",
    "Retryable",
    "Unauthorized",
    "UnknownTask",
    "VersionConflict",
]
