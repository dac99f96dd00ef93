"""Work that runs on its own (stopping a worker, an idle unload), kept until it ends.

A task nobody keeps can be collected mid-flight and its failure is never seen; one nobody
awaits outlives the shutdown that should have ended it. So every such task is spawned
here, its failure is logged, and `settle` waits for all of them (cancelling, past a
bound, what is still running) before the gateway exits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)

    async def settle(self, grace_s: float) -> None:
        """Wait for every task, including those spawned meanwhile; cancel any late one."""
        while self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
