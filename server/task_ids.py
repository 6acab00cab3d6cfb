"""Task ids: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` (safe as a file name, a URL segment and a SQL value)."""

from __future__ import annotations

import re

from server.errors import InvalidTaskId

TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_task_id(task_id: str) -> str:
    if not TASK_ID.fullmatch(task_id):
        raise InvalidTaskId(
            f"task id {task_id[:140]!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}} (1-128 characters)"
        )
    return task_id


def is_task_id(name: str) -> bool:
    return TASK_ID.fullmatch(name) is not None
