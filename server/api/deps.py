"""What every route needs from a request: the app's state, the caller's identity, the caller's task ids."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from server.auth.identity import Identity, Need
from server.errors import BadInput
from server.ids import check_task_id, qualify


def app_state(request: Request) -> Any:
    """The AppState of the app serving `request` (server/app.py)."""
    return request.app.state.recast


def identify(request: Request, authorization: str | None, need: Need) -> Identity:
    """The caller (tenant, role, key id), also recorded for the access log; raises 400/401/403/429."""
    if len(request.headers.getlist("authorization")) > 1:
        raise BadInput("send one Authorization header, not several")
    client = request.client.host if request.client is not None else "unknown"
    identity: Identity = app_state(request).auth.identify(authorization, need, client)
    request.state.identity = identity
    return identity


def stored_id_of(identity: Identity, task_id: str) -> str:
    """The id the caller's `task_id` is stored under: tasks are private to their tenant."""
    return qualify(identity.tenant, check_task_id(task_id))
