"""Making room: placements are planned under a lock and waited for outside it."""

from __future__ import annotations

import asyncio

from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.load import parse_registry
from tests.fakes import FakeLauncher


async def use(supervisor: Supervisor, name: str) -> None:
    async with supervisor.lease(name):
        pass


async def hold(supervisor: Supervisor, name: str) -> tuple[asyncio.Task[None], asyncio.Event]:
    """A request on `name`, in flight until the returned event is set."""
    release = asyncio.Event()
    admitted = asyncio.Event()

    async def long_request() -> None:
        async with supervisor.lease(name):
            admitted.set()
            await release.wait()

    holder = asyncio.create_task(long_request())
    await admitted.wait()
    return holder, release


async def load_waiting_for_room(supervisor: Supervisor, name: str) -> asyncio.Task[None]:
    """Start a request on `name`; return once its load waits for room."""
    with supervisor.events.subscribe() as queue:
        task = asyncio.create_task(use(supervisor, name))
        while True:
            event = await queue.get()
            if event["type"] == "progress" and event.get("stage") == "waiting":
                return task


async def test_a_load_on_another_device_does_not_wait_behind_a_load_waiting_for_room() -> None:
    text = """
gateway: {memory_budget: {cpu: 150, "0": 100}}
models:
  a: {source: /a, memory_bytes: 100}
  b: {source: /b, memory_bytes: 100}
  g: {source: /g, memory_bytes: 100, devices: [0]}
"""
    launcher = FakeLauncher()
    supervisor = Supervisor(parse_registry(text), launcher)
    holder, release = await hold(supervisor, "a")
    waiting = await load_waiting_for_room(supervisor, "b")  # needs a's room: waits for a
    await asyncio.wait_for(use(supervisor, "g"), 5.0)  # its own device has room
    assert not waiting.done() and launcher.alive() == ["a", "g"]
    release.set()
    await asyncio.gather(holder, waiting)
    assert launcher.alive() == ["b", "g"]


async def test_a_request_that_ends_while_a_victim_stops_wakes_the_waiting_load() -> None:
    text = """
gateway: {memory_budget: {cpu: 200}, load_timeout_s: 3}
models:
  x: {source: /x, memory_bytes: 100}
  y: {source: /y, memory_bytes: 100}
  big: {source: /big, memory_bytes: 200}
"""
    launcher = FakeLauncher()
    supervisor = Supervisor(parse_registry(text), launcher)
    await use(supervisor, "x")  # idle: evicted at once
    holder, release = await hold(supervisor, "y")  # busy: waited for
    launcher.backends["x"].stop_delay = 0.2
    loading = asyncio.create_task(use(supervisor, "big"))
    await launcher.backends["x"].stopping.wait()
    release.set()  # y goes idle while x is still stopping
    await holder
    await loading  # placed well within load_timeout_s, not refused for want of room
    assert launcher.alive() == ["big"]


async def test_concurrent_loads_never_claim_the_same_free_bytes() -> None:
    text = """
gateway: {memory_budget: {cpu: 150}}
models:
  a: {source: /a, memory_bytes: 100}
  b: {source: /b, memory_bytes: 100}
  c: {source: /c, memory_bytes: 100}
"""
    launcher = FakeLauncher()
    launcher.delay = 0.05
    supervisor = Supervisor(parse_registry(text), launcher)
    most = 0

    async def count() -> None:
        nonlocal most
        while True:
            most = max(most, len(launcher.alive()))
            await asyncio.sleep(0.005)

    counter = asyncio.create_task(count())
    await asyncio.gather(*(use(supervisor, n) for n in "abcabc"))
    counter.cancel()
    await asyncio.gather(counter, return_exceptions=True)
    assert most == 1 and len(launcher.alive()) == 1
