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

from gateway.backends.launcher import Backend
from gateway.lifecycle.runtime import ModelRuntime, State
from gateway.registry.config import GatewaySettings

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
        # Failed probes in a row, per worker: a replacement starts from zero, and workers
        # no longer ready are forgotten at the next round.
        self.failures: dict[Backend, int] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings().probe_interval_s)
            await self.probe_all()

    async def probe_all(self) -> None:
        probed = [(r, r.backend) for r in self.runtimes() if r.state == State.READY and r.backend]
        results = await asyncio.gather(*(self._probe(b) for _, b in probed if b is not None))
        failures: dict[Backend, int] = {}
        for (runtime, backend), ok in zip(probed, results, strict=True):
            if backend is None or runtime.backend is not backend:
                continue  # replaced while it was probed: the verdict is about a gone worker
            count = 0 if ok else self.failures.get(backend, 0) + 1
            if count < self.settings().probe_failures:
                failures[backend] = count
                continue
            log.error("the worker of %s stopped answering its health probe", runtime.name)
            await self.replace(runtime, "the worker stopped answering its health probe")
        self.failures = failures

    async def _probe(self, backend: Backend) -> bool:
        if backend.probe_path is None:
            return True
        try:
            await backend.upstream.check(
                backend.probe_path, timeout=self.settings().probe_interval_s
            )
        except Exception as exc:
            log.warning("health probe of %s failed: %s", backend.upstream.label, exc)
            return False
        return True
