"""`unless_disconnected`: 499 only when the client really left; its tasks never outlive it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from gateway.errors import ClientClosed, GatewayError
from gateway.http import unless_disconnected
from tests.fakes import others_pending


def request(leaves: asyncio.Event) -> Request:
    """A request whose body has been read; `http.disconnect` arrives once `leaves` is set."""

    async def receive() -> dict[str, Any]:
        await leaves.wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


async def test_work_cancelled_inside_the_gateway_is_not_reported_as_a_client_disconnect() -> None:
    async def cancelled_from_inside() -> None:
        raise asyncio.CancelledError

    with pytest.raises(GatewayError) as raised:
        await unless_disconnected(request(asyncio.Event()), cancelled_from_inside())
    assert not isinstance(raised.value, ClientClosed)
    assert raised.value.status == 503 and raised.value.headers["Retry-After"]
    assert others_pending() == []


async def test_a_client_that_leaves_gets_499_after_its_work_has_unwound() -> None:
    leaves = asyncio.Event()
    unwound: list[str] = []

    async def work() -> None:
        try:
            leaves.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself awaits, like giving a lease back
            unwound.append("done")

    with pytest.raises(ClientClosed):
        await unless_disconnected(request(leaves), work())
    assert unwound == ["done"]
    assert others_pending() == []


async def test_finished_work_leaves_no_disconnect_watcher_behind() -> None:
    async def work() -> int:
        return 7

    assert await unless_disconnected(request(asyncio.Event()), work()) == 7
    assert others_pending() == []


async def test_a_cancelled_caller_cancels_its_work_and_waits_for_it() -> None:
    started, unwound = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)
            unwound.set()

    caller = asyncio.create_task(unless_disconnected(request(asyncio.Event()), work()))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert unwound.is_set()
    assert others_pending() == []
