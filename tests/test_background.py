"""Background work is kept until it ends; settle waits for it and ends what is late."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.lifecycle.background import Background
from tests.fakes import others_pending


async def test_settle_waits_for_work_spawned_while_it_settles() -> None:
    background = Background()
    finished: list[str] = []

    async def second() -> None:
        await asyncio.sleep(0.01)
        finished.append("second")

    async def first() -> None:
        await asyncio.sleep(0.01)
        background.spawn(second(), "second")
        finished.append("first")

    background.spawn(first(), "first")
    await background.settle(5.0)
    assert finished == ["first", "second"] and len(background) == 0
    assert others_pending() == []


async def test_settle_cancels_work_still_running_past_its_grace() -> None:
    background = Background()
    unwound = asyncio.Event()

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            unwound.set()

    background.spawn(stuck(), "stuck")
    await background.settle(0.01)
    assert unwound.is_set() and others_pending() == []


async def test_a_failed_task_is_logged_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    background = Background()

    async def broken() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR):
        background.spawn(broken(), "stop the worker of a")
        await background.settle(1.0)
    assert "stop the worker of a failed" in caplog.text and "boom" in caplog.text
