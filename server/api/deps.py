"""What the handlers need from a request, as typed FastAPI dependencies.

    state: AppStateDep            the app's state (settings, metrics, authenticator)
    runtime: RuntimeDep           the runtime, once the server is ready (503 `not_ready` before and after)
    batcher: BatcherDep           the batcher, likewise
    caller: AdminCaller           the caller's identity for uploads, deletes, training and cancels,
            PredictCaller         for predictions,
            ReadCaller            for reading (401/403/429 as server/auth/identity.py decides)
    expected: ExpectedVersion     the task version `If-Match` names (None: no condition)

The caller dependencies read the `Authorization` header (documented as the header parameter it always
was) and record the identity for the access log. Dependencies run in the order a handler declares them
(the caller first, then the runtime) and before the handler validates its own parameters and body.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from server.auth.identity import Identity, Need
from server.errors import BadInput
from server.ids import check_task_id, qualify
from server.runtime import Runtime
from server.serving.batcher import Batcher
from server.state import AppState

IF_MATCH_PATTERN = r'^(W/)?"?[0-9]{1,18}"?$'


def app_state(request: Request) -> AppState:
    """The AppState of the app serving `request` (server/app.py)."""
    state = request.app.state.recast
    assert isinstance(state, AppState)
    return state


def ready_runtime(state: Annotated[AppState, Depends(app_state)]) -> Runtime:
    return state.require()[0]


def ready_batcher(state: Annotated[AppState, Depends(app_state)]) -> Batcher:
    return state.require()[1]


def caller(need: Need) -> Callable[..., Identity]:
    """The dependency on the caller's identity for an action that needs `need`."""

    def identify(request: Request, authorization: Annotated[str | None, Header()] = None) -> Identity:
        """The caller (tenant, role, key id), also recorded for the access log; raises 400/401/403/429."""
        if len(request.headers.getlist("authorization")) > 1:
            raise BadInput("send one Authorization header, not several")
        client = request.client.host if request.client is not None else "unknown"
        identity = app_state(request).auth.identify(authorization, need, client)
        request.state.identity = identity
        return identity

    return identify


def expected_version(
    if_match: Annotated[
        str | None,
        Header(
            pattern=IF_MATCH_PATTERN,
            description='the task version the change applies to: `3` or `"3"` (the ETag); `0`: only if the '
            "task does not exist",
        ),
    ] = None,
) -> int | None:
    """`If-Match: 3` or `If-Match: "3"` (the ETag we send); 0 means the task must not exist yet."""
    if if_match is None:
        return None
    text = if_match.strip().removeprefix("W/").strip('"')
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise BadInput(f"If-Match must be a task version number, got {if_match[:40]!r}")
    return int(text)


def stored_id_of(identity: Identity, task_id: str) -> str:
    """The id the caller's `task_id` is stored under: tasks are private to their tenant."""
    return qualify(identity.tenant, check_task_id(task_id))


AppStateDep = Annotated[AppState, Depends(app_state)]
RuntimeDep = Annotated[Runtime, Depends(ready_runtime)]
BatcherDep = Annotated[Batcher, Depends(ready_batcher)]
AdminCaller = Annotated[Identity, Depends(caller("admin"))]
PredictCaller = Annotated[Identity, Depends(caller("predict"))]
ReadCaller = Annotated[Identity, Depends(caller("read"))]
ExpectedVersion = Annotated[int | None, Depends(expected_version)]
