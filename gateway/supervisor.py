"""Model lifecycle: which models are resident, and getting a request to a ready one.

State table (one `ModelRuntime` per registry entry):

    state      event                              next       notes
    unloaded   request / admin load               starting   one start task, all waiters share it
    starting   worker reports ready               ready
    starting   load fails / times out             failed     reason kept; retried after a backoff
    ready      idle past its keep-alive / evicted draining   only when nothing is in flight
    ready      admin unload / entry changed       draining   waits for in-flight requests
    ready      worker exits unexpectedly          unloaded   in-flight requests get 502; the next
                                                             request starts a fresh worker
    draining   in-flight requests done            unloaded   worker stopped, memory returned
    failed     backoff elapsed + request / load   starting

Requests take a `lease`: the model name resolves first (404), then the admission limiter
(429 when the queue is full, 503 after queue_timeout_s), then the model is made ready
(bounded by load_timeout_s), then the request runs with the model marked busy, so it is
never evicted or unloaded under a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from gateway.admission import Admission
from gateway.config import ModelEntry, Registry
from gateway.errors import ModelNotFound, ModelUnavailable
from gateway.events import EventBus
from gateway.launcher import Backend, Launcher, LoadFailed
from gateway.upstream import Upstream

log = logging.getLogger(__name__)

CRASH_WINDOW_S = 60.0
MAX_CRASHES = 3
BACKOFF_START_S = 2.0
BACKOFF_MAX_S = 300.0


class State(str, Enum):
    UNLOADED = "unloaded"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ModelRuntime:
    name: str
    entry: ModelEntry
    admission: Admission
    state: State = State.UNLOADED
    backend: Backend | None = None
    start_task: asyncio.Task[Backend] | None = None
    stop_task: asyncio.Task[None] | None = None
    in_flight: int = 0
    last_used: float | None = None  # wall clock, for display
    last_used_mono: float = 0.0
    keep_alive_s: float | None = None  # the latest request's wish, overriding the entry's
    load_started: float | None = None
    load_seconds: float | None = None
    progress: dict[str, Any] | None = None
    last_error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    crashes: list[float] = field(default_factory=list)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass(frozen=True)
class Lease:
    name: str
    entry: ModelEntry
    upstream: Upstream


class Supervisor:
    def __init__(
        self,
        registry: Registry,
        launcher: Launcher,
        *,
        clock: Callable[[], float] = time.monotonic,
        events: EventBus | None = None,
    ) -> None:
        self.registry = registry
        self.launcher = launcher
        self.clock = clock
        self.events = events or EventBus()
        self.models: dict[str, ModelRuntime] = {
            name: self._runtime(name, entry) for name, entry in registry.models.items()
        }
        self._closing = False

    # -- lookups ----------------------------------------------------------------------------

    def get(self, name: str) -> ModelRuntime:
        runtime = self.models.get(name)
        if runtime is None:
            valid = ", ".join(sorted(self.models)) or "(none)"
            raise ModelNotFound(
                f"model {name!r} does not exist; valid models: {valid}", param="model"
            )
        return runtime

    def default_model(self) -> str:
        name = self.registry.gateway.default_model
        if name is None:
            raise ModelNotFound("no default_model is configured; POST /<model> instead")
        return name

    # -- serving ----------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, name: str, keep_alive: float | None = None) -> AsyncIterator[Lease]:
        runtime = self.get(name)
        async with runtime.admission.permit():
            backend = await self._ready(runtime)
            runtime.in_flight += 1
            runtime.idle.clear()
            try:
                yield Lease(name, runtime.entry, backend.upstream)
            finally:
                runtime.in_flight -= 1
                runtime.last_used = time.time()
                runtime.last_used_mono = self.clock()
                if keep_alive is not None:
                    runtime.keep_alive_s = keep_alive
                if runtime.in_flight == 0:
                    runtime.idle.set()
                    self._unload_if_expired(runtime)

    async def _ready(self, runtime: ModelRuntime) -> Backend:
        if self._closing:
            raise ModelUnavailable("the gateway is shutting down", headers={"Retry-After": "5"})
        if runtime.state == State.READY and runtime.backend is not None:
            return runtime.backend
        if runtime.stop_task is not None:  # let a drain finish, then start afresh
            await asyncio.shield(runtime.stop_task)
        if runtime.state == State.FAILED and self.clock() < runtime.retry_at:
            wait = max(1, math.ceil(runtime.retry_at - self.clock()))
            raise ModelUnavailable(
                f"model {runtime.name!r} failed to load: {runtime.last_error}",
                headers={"Retry-After": str(wait)},
            )
        task = self._start(runtime)
        timeout = self.registry.gateway.load_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            raise ModelUnavailable(
                f"model {runtime.name!r} is still loading after {timeout:g}s; retry later",
                code="load_timeout",
                headers={"Retry-After": "10"},
            ) from None
        except LoadFailed as exc:
            raise ModelUnavailable(
                f"model {runtime.name!r} failed to load: {exc.message}",
                headers={"Retry-After": str(max(1, math.ceil(runtime.retry_at - self.clock())))},
            ) from None

    def _start(self, runtime: ModelRuntime) -> asyncio.Task[Backend]:
        if runtime.start_task is None or runtime.start_task.done():
            runtime.start_task = asyncio.create_task(self._load(runtime))
            runtime.start_task.add_done_callback(_consume_exception)
        return runtime.start_task

    async def _load(self, runtime: ModelRuntime) -> Backend:
        self._set_state(runtime, State.STARTING)
        runtime.load_started = time.time()
        started = self.clock()
        runtime.progress = None

        def on_progress(message: dict[str, Any]) -> None:
            runtime.progress = {k: v for k, v in message.items() if k != "event"}
            self.events.publish({"type": "progress", "model": runtime.name, **runtime.progress})

        try:
            backend = await self.launcher.launch(runtime.name, runtime.entry, on_progress)
        except LoadFailed as exc:
            self._fail(runtime, exc.message)
            raise
        except Exception as exc:
            log.exception("starting %s failed", runtime.name)
            self._fail(runtime, f"{type(exc).__name__}: {exc}")
            raise LoadFailed("launch", str(exc)) from exc
        finally:
            runtime.start_task = None
        runtime.backend = backend
        runtime.load_seconds = self.clock() - started
        runtime.failures = 0
        runtime.last_error = None
        runtime.progress = None
        self._set_state(runtime, State.READY)
        backend.exited.add_done_callback(lambda fut: self._on_exit(runtime, backend, fut))
        return backend

    def _fail(self, runtime: ModelRuntime, message: str) -> None:
        runtime.failures += 1
        runtime.last_error = message
        backoff = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (runtime.failures - 1))
        runtime.retry_at = self.clock() + backoff
        self._set_state(runtime, State.FAILED)
        log.error("model %s failed: %s", runtime.name, message)

    def _on_exit(self, runtime: ModelRuntime, backend: Backend, fut: asyncio.Future[int]) -> None:
        if runtime.backend is not backend or runtime.state in (State.DRAINING, State.UNLOADED):
            return  # a stop we asked for
        code = fut.result() if not fut.cancelled() else -1
        runtime.backend = None
        now = self.clock()
        runtime.crashes = [t for t in runtime.crashes if now - t < CRASH_WINDOW_S] + [now]
        message = f"the worker exited unexpectedly (code {code})"
        if len(runtime.crashes) >= MAX_CRASHES:
            self._fail(runtime, f"{message}; {len(runtime.crashes)} crashes in {CRASH_WINDOW_S:g}s")
        else:
            runtime.last_error = message
            self._set_state(runtime, State.UNLOADED)
            log.warning("model %s: %s; the next request starts a new worker", runtime.name, message)
        asyncio.get_running_loop().create_task(backend.stop(1.0))

    # -- explicit control -------------------------------------------------------------------

    async def load(self, name: str) -> None:
        runtime = self.get(name)
        runtime.retry_at = 0.0
        await self._ready(runtime)

    async def unload(self, name: str, *, drain_timeout: float | None = None) -> None:
        await self._stop(self.get(name), drain_timeout)

    async def _stop(self, runtime: ModelRuntime, drain_timeout: float | None = None) -> None:
        """Drain and stop the model's backend; concurrent callers share one stop."""
        if runtime.stop_task is None:
            task = asyncio.create_task(self._drain_and_stop(runtime, drain_timeout))
            runtime.stop_task = task

            def forget(done: asyncio.Task[None]) -> None:
                if runtime.stop_task is done:
                    runtime.stop_task = None

            task.add_done_callback(forget)
        await asyncio.shield(runtime.stop_task)

    async def _drain_and_stop(self, runtime: ModelRuntime, drain_timeout: float | None) -> None:
        if runtime.start_task is not None:
            runtime.start_task.cancel()
            with contextlib.suppress(BaseException):
                await runtime.start_task
        backend = runtime.backend
        if backend is None:
            if runtime.state != State.FAILED:
                self._set_state(runtime, State.UNLOADED)
            return
        self._set_state(runtime, State.DRAINING)
        timeout = self.registry.gateway.drain_timeout_s if drain_timeout is None else drain_timeout
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(runtime.idle.wait(), timeout)
        runtime.backend = None
        await backend.stop(10.0)
        runtime.keep_alive_s = None
        self._set_state(runtime, State.UNLOADED)

    def _unload_if_expired(self, runtime: ModelRuntime) -> None:
        if self._expired(runtime):
            asyncio.get_running_loop().create_task(self._stop(runtime))

    def _expired(self, runtime: ModelRuntime) -> bool:
        if runtime.state != State.READY or runtime.in_flight or runtime.entry.pinned:
            return False
        ttl = self.idle_ttl(runtime)
        return ttl is not None and self.clock() - runtime.last_used_mono >= ttl

    def idle_ttl(self, runtime: ModelRuntime) -> float | None:
        """Seconds an idle model stays loaded; None = until evicted or unloaded."""
        ttl = runtime.keep_alive_s
        if ttl is None:
            ttl = runtime.entry.idle_unload_s
        if ttl is None:
            ttl = self.registry.gateway.idle_unload_s
        return None if ttl is None or ttl < 0 else ttl

    async def reap_idle(self) -> None:
        """Unload every model idle past its keep-alive (run periodically)."""
        expired = [r for r in self.models.values() if self._expired(r)]
        await asyncio.gather(*(self._stop(r) for r in expired))

    async def run_reaper(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reap_idle()
            except Exception:
                log.exception("idle reaper failed")

    async def shutdown(self) -> None:
        self._closing = True
        await asyncio.gather(*(self._stop(r) for r in self.models.values()))

    # -- registry changes -------------------------------------------------------------------

    def _runtime(self, name: str, entry: ModelEntry) -> ModelRuntime:
        return ModelRuntime(name=name, entry=entry, admission=Admission(name, entry.limits))

    # -- reporting --------------------------------------------------------------------------

    def _set_state(self, runtime: ModelRuntime, state: State) -> None:
        if runtime.state == state:
            return
        runtime.state = state
        self.events.publish(
            {
                "type": "state",
                "model": runtime.name,
                "state": state.value,
                "error": runtime.last_error,
            }
        )

    def status(self, runtime: ModelRuntime) -> dict[str, Any]:
        backend = runtime.backend
        entry = runtime.entry
        return {
            "state": runtime.state.value,
            "devices": entry.devices,
            "adapter": entry.adapter,
            "in_flight": runtime.in_flight,
            "queued": runtime.admission.waiting,
            "last_used": runtime.last_used,
            "load_seconds": runtime.load_seconds,
            "progress": runtime.progress,
            "last_error": runtime.last_error,
            "pid": backend.pid if backend else None,
            "runtime": backend.runtime if backend else None,
            "idle_unload_s": self.idle_ttl(runtime),
            "pinned": entry.pinned,
        }


def _consume_exception(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # the waiters report it; keep asyncio from logging it as lost
