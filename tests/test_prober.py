"""Health probes: strikes are counted per worker, and only against the worker probed."""

from __future__ import annotations

import asyncio

from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.load import parse_registry
from tests.fakes import FakeLauncher

TEXT = "gateway: {probe_failures: 3}\nmodels: {a: {source: /a}}"


async def use(supervisor: Supervisor, name: str) -> None:
    async with supervisor.lease(name):
        pass


async def test_three_failed_probes_in_a_row_replace_the_worker() -> None:
    launcher = FakeLauncher()
    supervisor = Supervisor(parse_registry(TEXT), launcher)
    await use(supervisor, "a")
    first = launcher.backends["a"]
    first.fake_upstream.healthy = False
    for _ in range(3):
        await supervisor.prober.probe_all()
    assert first.stopped and supervisor.get("a").state == "unloaded"


async def test_a_new_worker_does_not_inherit_the_failed_probes_of_the_one_it_replaced() -> None:
    launcher = FakeLauncher()
    supervisor = Supervisor(parse_registry(TEXT), launcher)
    await use(supervisor, "a")
    first = launcher.backends["a"]
    first.fake_upstream.healthy = False
    for _ in range(2):
        await supervisor.prober.probe_all()
    first.crash()  # replaced for another reason before the third strike
    await asyncio.sleep(0)
    await use(supervisor, "a")
    second = launcher.backends["a"]
    assert second is not first
    second.fake_upstream.healthy = False
    await supervisor.prober.probe_all()  # its first failure, not its third
    assert not second.stopped and supervisor.get("a").state == "ready"
    await supervisor.shutdown()
