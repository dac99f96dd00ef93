"""Per-model admission: concurrency, a bounded FIFO queue, 429 and queue time-outs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from gateway.errors import ModelUnavailable, RateLimited
from gateway.lifecycle.admission import Admission
from gateway.registry.config import Limits


def holding(admission: Admission, gate: asyncio.Event) -> Callable[[], Coroutine[Any, Any, None]]:
    """A request that holds its permit until `gate` is set."""

    async def hold() -> None:
        async with admission.permit():
            await gate.wait()

    return hold


async def test_at_most_max_concurrency_run_and_the_rest_queue_in_order() -> None:
    admission = Admission("m", Limits(max_concurrency=2, max_queue=10))
    order: list[int] = []
    gate = asyncio.Event()

    async def request(i: int) -> None:
        async with admission.permit():
            order.append(i)
            await gate.wait()

    tasks = [asyncio.create_task(request(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert order == [0, 1] and admission.running == 2 and admission.waiting == 3
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert admission.running == 0 and admission.waiting == 0


async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    admission = Admission("m", Limits(max_concurrency=1, max_queue=1))
    gate = asyncio.Event()
    hold = holding(admission, gate)

    running = [asyncio.create_task(hold()), asyncio.create_task(hold())]
    await asyncio.sleep(0.01)
    with pytest.raises(RateLimited) as refused:
        async with admission.permit():
            pass
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]
    gate.set()
    await asyncio.gather(*running)


async def test_waiting_past_the_queue_timeout_gives_503_and_frees_the_place() -> None:
    admission = Admission("m", Limits(max_concurrency=1, max_queue=5, queue_timeout_s=0.05))
    gate = asyncio.Event()
    hold = holding(admission, gate)

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    with pytest.raises(ModelUnavailable) as timed_out:
        async with admission.permit():
            pass
    assert timed_out.value.code == "queue_timeout"
    assert admission.waiting == 0
    gate.set()
    await holder
    async with admission.permit():  # the slot was not leaked
        assert admission.running == 1


async def test_a_cancelled_waiter_leaves_the_queue_without_leaking_a_slot() -> None:
    admission = Admission("m", Limits(max_concurrency=1, max_queue=5))
    gate = asyncio.Event()
    hold = holding(admission, gate)

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.sleep(0.01)
    assert admission.waiting == 0
    gate.set()
    await holder
    assert admission.running == 0


async def test_raising_max_concurrency_admits_queued_requests_at_once() -> None:
    admission = Admission("m", Limits(max_concurrency=1, max_queue=5))
    gate = asyncio.Event()
    hold = holding(admission, gate)
    tasks = [asyncio.create_task(hold()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert (admission.running, admission.waiting) == (1, 2)
    admission.update(Limits(max_concurrency=3, max_queue=5))
    await asyncio.sleep(0.01)
    assert (admission.running, admission.waiting) == (3, 0)
    gate.set()
    await asyncio.gather(*tasks)
    assert admission.running == 0


async def test_lowering_max_concurrency_lets_running_requests_finish_admitting_none_past_it() -> (
    None
):
    admission = Admission("m", Limits(max_concurrency=2, max_queue=5))
    gates = [asyncio.Event() for _ in range(3)]

    async def request(gate: asyncio.Event) -> None:
        async with admission.permit():
            await gate.wait()

    tasks = [asyncio.create_task(request(g)) for g in gates]
    await asyncio.sleep(0.01)
    admission.update(Limits(max_concurrency=1, max_queue=5))
    gates[0].set()  # one of two running ends: still one running, at the new limit
    await asyncio.sleep(0.01)
    assert (admission.running, admission.waiting) == (1, 1)
    gates[1].set()
    await asyncio.sleep(0.01)
    assert (admission.running, admission.waiting) == (1, 0)
    gates[2].set()
    await asyncio.gather(*tasks)
    assert admission.running == 0
