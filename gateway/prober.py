"""Health probes: a worker that stops answering is taken out of service and replaced.

Every `probe_interval_s` each ready local worker gets `GET /health` (with the interval as
its time-out). A worker that fails `probe_failures` probes in a row, because it is frozen,
its event loop is stuck or its generation has stalled, is stopped; its in-flight requests
get 502 and the next request starts a fresh worker. Remote upstreams are not probed: they
are not ours to restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from gateway.config import GatewaySettings
from gateway.runtime import ModelRuntime, State

log = logging.getLogger(__name__)


class Prober:
    def __init__(
        self,
        settings: Callable[[], GatewaySettings],
        runtimes: Callable[[], Iterable[ModelRuntime]],
        replace: Callable[[ModelRuntime, str], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.runtimes = runtimes
        self.replace = replace
        self.failures: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings().probe_interval_s)
            await self.probe_all()

    async def probe_all(self) -> None:
        ready = [r for r in self.runtimes() if r.state == State.READY and r.backend]
        results = await asyncio.gather(*(self._probe(r) for r in ready))
        for runtime, ok in zip(ready, results, strict=True):
            count = 0 if ok else self.failures.get(runtime.name, 0) + 1
            self.failures[runtime.name] = count
            if count >= self.settings().probe_failures:
                self.failures[runtime.name] = 0
                log.error("the worker of %s stopped answering its health probe", runtime.name)
                await self.replace(runtime, "the worker stopped answering its health probe")

    async def _probe(self, runtime: ModelRuntime) -> bool:
        backend = runtime.backend
        if backend is None or backend.pid is None:
            return True
        try:
            await backend.upstream.get("/health", timeout=self.settings().probe_interval_s)
        except Exception as exc:
            log.warning("health probe of %s failed: %s", runtime.name, exc)
            return False
        return True
