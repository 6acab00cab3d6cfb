"""Run the real app under a real uvicorn server on a free loopback port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn

from recast_core.artifact import TaskArtifact
from recast_core.bank import TemplateBank
from server import create_app
from server.api.http_protocol import server_config
from server.auth.keys import create_key
from server.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(settings: Settings, start_timeout: float = 600.0) -> Iterator[str]:
    """Start create_app(settings) on 127.0.0.1; yields the base URL; stops the server on exit.

    The first start in a fresh checkout also compiles the CPU kernel (minutes on a busy machine)."""
    port = free_port()
    config = server_config(create_app(settings), settings, host="127.0.0.1", port=port)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server exited during start-up (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start within {start_timeout} s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def task_artifact(
    bank: TemplateBank, seed: int, labels: tuple[str, ...] = ("negative", "positive"), hidden: int = 384
) -> TaskArtifact:
    """A valid artifact for `bank`: coefficients near the bank's own, a random head."""
    gen = torch.Generator().manual_seed(seed)
    base = bank.base_coefficients.mean(dim=1).to(torch.float32)
    return TaskArtifact(
        coefficients=base + 0.05 * torch.randn(base.shape, generator=gen),
        head_weight=torch.randn(len(labels), hidden, generator=gen),
        head_bias=torch.randn(len(labels), generator=gen),
        labels=labels,
        bank_fingerprint=bank.fingerprint,
        training={"seed": seed},
    )


def training_settings(bank_dir: Path, store: Path, api_keys: str, **overrides: Any) -> Settings:
    """Settings whose training jobs use both cores at normal priority: the tests wait for the jobs."""
    values: dict[str, Any] = {
        "bank": bank_dir,
        "store": str(store),
        "api_keys": api_keys,
        "threads": 2,
        "train_threads": 2,
        "train_nice": 0,
        "train_idle_priority": False,
    }
    return Settings(**(values | overrides))


def two_tenants_keys(path: Path) -> dict[str, str]:
    """Keys written to the keys file `path`: team-a's admin and predict keys and team-b's admin key."""
    return {
        "a_admin": create_key(path, "team-a", "admin")[0],
        "a_predict": create_key(path, "team-a", "predict")[0],
        "b_admin": create_key(path, "team-b", "admin")[0],
    }
