"""The web console at /console: a static page over API v1 (server/console/), same API keys as the API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

CONSOLE = Path(__file__).parents[2] / "console"  # server/console/
# the page runs only its own script and talks only to this server
POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'"
)

router = APIRouter(prefix="/console", tags=["console"])


@router.get("", include_in_schema=False)
async def console() -> HTMLResponse:
    return HTMLResponse(
        (CONSOLE / "index.html").read_text(),
        headers={"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff"},
    )


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=CONSOLE), name="console-static")
