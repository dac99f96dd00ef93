"""The HTTP client side of a model: its worker's unix socket, or a remote OpenAI server.

Errors are normalised: an upstream error envelope is re-raised with its status; a broken
connection (the worker died mid-request) becomes `UpstreamFailed`; nothing hangs forever.
What an upstream sends is read in pieces and bounded: a reply body past `MAX_REPLY_BYTES`,
or one SSE line past `MAX_SSE_LINE_BYTES`, fails the request (502) rather than the gateway.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx

from gateway.errors import (
    GatewayError,
    GatewayTimeout,
    UpstreamFailed,
    UpstreamUnreachable,
    from_envelope,
)

# The most a non-stream reply (or an error body) may hold, and one line of a stream.
MAX_REPLY_BYTES = 64 * 1024 * 1024
MAX_SSE_LINE_BYTES = 16 * 1024 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")


class Upstream:
    def __init__(
        self,
        base_url: str,
        *,
        uds: str | None = None,
        api_key: str | None = None,
        label: str = "the model's worker",
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if uds:
            transport = httpx.AsyncHTTPTransport(uds=uds, retries=0)
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
        status, content = await self._get(path, timeout)
        return self._decode(status, content)

    async def check(self, path: str, timeout: float = 5.0) -> None:
        """A health or readiness check: any 200 passes, whatever its body (vLLM's is empty);
        anything else raises."""
        status, content = await self._get(path, timeout)
        if status != 200:
            raise self._error(status, content)

    async def _get(self, path: str, timeout: float) -> tuple[int, bytes]:
        try:
            return await self._exchange(self._client.build_request("GET", path, timeout=timeout))
        except httpx.TimeoutException as exc:
            raise GatewayTimeout(f"{self.label} did not answer {path} in {timeout:g}s") from exc
        except httpx.HTTPError as exc:
            raise self._broken(exc) from exc

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            status, content = await self._exchange(
                self._client.build_request("POST", path, json=body)
            )
        except httpx.HTTPError as exc:
            raise self._broken(exc) from exc
        return self._decode(status, content)

    async def _exchange(self, request: httpx.Request) -> tuple[int, bytes]:
        """Send a request and read its whole reply (at most `MAX_REPLY_BYTES`)."""
        response = await self._client.send(request, stream=True)
        try:
            return response.status_code, await self._read(response)
        finally:
            await response.aclose()

    async def _read(self, response: httpx.Response) -> bytes:
        """A reply's body, read in pieces: one past `MAX_REPLY_BYTES` is refused as soon as
        it says so (Content-Length) or grows past it, without holding the rest."""
        too_big = UpstreamFailed(
            f"{self.label} answered HTTP {response.status_code} with a body larger than "
            f"{MAX_REPLY_BYTES} bytes"
        )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
            raise too_big
        body = bytearray()
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) > MAX_REPLY_BYTES:
                raise too_big
        return bytes(body)

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
                try:
                    content = await self._read(response)
                except httpx.HTTPError as exc:
                    raise self._broken(exc) from exc
                raise self._error(response.status_code, content)
            kind = response.headers.get("content-type", "")
            if kind.split(";")[0].strip().lower() != "text/event-stream":
                shown = kind or "no Content-Type"
                raise UpstreamFailed(
                    f"{self.label} answered a stream request with {shown}, not an event stream"
                )
            yield self._events(response)
        finally:
            await response.aclose()

    @asynccontextmanager
    async def exchange(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[httpx.Response]:
        """A raw exchange, its reply unread: a cluster replica relays it as it comes."""
        request = self._client.build_request(method, path, headers=headers, content=body)
        response = await self._client.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _events(self, response: httpx.Response) -> AsyncIterator[str]:
        """The `data:` payloads of an SSE body, up to and including `[DONE]`: nothing after
        it is read (an upstream may hold the connection open past its answer)."""
        async with aclosing(self._lines(response)) as lines:
            async for line in lines:
                if line.startswith("data:"):
                    data = line[5:].strip()
                    yield data
                    if data == "[DONE]":
                        return

    async def _lines(self, response: httpx.Response) -> AsyncGenerator[str, None]:
        """The lines of a body (ended by CRLF, LF or CR, as SSE allows), each at most
        `MAX_SSE_LINE_BYTES`: a longer one is refused before it is all held."""
        pending = bytearray()
        after_cr = False  # the last piece ended in CR: a LF opening the next one belongs to it
        try:
            async for piece in response.aiter_bytes():
                if after_cr and piece.startswith(b"\n"):
                    piece = piece[1:]
                after_cr = piece.endswith(b"\r")
                start = 0
                for end in _LINE_END.finditer(piece):
                    pending += piece[start : end.start()]
                    self._check_line(pending)
                    yield pending.decode("utf-8", "replace")
                    pending.clear()
                    start = end.end()
                pending += piece[start:]
                self._check_line(pending)
        except httpx.HTTPError as exc:
            raise self._broken(exc) from exc
        if pending:
            yield pending.decode("utf-8", "replace")

    def _check_line(self, line: bytearray) -> None:
        if len(line) > MAX_SSE_LINE_BYTES:
            raise UpstreamFailed(
                f"{self.label} sent a stream line longer than {MAX_SSE_LINE_BYTES} bytes"
            )

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
        return from_envelope(status, body, self.label)

    def _broken(self, exc: httpx.HTTPError) -> GatewayError:
        if isinstance(exc, httpx.ConnectError):
            return UpstreamUnreachable(f"{self.label} cannot be reached: {exc}")
        return UpstreamFailed(f"{self.label} stopped answering: {type(exc).__name__}")
