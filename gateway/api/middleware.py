"""ASGI middleware that must see requests before any route does.

Each takes its setting as a callable read once per request, so a reload of the registry
applies to the next request without rebuilding the middleware stack (which Starlette
builds once, at the first request).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, PayloadTooLarge


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413, by Content-Length or while streaming in."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        too_large = PayloadTooLarge(f"the request body exceeds {limit} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error(send, too_large)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as exc:
            if not started:
                await send_error(send, exc)


class LiveCORS:
    """CORS for the origins in force: Starlette's CORSMiddleware fixes its origins when it is
    built, so one is built again whenever the configured list changes (none when empty)."""

    def __init__(self, app: ASGIApp, origins: Callable[[], Sequence[str]]) -> None:
        self.app = app
        self.origins = origins
        self._built: tuple[tuple[str, ...], ASGIApp] = ((), app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origins = tuple(self.origins())
        if origins != self._built[0]:
            self._built = (origins, self._cors(origins))
        await self._built[1](scope, receive, send)

    def _cors(self, origins: tuple[str, ...]) -> ASGIApp:
        if not origins:
            return self.app
        return CORSMiddleware(
            self.app,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )


async def send_error(send: Send, error: GatewayError) -> None:
    body = json.dumps(error.envelope()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
