"""uvicorn, configured the way the server runs: one place for the CLI and the tests.

uvicorn's h11 protocol has a keep-alive timeout between requests but none while a request's headers
arrive, so a client that sends half a request line and then waits holds its connection forever
(slowloris). `HeaderTimeoutProtocol` closes a connection whose request headers are not complete within
`header_timeout` seconds of the connection opening or of the previous response ending.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.settings import Settings


class HeaderTimeoutProtocol(H11Protocol):
    header_timeout = 10.0  # seconds; set per server by server_config

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            if self._header_timer is None:
                self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        idle = self.cycle is None or self.cycle.response_complete
        return idle and self.conn.their_state is h11.IDLE

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn config of `app`: our protocol with its header timeout, no uvicorn logging setup."""
    protocol = type("ServerProtocol", (HeaderTimeoutProtocol,), {"header_timeout": settings.header_timeout_s})
    values: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 30,
        "http": protocol,
        # the asyncio loop and no WebSocket protocol whatever else is installed: uvicorn's "auto" would
        # switch to uvloop and the websockets library where a client package (kserve) pulled them in
        "loop": "asyncio",
        "ws": "none",
        "lifespan": "on",
    }
    return uvicorn.Config(app, **(values | overrides))
