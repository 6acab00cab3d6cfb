"""The inference server: many tasks on one resident backbone and template bank.

Imports flow one way, each layer using only those before it:

    errors, settings, metrics, ids     the vocabulary every part shares
    stores/                            durable task artifacts and job records (directory, PostgreSQL)
    tasks/                             the resident registry, the head cache, the catalog over the store
    serving/, training/, auth/         batching and the forward; training jobs; keys, identity, rate limits
    runtime, state                     everything built at start-up; what the handlers reach
    api/                               typed dependencies, middleware, OpenAPI, routes (console/: its page)
    app                                the FastAPI application
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app (see server.app); imported lazily so `server.tasks.registry` etc. stay light."""
    from server.app import create_app as build

    return build(settings)


__all__ = ["create_app"]
