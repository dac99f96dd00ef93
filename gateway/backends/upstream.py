"""The HTTP client side of a model: its worker's unix socket, or a remote OpenAI server.

Errors are normalised: an upstream error envelope is re-raised with its status; a broken
connection (the worker died mid-request) becomes `UpstreamFailed`; nothing hangs forever.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from gateway.errors import (
    GatewayError,
    GatewayTimeout,
    UpstreamFailed,
    UpstreamUnreachable,
    from_envelope,
)


class Upstream:
    def __init__(
        self,
        base_url: str,
        *,
        uds: str | None = None,
        api_key: str | None = None,
        label: str = "the model's worker",
        max_connections: int = 256,
    ) -> None:
        transport = httpx.AsyncHTTPTransport(uds=uds, retries=0) if uds else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.label = label
        self._client = httpx.AsyncClient(
            base_url=base_url,
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(connect=10.0, read=None, write=30.0, pool=None),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def get(self, path: str, timeout: float = 5.0) -> dict[str, Any]:
        response = await self._get(path, timeout)
        return self._decode(response.status_code, response.content)

    async def check(self, path: str, timeout: float = 5.0) -> None:
        """A health or readiness check: any 200 passes, whatever its body (vLLM's is empty);
        anything else raises."""
        response = await self._get(path, timeout)
        if response.status_code != 200:
            raise self._error(response.status_code, response.content)

    async def _get(self, path: str, timeout: float) -> httpx.Response:
        try:
            return await self._client.get(path, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise GatewayTimeout(f"{self.label} did not answer {path} in {timeout:g}s") from exc
        except httpx.HTTPError as exc:
            raise self._broken(exc) from exc

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise self._broken(exc) from exc
        return self._decode(response.status_code, response.content)

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[str]]:
        """Open a streamed POST; yields an iterator over the SSE `data:` payloads."""
        request = self._client.build_request("POST", path, json=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._broken(exc) from exc
        try:
            if response.status_code != 200:
                raise self._error(response.status_code, await response.aread())
            yield self._events(response)
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _events(self, response: httpx.Response) -> AsyncIterator[str]:
        try:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    yield line[5:].strip()
        except httpx.HTTPError as exc:
            raise self._broken(exc) from exc

    def _decode(self, status: int, content: bytes) -> dict[str, Any]:
        if status != 200:
            raise self._error(status, content)
        try:
            body = json.loads(content)
        except ValueError as exc:
            raise UpstreamFailed(f"{self.label} answered with a body that is not JSON") from exc
        if not isinstance(body, dict):
            raise UpstreamFailed(f"{self.label} answered with JSON that is not an object")
        return body

    def _error(self, status: int, content: bytes) -> GatewayError:
        try:
            body: Any = json.loads(content)
        except ValueError:
            body = None
        return from_envelope(status, body)

    def _broken(self, exc: httpx.HTTPError) -> GatewayError:
        if isinstance(exc, httpx.ConnectError):
            return UpstreamUnreachable(f"{self.label} cannot be reached: {exc}")
        return UpstreamFailed(f"{self.label} stopped answering: {type(exc).__name__}")
