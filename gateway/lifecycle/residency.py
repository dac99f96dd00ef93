"""Making room: a load that does not fit its devices' memory budgets evicts idle models,
least recently used first, waits for busy ones to finish, and is refused when it could
never fit. Loads are placed one at a time, so two loads never claim the same free bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from gateway.backends.launcher import LoadFailed
from gateway.lifecycle import budget
from gateway.lifecycle.events import EventBus
from gateway.lifecycle.runtime import ModelRuntime
from gateway.registry import hub
from gateway.registry.config import GatewaySettings, ModelEntry

log = logging.getLogger(__name__)


class Changes:
    """A broadcast 'something changed' (a state, a request ending) to wake waiters.

    Each change bumps `version`. A waiter reads the version when it checks its predicate
    and waits for a change after that version, so a change that happens between the check
    and the wait is never missed.
    """

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, since: int, timeout: float) -> bool:
        """Wait for a change after version `since`; False if none came within `timeout`."""
        if self.version != since:
            return True
        try:
            await asyncio.wait_for(self._event.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            return False
        return True


class Residency:
    def __init__(
        self,
        settings: Callable[[], GatewaySettings],
        runtimes: Callable[[], Iterable[ModelRuntime]],
        stop: Callable[[ModelRuntime], Awaitable[None]],
        changes: Changes,
        events: EventBus,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.runtimes = runtimes
        self.stop = stop
        self.changes = changes
        self.events = events
        self.clock = clock
        self._lock = asyncio.Lock()  # held only to plan and reserve, never across a wait

    async def make_room(
        self, runtime: ModelRuntime, on_progress: Callable[[dict[str, Any]], None]
    ) -> None:
        """Reserve the model's memory (its estimate) before it loads; raise LoadFailed.

        Each round plans under the lock (and reserves when the model fits), then stops
        idle victims or waits for busy ones outside it, so other placements, on other
        devices or after a change, go ahead meanwhile; then it plans again.
        """
        settings = self.settings()
        # Off the event loop: sizing vLLM's share of the GPUs runs nvidia-smi.
        runtime.estimate = await asyncio.to_thread(
            budget.estimate, runtime.entry, self._local_path(runtime.entry)
        )
        deadline = self.clock() + settings.load_timeout_s
        while True:
            seen = self.changes.version
            async with self._lock:
                plan, victims = self._plan(runtime, settings)
                if not plan.evict and not plan.blocked_by:
                    runtime.footprint = dict(runtime.estimate)
                    return
            if victims:
                await self._evict(runtime, victims)
                continue  # the stops changed the picture: plan again at once
            busy = ", ".join(plan.blocked_by)
            on_progress(
                {"stage": "waiting", "message": f"waiting for {busy} to finish, to make room"}
            )
            if not await self.changes.wait(seen, deadline - self.clock()):
                raise LoadFailed(
                    "no_room",
                    f"no room on its devices while {busy} "
                    f"{'is' if len(plan.blocked_by) == 1 else 'are'} busy "
                    f"(waited {settings.load_timeout_s:.0f}s)",
                )

    def _plan(
        self, runtime: ModelRuntime, settings: GatewaySettings
    ) -> tuple[budget.Plan, list[ModelRuntime]]:
        """What stands in the way of `runtime`, and the idle models to evict for it."""
        others = [r for r in self.runtimes() if r is not runtime and r.footprint]
        residents = [
            budget.Resident(r.name, r.footprint, r.busy, r.entry.pinned, r.last_used_mono)
            for r in others
        ]
        plan = budget.plan(runtime.estimate, settings.memory_budget, residents)
        if plan.too_big is not None:
            raise LoadFailed("too_big", plan.too_big.message(runtime.name))
        return plan, [r for r in others if r.name in plan.evict]

    async def _evict(self, runtime: ModelRuntime, victims: list[ModelRuntime]) -> None:
        for victim in victims:
            log.info("evicting %s to make room for %s", victim.name, runtime.name)
            self.events.publish({"type": "evict", "model": victim.name, "for": runtime.name})
        await asyncio.gather(*(self.stop(victim) for victim in victims))

    def _local_path(self, entry: ModelEntry) -> Path | None:
        if entry.source is None:
            return None
        return hub.locate(entry, entry.source, Path(self.settings().cache_dir))
