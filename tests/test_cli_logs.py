"""The command line's and the server's logs: JSON lines on whatever stderr is at the time."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from recast_cli.logs import configure


def test_logs_follow_stderr_and_a_closed_one_breaks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure()
        logging.getLogger("recast.test").info("one", extra={"task_id": "t"})
        first.close()  # as a test runner's capture is, once its test ends
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("recast.test").warning("two")
    finally:
        root.handlers[:], root.level = handlers, level
    record = json.loads(second.getvalue())
    assert (record["event"], record["level"], record["logger"]) == ("two", "warning", "recast.test")
    assert second.getvalue().count("\n") == 1 and "Logging error" not in second.getvalue()
