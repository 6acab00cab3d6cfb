"""The PostgreSQL store's change notifications: the JSON payload of `pg_notify` written in the transaction
of every put and delete, `{"task_id": str, "version": int, "deleted": bool}`, and read by every watcher
(which needs only the id and the version: the catalog reads that version from the store)."""

from __future__ import annotations

import json
import logging

from server.stores.base import Change

log = logging.getLogger("server.stores.postgres")  # the store's logger: its lines as they always were


def payload(task_id: str, version: int, deleted: bool) -> str:
    """The notification of a put (deleted False) or a delete that made `version` (`deleted` is read by
    no watcher now; it stays for replicas of earlier versions, which require it, during an upgrade)."""
    return json.dumps({"task_id": task_id, "version": version, "deleted": deleted})


def parse(text: str) -> Change | None:
    """The change a notification announces; None (logged) for a payload that is not one."""
    try:
        fields = json.loads(text)
        return Change(str(fields["task_id"]), int(fields["version"]))
    except (ValueError, TypeError, KeyError) as exc:
        log.warning(
            "ignoring a malformed task store notification",
            extra={"payload": text[:200], "error": str(exc)},
        )
        return None
