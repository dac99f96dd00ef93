"""Fakes at the process seam for lifecycle tests: a launcher, its backends, a clock."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.backends.launcher import LoadFailed, Progress
from gateway.backends.upstream import Upstream
from gateway.registry.config import ModelEntry


class FakeUpstream(Upstream):
    """An upstream whose health probe answers as told (`healthy`), without a network."""

    def __init__(self, label: str) -> None:
        super().__init__("http://fake", label=label)
        self.healthy = True

    async def check(self, path: str, timeout: float = 5.0) -> None:
        await self.get(path, timeout)

    async def get(self, path: str, timeout: float = 5.0) -> dict[str, Any]:
        if not self.healthy:
            raise ConnectionError(f"{self.label} does not answer")
        return {"status": "ok"}


class FakeBackend:
    def __init__(self, name: str, pid: int, weights: int, stop_delay: float = 0.0) -> None:
        self.name = name
        self.pid: int | None = pid
        self.fake_upstream = FakeUpstream(name)
        self.upstream: Upstream = self.fake_upstream
        self.probe_path: str | None = "/health"
        self.scales_itself = False
        self.runtime: dict[str, Any] = {"memory": {"weights_bytes": weights}}
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.stopped = False
        self.stopping = asyncio.Event()
        self.stop_delay = stop_delay

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._exited

    async def stop(self, grace_s: float) -> None:
        self.stopped = True
        self.stopping.set()
        await asyncio.sleep(self.stop_delay)
        if not self._exited.done():
            self._exited.set_result(0)

    def crash(self, code: int = -9) -> None:
        self._exited.set_result(code)


class FakeLauncher:
    def __init__(self) -> None:
        self.launches: list[str] = []
        self.backends: dict[str, FakeBackend] = {}
        self.fail: dict[str, str] = {}
        self.delay = 0.0
        self.delays: dict[str, float] = {}  # per model, overriding `delay`
        self.stop_delay = 0.0
        self.weights = 100

    async def launch(self, name: str, entry: ModelEntry, on_progress: Progress) -> FakeBackend:
        self.launches.append(name)
        on_progress({"event": "progress", "stage": "load", "message": "loading"})
        await asyncio.sleep(self.delays.get(name, self.delay))
        if name in self.fail:
            raise LoadFailed("load_error", self.fail[name])
        backend = FakeBackend(name, 1000 + len(self.launches), self.weights, self.stop_delay)
        self.backends[name] = backend
        return backend

    def alive(self) -> list[str]:
        return sorted(n for n, b in self.backends.items() if not b.exited.done())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def others_pending() -> list[asyncio.Task[Any]]:
    """Tasks other than the caller's that have not finished."""
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current and not t.done()]
