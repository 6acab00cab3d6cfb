"""Task ids and tenants, and the stored id that names a tenant's task in the registry and the stores.

A task id is `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` (safe as a file name, a URL segment and a SQL value); a
tenant is `[a-z0-9][a-z0-9-]{0,62}`. The default tenant's tasks are stored under their bare task id (so
stores written before tenants existed keep working); another tenant's task is stored as `tenant~task_id`.
`~` is in neither alphabet, so stored ids of different tenants never collide.
"""

from __future__ import annotations

import re

from server.errors import BadInput, InvalidTaskId

TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEFAULT_TENANT = "default"
SEPARATOR = "~"
STORED_ID = re.compile(rf"(?:{TENANT.pattern}{SEPARATOR})?{TASK_ID.pattern}")


def check_task_id(task_id: str) -> str:
    if not TASK_ID.fullmatch(task_id):
        raise InvalidTaskId(
            f"task id {task_id[:140]!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}} (1-128 characters)"
        )
    return task_id


def check_tenant(tenant: str) -> str:
    if not TENANT.fullmatch(tenant):
        raise BadInput(f"tenant {tenant[:80]!r} must match [a-z0-9][a-z0-9-]{{0,62}}")
    return tenant


def qualify(tenant: str, task_id: str) -> str:
    """The stored id of `task_id` owned by `tenant`."""
    check_task_id(task_id)
    if tenant == DEFAULT_TENANT:
        return task_id
    return f"{check_tenant(tenant)}{SEPARATOR}{task_id}"


def split_stored_id(stored_id: str) -> tuple[str, str]:
    """(tenant, task_id) of a stored id."""
    tenant, sep, task_id = stored_id.partition(SEPARATOR)
    return (tenant, task_id) if sep else (DEFAULT_TENANT, stored_id)


def check_stored_id(stored_id: str) -> str:
    if not STORED_ID.fullmatch(stored_id):
        raise InvalidTaskId(f"{stored_id[:200]!r} is not a task id, optionally qualified as tenant~task_id")
    return stored_id


def is_stored_id(name: str) -> bool:
    return STORED_ID.fullmatch(name) is not None
