"""HTTP clients for a recast-serve server: `Client` (sync) and `AsyncClient`, same methods, over httpx.

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        client.upload("spam", Path("spam.safetensors"))
        client.predict("spam", ["WINNER! claim your prize"])["outputs"][0]["label"]

Errors raise the typed exceptions of `recast_client.errors`. Answers 429 and 503 are retried with
exponential backoff (honouring Retry-After, at most `max_backoff` seconds a wait) up to `retries` times;
nothing else is retried, so an upload is never stored twice by the client.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from recast_client.errors import ConnectionFailed, RecastClientError, Retryable, error_from

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class _Call:
    """One API call, independent of sync or async transport."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _artifact_bytes(artifact: bytes | Path | str) -> bytes:
    return artifact if isinstance(artifact, bytes) else Path(artifact).read_bytes()


def _upload(task_id: str, artifact: bytes | Path | str, if_match: int | None) -> _Call:
    headers = {"Content-Type": "application/octet-stream"}
    if if_match is not None:
        headers["If-Match"] = str(if_match)
    return _Call("PUT", f"/v1/tasks/{task_id}", content=_artifact_bytes(artifact), headers=headers)


def _delete(task_id: str, if_match: int | None) -> _Call:
    return _Call(
        "DELETE", f"/v1/tasks/{task_id}", headers={} if if_match is None else {"If-Match": str(if_match)}
    )


def _train(
    task_id: str, data: Path | str | Sequence[Mapping[str, Any]], options: Mapping[str, Any] | None
) -> _Call:
    """A CSV file (path) or examples `[{"text", "label"}]`; options as in the API (`epochs`, ...)."""
    if isinstance(data, Path | str):
        params = {k: v for k, v in (options or {}).items() if k in ("epochs", "max_length", "seed")}
        if set(options or {}) - set(params):
            raise ValueError(
                "with a CSV file, only epochs, max_length and seed can be set; send examples instead"
            )
        content = Path(data).read_bytes()
        return _Call(
            "POST",
            f"/v1/tasks/{task_id}/train",
            content=content,
            params=params,
            headers={"Content-Type": "text/csv"},
        )
    body = {"examples": [dict(e) for e in data], "options": dict(options or {})}
    return _Call("POST", f"/v1/tasks/{task_id}/train", json=body)


FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
DEFAULT_LIMITS = {"max_inputs": 256, "max_input_chars": 4096}  # a server's defaults


def _limits(schema: Any) -> dict[str, int]:
    """What a server's OpenAPI schema says a predict request may hold: `max_inputs` texts of at most
    `max_input_chars` characters (the server defaults where it says nothing)."""
    try:
        inputs = schema["components"]["schemas"]["PredictRequest"]["properties"]["inputs"]
        found = {"max_inputs": inputs.get("maxItems"), "max_input_chars": inputs["items"].get("maxLength")}
    except (KeyError, TypeError, AttributeError):
        found = {}
    limits = dict(DEFAULT_LIMITS)
    for name, value in found.items():
        if isinstance(value, int) and value >= 1:
            limits[name] = value
    return limits


def _result(response: httpx.Response) -> Any:
    if response.status_code < 400:
        return response.json()
    try:
        body = response.json()
    except ValueError:
        body = None
    raise error_from(response.status_code, body, response.headers.get("retry-after"))


class _Base:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
    ) -> None:
        self.url = (url or os.environ.get("RECAST_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("RECAST_API_KEY") or None
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self._headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait(self, attempt: int, error: Retryable) -> float:
        hint = error.retry_after if error.retry_after is not None else 0.0
        jitter = random.uniform(0, self.backoff * 2**attempt)
        return float(min(self.max_backoff, max(hint, jitter)))


class Client(_Base):
    """Synchronous client; use as a context manager or call `close()`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any) -> None:
        super().__init__(url, api_key, **options)
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, headers=self._headers)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> Any:
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(
                    call.method, call.path, json=call.json, content=call.content, params=call.params,
                    headers=call.headers,
                )  # fmt: skip
                return _result(response)
            except Retryable as error:
                if attempt == self.retries:
                    raise
                time.sleep(self._wait(attempt, error))
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"cannot reach {self.url}: {exc}") from None
        raise RecastClientError("unreachable")  # pragma: no cover

    def predict(self, task_id: str, texts: Sequence[str]) -> dict[str, Any]:
        result: dict[str, Any] = self._send(
            _Call("POST", f"/v1/tasks/{task_id}/predict", json={"inputs": list(texts)})
        )
        return result

    def upload(
        self, task_id: str, artifact: bytes | Path | str, *, if_match: int | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = self._send(_upload(task_id, artifact, if_match))
        return result

    def get_task(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._send(_Call("GET", f"/v1/tasks/{task_id}"))
        return result

    def delete(self, task_id: str, *, if_match: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._send(_delete(task_id, if_match))
        return result

    def list_tasks(self, *, after: str = "", limit: int = 100) -> dict[str, Any]:
        result: dict[str, Any] = self._send(
            _Call("GET", "/v1/tasks", params={"after": after, "limit": limit})
        )
        return result

    def iter_tasks(self, page_size: int = 500) -> Iterator[dict[str, Any]]:
        after: str | None = ""
        while after is not None:
            page = self.list_tasks(after=after, limit=page_size)
            yield from page["tasks"]
            after = page["next"]

    def train(
        self,
        task_id: str,
        data: Path | str | Sequence[Mapping[str, Any]],
        *,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start a training job (a CSV file, or examples `[{"text", "label"}]`); returns the queued job."""
        result: dict[str, Any] = self._send(_train(task_id, data, options))
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._send(_Call("GET", f"/v1/jobs/{job_id}"))
        return result

    def list_jobs(self, *, limit: int = 50) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._send(_Call("GET", "/v1/jobs", params={"limit": limit}))["jobs"]
        return result

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._send(_Call("DELETE", f"/v1/jobs/{job_id}"))
        return result

    def wait_for_job(self, job_id: str, *, timeout: float | None = None, poll: float = 1.0) -> dict[str, Any]:
        """Poll until the job ends (succeeded, failed or cancelled); TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["state"] in FINAL_JOB_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)

    def backbone(self) -> dict[str, Any]:
        result: dict[str, Any] = self._send(_Call("GET", "/v1/backbone"))
        return result

    def predict_limits(self) -> dict[str, int]:
        """`max_inputs` (texts per predict request) and `max_input_chars` (characters per text)."""
        return _limits(self._send(_Call("GET", "/openapi.json")))

    def ready(self) -> bool:
        try:
            self._send(_Call("GET", "/readyz"))
        except (Retryable, ConnectionFailed):
            return False
        return True


class AsyncClient(_Base):
    """Asynchronous client (httpx.AsyncClient); use `async with` or `await close()`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any) -> None:
        super().__init__(url, api_key, **options)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, headers=self._headers)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.json, content=call.content, params=call.params,
                    headers=call.headers,
                )  # fmt: skip
                return _result(response)
            except Retryable as error:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(self._wait(attempt, error))
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"cannot reach {self.url}: {exc}") from None
        raise RecastClientError("unreachable")  # pragma: no cover

    async def predict(self, task_id: str, texts: Sequence[str]) -> dict[str, Any]:
        call = _Call("POST", f"/v1/tasks/{task_id}/predict", json={"inputs": list(texts)})
        result: dict[str, Any] = await self._send(call)
        return result

    async def upload(
        self, task_id: str, artifact: bytes | Path | str, *, if_match: int | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._send(_upload(task_id, artifact, if_match))
        return result

    async def get_task(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._send(_Call("GET", f"/v1/tasks/{task_id}"))
        return result

    async def delete(self, task_id: str, *, if_match: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._send(_delete(task_id, if_match))
        return result

    async def list_tasks(self, *, after: str = "", limit: int = 100) -> dict[str, Any]:
        call = _Call("GET", "/v1/tasks", params={"after": after, "limit": limit})
        result: dict[str, Any] = await self._send(call)
        return result

    async def iter_tasks(self, page_size: int = 500) -> AsyncIterator[dict[str, Any]]:
        after: str | None = ""
        while after is not None:
            page = await self.list_tasks(after=after, limit=page_size)
            for task in page["tasks"]:
                yield task
            after = page["next"]

    async def train(
        self,
        task_id: str,
        data: Path | str | Sequence[Mapping[str, Any]],
        *,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start a training job (a CSV file, or examples `[{"text", "label"}]`); returns the queued job."""
        result: dict[str, Any] = await self._send(_train(task_id, data, options))
        return result

    async def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._send(_Call("GET", f"/v1/jobs/{job_id}"))
        return result

    async def list_jobs(self, *, limit: int = 50) -> list[dict[str, Any]]:
        page = await self._send(_Call("GET", "/v1/jobs", params={"limit": limit}))
        result: list[dict[str, Any]] = page["jobs"]
        return result

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._send(_Call("DELETE", f"/v1/jobs/{job_id}"))
        return result

    async def wait_for_job(
        self, job_id: str, *, timeout: float | None = None, poll: float = 1.0
    ) -> dict[str, Any]:
        """Poll until the job ends (succeeded, failed or cancelled); TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get_job(job_id)
            if job["state"] in FINAL_JOB_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            await asyncio.sleep(poll)

    async def backbone(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._send(_Call("GET", "/v1/backbone"))
        return result

    async def predict_limits(self) -> dict[str, int]:
        """`max_inputs` (texts per predict request) and `max_input_chars` (characters per text)."""
        return _limits(await self._send(_Call("GET", "/openapi.json")))

    async def ready(self) -> bool:
        try:
            await self._send(_Call("GET", "/readyz"))
        except (Retryable, ConnectionFailed):
            return False
        return True
