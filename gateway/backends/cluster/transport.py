"""An httpx transport over a Serve handle: the gateway's `Upstream` speaks to a model's
replicas as it speaks to a local worker, so every rule of the relay holds unchanged.

Serve picks the replica (the least loaded of two), streams the reply back item by item,
and cancels the replica's relay when the stream is closed. A replica lost before or
during its reply is a broken connection (502); every replica's queue being full is a
429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from gateway.errors import RateLimited

# Serve errors that mean "this replica is gone": the request is lost, the model is not.
_LOST = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError")


class _Body(httpx.AsyncByteStream):
    def __init__(self, items: Any, transport: HandleTransport) -> None:
        self._items = items
        self._transport = transport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._items:
                yield chunk
        except Exception as exc:
            raise httpx.ReadError(_why(exc)) from exc
        except asyncio.CancelledError:
            self._transport.raise_if_closed_under_it()
            raise

    async def aclose(self) -> None:
        self._items.cancel()  # the replica stops relaying, and its worker aborts the request


class HandleTransport(httpx.AsyncBaseTransport):
    def __init__(self, handle: Any, on_replica: Callable[[Any], None] | None = None) -> None:
        self._relay = handle.options(stream=True, method_name="relay")
        self._on_replica = on_replica
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()  # exchanges not yet closed
        self._closed = False

    async def aclose(self) -> None:
        """The model's application is gone: a request still waiting on it (queued for a
        replica that will never come) would wait for its time-out, so each is cancelled
        and ends as a broken connection, 502."""
        self._closed = True
        for items in list(self._open):
            items.cancel()

    def raise_if_closed_under_it(self) -> None:
        """Serve's cancel surfaces as CancelledError in the request's task: unless that
        task is itself being cancelled (the client left), it was `aclose`."""
        task = asyncio.current_task()
        if self._closed and task is not None and not task.cancelling():
            raise httpx.ReadError("the model's application was deleted under the request")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        from ray.serve.exceptions import BackPressureError

        body = await request.aread()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        items = self._relay.remote(request.method, request.url.raw_path.decode(), headers, body)
        self._open.add(items)
        try:
            status, reply_headers, replica = await items.__anext__()
        except BackPressureError as exc:
            items.cancel()
            raise RateLimited(
                f"every replica's queue is full ({exc}); retry", headers={"Retry-After": "1"}
            ) from None
        except StopAsyncIteration:
            raise httpx.RemoteProtocolError(
                "the replica closed the exchange without a reply"
            ) from None
        except Exception as exc:
            items.cancel()
            raise httpx.ReadError(_why(exc)) from exc
        except BaseException:
            # The client left (or request_timeout_s passed) before the reply began: a
            # dropped handle does not cancel, so the replica would generate to the end.
            items.cancel()
            self.raise_if_closed_under_it()
            raise
        if self._on_replica is not None:
            self._on_replica(replica)
        body_stream = _Body(items, self)
        return httpx.Response(status, headers=reply_headers, stream=body_stream, request=request)


def _why(exc: BaseException) -> str:
    kind = type(exc).__name__
    if kind in _LOST or any(t.__name__ in _LOST for t in type(exc).__mro__):
        return "the replica serving the request was lost"
    return f"the replica failed: {kind}"
