"""Draining and stopping a model's backend: one shared stop per model at a time.

A stop cancels a load under way (its waiters decide what they answer), waits up to the
drain time-out for the model's requests to finish, then stops the backend and returns its
memory. Every stop is a task kept in `Background`, so shutdown waits for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from gateway.lifecycle.background import Background
from gateway.lifecycle.runtime import ModelRuntime, State
from gateway.registry.config import GatewaySettings

STOP_GRACE_S = 10.0  # from SIGTERM to SIGKILL for a worker that is stopped


class Stopper:
    def __init__(
        self,
        settings: Callable[[], GatewaySettings],
        set_state: Callable[[ModelRuntime, State], None],
        background: Background,
    ) -> None:
        self.settings = settings
        self.set_state = set_state
        self.background = background

    async def stop(self, runtime: ModelRuntime, drain_timeout: float | None = None) -> None:
        """Drain and stop the model's backend; concurrent callers share one stop."""
        await asyncio.shield(self.stopping(runtime, drain_timeout))

    def stopping(
        self, runtime: ModelRuntime, drain_timeout: float | None = None
    ) -> asyncio.Task[None]:
        """The model's stop task, started unless one is under way."""
        if runtime.stop_task is None:
            work = self._drain_and_stop(runtime, drain_timeout)
            task = self.background.spawn(work, f"stop {runtime.name}")
            runtime.stop_task = task

            def forget(done: asyncio.Task[None]) -> None:
                if runtime.stop_task is done:
                    runtime.stop_task = None

            task.add_done_callback(forget)
        return runtime.stop_task

    async def _drain_and_stop(self, runtime: ModelRuntime, drain_timeout: float | None) -> None:
        if runtime.start_task is not None:
            runtime.start_task.cancel()
            await asyncio.wait({runtime.start_task})  # its waiters decide what they answer
        backend = runtime.backend
        if backend is None:
            if runtime.state != State.FAILED:
                self.set_state(runtime, State.UNLOADED)
            return
        self.set_state(runtime, State.DRAINING)
        timeout = self.settings().drain_timeout_s if drain_timeout is None else drain_timeout
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(runtime.idle.wait(), timeout)
        runtime.backend = None
        await backend.stop(STOP_GRACE_S)
        runtime.keep_alive_s = None
        runtime.footprint = {}
        self.set_state(runtime, State.UNLOADED)
