"""An httpx transport over a Serve handle: the gateway's `Upstream` speaks to a model's
replicas as it speaks to a local worker, so every rule of the relay holds unchanged.

Serve picks the replica (the least loaded of two), streams the reply back item by item,
and cancels the replica's relay when the stream is closed. A replica lost before or
during its reply is a broken connection (502); every replica's queue being full is a
429 with Retry-After.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from gateway.errors import RateLimited

# Serve errors that mean "this replica is gone": the request is lost, the model is not.
_LOST = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError")


class _Body(httpx.AsyncByteStream):
    def __init__(self, items: Any) -> None:
        self._items = items

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._items:
                yield chunk
        except Exception as exc:
            raise httpx.ReadError(_why(exc)) from exc

    async def aclose(self) -> None:
        self._items.cancel()  # the replica stops relaying, and its worker aborts the request


class HandleTransport(httpx.AsyncBaseTransport):
    def __init__(self, handle: Any, on_replica: Callable[[Any], None] | None = None) -> None:
        self._relay = handle.options(stream=True, method_name="relay")
        self._on_replica = on_replica

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        from ray.serve.exceptions import BackPressureError

        body = await request.aread()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        items = self._relay.remote(request.method, request.url.raw_path.decode(), headers, body)
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
            raise
        if self._on_replica is not None:
            self._on_replica(replica)
        return httpx.Response(status, headers=reply_headers, stream=_Body(items), request=request)


def _why(exc: BaseException) -> str:
    kind = type(exc).__name__
    if kind in _LOST or any(t.__name__ in _LOST for t in type(exc).__mro__):
        return "the replica serving the request was lost"
    return f"the replica failed: {kind}"
