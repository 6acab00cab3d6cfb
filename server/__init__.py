"""The inference server: many tasks on one resident backbone and template bank."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app (see server.app); imported lazily so `server.registry` etc. stay light."""
    from server.app import create_app as build

    return build(settings)


__all__ = ["create_app"]
