"""Model lifecycle: which models are resident, and getting each request to a ready one.

State table (one `ModelRuntime` per registry entry):

    state      event                                  next       notes
    unloaded   request / admin load                   starting   one start task; waiters share it
    starting   worker reports ready                   ready
    starting   load fails, or can never fit           failed     reason kept; retry after backoff
    starting   must wait for busy models, times out   unloaded   503 with Retry-After
    ready      idle past keep-alive / evicted         draining   only when nothing is in flight
    ready      admin unload, entry changed or removed draining   waits for in-flight requests
    any        only per-request fields changed        (same)     the model is kept; the next
                                                                 request reads the new entry
    ready      entry changed, on a cluster            ready      replicas roll over in place;
                                                                 a failed update: failed
    ready      worker exits unexpectedly              unloaded   in-flight requests get 502;
                                                                 the next starts a fresh worker
    draining   in-flight requests done                unloaded   worker stopped, memory returned
    failed     backoff elapsed + request / load       starting

A request takes a `lease`: the name resolves first (404), then admission (429 when the
queue is full, 503 after queue_timeout_s), then the model is made ready (bounded by
load_timeout_s), then the request runs with the model marked busy: a busy model is never
evicted or unloaded under a request. Placements are planned one at a time: a load that
does not fit its devices' budgets evicts least-recently-used idle models, waits for busy
ones to drain, and is refused when it could never fit (gateway/lifecycle/residency.py).

A load counts as a use (the idle clock starts when it is ready). A load cancelled under
its waiters tells them why: a reload that changed the entry makes them wait for the new
entry's load; the model's removal answers 404; an unload or shutdown answers 503 with
Retry-After. A model keeps one runtime, one admission and one set of counts across
reloads, so a drain accounts for every request admitted before a reload.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.launcher import Backend, Launcher, LoadFailed, UpdatesInPlace
from gateway.errors import BadRequest, ModelNotFound, ModelUnavailable, UpstreamFailed
from gateway.lifecycle import budget
from gateway.lifecycle.admission import Admission
from gateway.lifecycle.background import Background
from gateway.lifecycle.events import EventBus
from gateway.lifecycle.prober import Prober
from gateway.lifecycle.residency import Changes, Residency
from gateway.lifecycle.runtime import Lease, ModelRuntime, State, describe
from gateway.lifecycle.stopper import Stopper
from gateway.registry.changes import restart_needed
from gateway.registry.config import ModelEntry, Registry

log = logging.getLogger(__name__)

CRASH_WINDOW_S = 60.0
MAX_CRASHES = 3
BACKOFF_START_S = 2.0
BACKOFF_MAX_S = 300.0
SHUTDOWN_GRACE_S = 15.0  # background stops are bounded (10 s grace): then they are cancelled
TRANSIENT = frozenset({"no_room"})  # load failures that say nothing about the model itself


@dataclass(frozen=True)
class ReloadReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    # Of `changed`: those whose change the gateway applies per request, the model kept.
    retuned: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


class Supervisor:
    def __init__(
        self,
        registry: Registry,
        launcher: Launcher,
        *,
        clock: Callable[[], float] = time.monotonic,
        events: EventBus | None = None,
        cluster: bool = False,
    ) -> None:
        self.registry = registry
        self.cluster = cluster  # the cluster places models: no budgets, no idle unloads here
        self.launcher = launcher
        self.clock = clock
        self.events = events or EventBus()
        self.models: dict[str, ModelRuntime] = {
            name: self._runtime(name, entry) for name, entry in registry.models.items()
        }
        self._retiring: set[ModelRuntime] = set()
        self._changes = Changes()
        self._background = Background()
        self.stopper = Stopper(lambda: self.registry.gateway, self._set_state, self._background)
        self.residency = Residency(
            lambda: self.registry.gateway,
            self._all_runtimes,
            self.stopper.stop,
            self._changes,
            self.events,
            clock,
        )
        self.prober = Prober(
            lambda: self.registry.gateway, lambda: self.models.values(), self.take_out_of_service
        )
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

    def status(self, runtime: ModelRuntime) -> dict[str, Any]:
        return describe(runtime, self.idle_ttl(runtime))

    # -- serving ----------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, name: str, keep_alive: float | None = None) -> AsyncIterator[Lease]:
        runtime = self.get(name)
        if keep_alive is not None and self.cluster:
            raise BadRequest(
                "keep_alive is not taken on a cluster, where replicas scale on the model's "
                "idle_unload_s; set that in models.yaml",
                param="keep_alive",
            )
        try:
            async with runtime.admission.permit():
                backend = await self._ready(runtime)
                runtime.in_flight += 1
                runtime.idle.clear()
                try:
                    yield Lease(name, runtime.entry, backend.upstream)
                except UpstreamFailed:
                    # The connection broke: if the process is going, let its exit be handled
                    # before this error is answered, so the next request starts a fresh worker.
                    # (A cluster replica lost is not the model's exit: the others serve on.)
                    if not backend.scales_itself:
                        await asyncio.wait({backend.exited}, timeout=1.0)
                    raise
                finally:
                    self._release(runtime, keep_alive)
        finally:
            self._changes.notify()  # after the permit is back: drains and placements re-check

    def _release(self, runtime: ModelRuntime, keep_alive: float | None) -> None:
        runtime.in_flight -= 1
        runtime.last_used = time.time()
        runtime.last_used_mono = self.clock()
        if keep_alive is not None:
            runtime.keep_alive_s = keep_alive
        if runtime.in_flight == 0:
            runtime.idle.set()
            self._unload_if_expired(runtime)

    async def _ready(self, runtime: ModelRuntime) -> Backend:
        """The model's backend, started if need be, within `load_timeout_s`.

        A load cancelled under its waiters decides what they get: a reload that changed
        the entry means waiting for the new entry's load; the model's removal, 404; an
        unload or shutdown, 503 to retry.
        """
        loop = asyncio.get_running_loop()
        timeout = self.registry.gateway.load_timeout_s
        deadline = loop.time() + timeout
        while True:
            self._check_serving(runtime)
            stopping = runtime.stop_task
            if stopping is not None and not stopping.done():  # let a drain finish first
                await asyncio.wait({stopping})
                continue
            if runtime.state == State.READY and runtime.backend is not None:
                return runtime.backend
            if runtime.state == State.FAILED and self.clock() < runtime.retry_at:
                raise ModelUnavailable(
                    f"model {runtime.name!r} failed to load: {runtime.last_error}",
                    headers={"Retry-After": self._retry_after(runtime)},
                )
            epoch = runtime.epoch
            task = self._start(runtime)
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                raise self._still_loading(runtime, timeout)
            if not task.cancelled():
                return self._outcome(runtime, task)
            self._check_serving(runtime)
            if runtime.epoch == epoch:
                raise ModelUnavailable(
                    f"model {runtime.name!r} was unloaded while it loaded; retry to load it",
                    headers={"Retry-After": "1"},
                )
            # The entry changed under the load (not only per request): wait for the new load.

    def _check_serving(self, runtime: ModelRuntime) -> None:
        """Raise unless the gateway serves this runtime: closing is 503, removed is 404."""
        if self._closing:
            raise ModelUnavailable("the gateway is shutting down", headers={"Retry-After": "5"})
        current = self.models.get(runtime.name)
        if current is None:
            raise ModelNotFound(f"model {runtime.name!r} was removed", param="model")
        if current is not runtime:
            raise ModelUnavailable(
                f"model {runtime.name!r} was removed and added back; retry",
                headers={"Retry-After": "1"},
            )

    def _still_loading(self, runtime: ModelRuntime, timeout: float) -> ModelUnavailable:
        doing = f" ({runtime.progress['message']})" if runtime.progress else ""
        return ModelUnavailable(
            f"model {runtime.name!r} is still loading after {timeout:g}s{doing}; retry later",
            code="load_timeout",
            headers={"Retry-After": "10"},
        )

    def _outcome(self, runtime: ModelRuntime, task: asyncio.Task[Backend]) -> Backend:
        try:
            return task.result()
        except LoadFailed as exc:
            raise ModelUnavailable(
                _about(runtime.name, exc.message),
                code=exc.kind if exc.kind in ("no_room", "too_big") else "model_unavailable",
                headers={"Retry-After": self._retry_after(runtime)},
            ) from None

    def _retry_after(self, runtime: ModelRuntime) -> str:
        return str(max(1, math.ceil(runtime.retry_at - self.clock())))

    def _start(self, runtime: ModelRuntime) -> asyncio.Task[Backend]:
        if runtime.start_task is None or runtime.start_task.done():
            runtime.start_task = asyncio.create_task(self._load(runtime))
            runtime.start_task.add_done_callback(_consume_exception)
        return runtime.start_task

    async def _load(self, runtime: ModelRuntime) -> Backend:
        self._set_state(runtime, State.STARTING)
        runtime.progress = None
        started = self.clock()
        try:
            if not self.cluster:
                await self.residency.make_room(runtime, lambda m: self._on_progress(runtime, m))
            backend = await self.launcher.launch(
                runtime.name, runtime.entry, lambda m: self._on_progress(runtime, m)
            )
        except LoadFailed as exc:
            self._fail(runtime, exc)
            raise
        except asyncio.CancelledError:
            runtime.footprint = {}
            self._set_state(runtime, State.UNLOADED)
            raise
        except Exception as exc:
            log.exception("starting %s failed", runtime.name)
            failure = LoadFailed("launch", f"{type(exc).__name__}: {exc}")
            self._fail(runtime, failure)
            raise failure from exc
        finally:
            runtime.start_task = None
        runtime.backend = backend
        runtime.last_used = time.time()  # a load counts as a use: it is not idle since boot
        runtime.last_used_mono = self.clock()
        runtime.load_seconds = self.clock() - started
        runtime.failures = 0
        runtime.last_error = None
        runtime.progress = None
        memory = backend.runtime.get("memory")
        footprint = budget.measured(runtime.entry, memory) or runtime.estimate
        runtime.footprint = {} if self.cluster else footprint  # a cluster holds its own
        self._set_state(runtime, State.READY)
        backend.exited.add_done_callback(lambda fut: self._on_exit(runtime, backend, fut))
        return backend

    def _on_progress(self, runtime: ModelRuntime, message: dict[str, Any]) -> None:
        runtime.progress = {k: v for k, v in message.items() if k != "event"}
        self.events.publish({"type": "progress", "model": runtime.name, **runtime.progress})

    def _fail(self, runtime: ModelRuntime, failure: LoadFailed) -> None:
        runtime.footprint = {}
        runtime.last_error = failure.message
        if failure.kind in TRANSIENT:
            runtime.retry_at = 0.0
            self._set_state(runtime, State.UNLOADED)
            return
        runtime.failures += 1
        backoff = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (runtime.failures - 1))
        runtime.retry_at = self.clock() + backoff
        self._set_state(runtime, State.FAILED)
        log.error("model %s failed: %s", runtime.name, failure.message)

    def _on_exit(self, runtime: ModelRuntime, backend: Backend, fut: asyncio.Future[int]) -> None:
        if runtime.backend is not backend or runtime.state != State.READY:
            return  # a stop we asked for
        code = fut.result() if not fut.cancelled() else -1
        self._lost(runtime, f"the worker exited unexpectedly (code {code})")
        self._background.spawn(backend.stop(1.0), f"stop the exited worker of {runtime.name}")

    def _lost(self, runtime: ModelRuntime, message: str) -> None:
        """The worker is gone or useless: count it as a crash and take it out of service."""
        runtime.backend = None
        runtime.footprint = {}
        now = self.clock()
        runtime.crashes = [t for t in runtime.crashes if now - t < CRASH_WINDOW_S] + [now]
        if len(runtime.crashes) >= MAX_CRASHES:
            crashes = f"{message}; {len(runtime.crashes)} crashes in {CRASH_WINDOW_S:g}s"
            self._fail(runtime, LoadFailed("crashed", crashes))
        else:
            runtime.last_error = message
            self._set_state(runtime, State.UNLOADED)
            log.warning("model %s: %s; the next request starts a new worker", runtime.name, message)

    def _all_runtimes(self) -> list[ModelRuntime]:
        return [*self.models.values(), *self._retiring]

    # -- explicit control -------------------------------------------------------------------

    async def load(self, name: str) -> None:
        runtime = self.get(name)
        runtime.retry_at = 0.0
        await self._ready(runtime)

    async def unload(self, name: str, *, drain_timeout: float | None = None) -> None:
        await self.stopper.stop(self.get(name), drain_timeout)

    # -- idle unload ------------------------------------------------------------------------

    def _unload_if_expired(self, runtime: ModelRuntime) -> None:
        if self._expired(runtime):
            self.stopper.stopping(runtime)

    def _expired(self, runtime: ModelRuntime) -> bool:
        if runtime.state != State.READY or runtime.in_flight or runtime.entry.pinned:
            return False
        if runtime.backend is not None and runtime.backend.scales_itself:
            return False  # its replicas scale to zero on the cluster's own clock
        ttl = self.idle_ttl(runtime)
        return ttl is not None and self.clock() - runtime.last_used_mono >= ttl

    def idle_ttl(self, runtime: ModelRuntime) -> float | None:
        """Seconds an idle model stays loaded; None = until evicted or unloaded."""
        ttl = runtime.keep_alive_s
        if ttl is None:
            return self.entry_idle_s(runtime.entry)
        return None if ttl < 0 else ttl

    def entry_idle_s(self, entry: ModelEntry) -> float | None:
        """The idle time the registry gives a model (its own, else the gateway's)."""
        ttl = entry.idle_unload_s
        if ttl is None:
            ttl = self.registry.gateway.idle_unload_s
        return None if ttl is None or ttl < 0 else ttl

    async def reap_idle(self) -> None:
        """Unload every model idle past its keep-alive (run periodically)."""
        expired = [r for r in self.models.values() if self._expired(r)]
        await asyncio.gather(*(self.stopper.stop(r) for r in expired))

    async def run_reaper(self, interval_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reap_idle()
            except Exception:
                log.exception("idle reaper failed")

    # -- registry changes -------------------------------------------------------------------

    def apply(self, registry: Registry) -> ReloadReport:
        """Switch to a new registry: add, retire and restart models; keep the unchanged."""
        report = ReloadReport()
        old = self.models
        idle_before = {name: self.entry_idle_s(r.entry) for name, r in old.items()}
        self.registry = registry
        models: dict[str, ModelRuntime] = {}
        for name, entry in registry.models.items():
            runtime = old.get(name)
            # On a cluster the idle time is an option of the model's deployment, and a model
            # without its own takes the gateway's: a new one must reach Serve.
            idle_moved = (
                self.cluster
                and runtime is not None
                and self.entry_idle_s(entry) != idle_before[name]
            )
            if runtime is None:
                models[name] = self._runtime(name, entry)
                report.added.append(name)
            elif runtime.entry == entry and not idle_moved:
                models[name] = runtime
                report.unchanged.append(name)
            elif not idle_moved and not restart_needed(runtime.entry, entry, cluster=self.cluster):
                runtime.admission.update(entry.limits)
                runtime.entry = entry
                models[name] = runtime
                report.changed.append(name)
                report.retuned.append(name)
            else:
                models[name] = self._replace_entry(runtime, entry)
                report.changed.append(name)
        for name, runtime in old.items():
            if name not in registry.models:
                report.removed.append(name)
                self._retire(runtime)
        self.models = models
        self.events.publish({"type": "reload", **report.__dict__})
        return report

    def _replace_entry(self, runtime: ModelRuntime, entry: ModelEntry) -> ModelRuntime:
        runtime.admission.update(entry.limits)  # in place: admitted requests stay counted
        runtime.entry = entry
        runtime.epoch += 1
        runtime.retry_at = 0.0  # a new entry deserves a fresh try
        if runtime.state == State.FAILED:
            self._set_state(runtime, State.UNLOADED)
        backend = runtime.backend
        if (
            runtime.state == State.READY
            and runtime.stop_task is None
            and isinstance(backend, UpdatesInPlace)
        ):
            self._update_in_place(runtime, backend)
            return runtime
        if runtime.backend is not None or runtime.start_task is not None:
            # New requests wait for this drain (stop_task), then start the new entry.
            self.stopper.stopping(runtime)
        return runtime

    def _update_in_place(self, runtime: ModelRuntime, backend: UpdatesInPlace) -> None:
        """Roll a cluster model's replicas over to its new entry while the old ones serve."""
        if runtime.update_task is not None:
            runtime.update_task.cancel()  # superseded: Serve rolls over to the latest entry
        task = self._background.spawn(
            self._update(runtime, backend, runtime.entry, runtime.epoch),
            f"update {runtime.name} in place",
        )
        runtime.update_task = task

        def forget(done: asyncio.Task[None]) -> None:
            if runtime.update_task is done:
                runtime.update_task = None

        task.add_done_callback(forget)

    async def _update(
        self, runtime: ModelRuntime, backend: UpdatesInPlace, entry: ModelEntry, epoch: int
    ) -> None:
        def current() -> bool:  # a later change of per-request fields only is no rival
            return (
                runtime.backend is backend
                and runtime.epoch == epoch
                and runtime.state == State.READY
                and self.models.get(runtime.name) is runtime
            )

        try:
            await backend.update(entry, lambda m: self._on_progress(runtime, m))
        except Exception as exc:
            if not current():
                return  # unloaded, removed or changed again meanwhile
            failure = (
                exc
                if isinstance(exc, LoadFailed)
                else LoadFailed("launch", f"{type(exc).__name__}: {exc}")
            )
            runtime.backend = None  # the model is out of service: not an unexpected exit
            runtime.progress = None  # the rollout it described is over
            self._fail(runtime, failure)
            await backend.stop(1.0)
            return
        if current():
            runtime.progress = None
            self.events.publish({"type": "updated", "model": runtime.name})

    def _retire(self, runtime: ModelRuntime) -> None:
        self._retiring.add(runtime)
        self.stopper.stopping(runtime).add_done_callback(lambda _: self._retiring.discard(runtime))

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests; wait until none is in flight. False if the wait timed out."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            seen = self._changes.version
            if not any(r.admission.running for r in self._all_runtimes()):
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await self._changes.wait(seen, remaining)

    async def shutdown(self) -> None:
        """Stop every model, then wait for (or, past a bound, cancel) all background work."""
        self._closing = True
        await asyncio.gather(*(self.stopper.stop(r) for r in self._all_runtimes()))
        await self._background.settle(SHUTDOWN_GRACE_S)

    async def take_out_of_service(self, runtime: ModelRuntime, reason: str) -> None:
        """Stop a worker that is alive but useless: its requests get 502, the next starts anew."""
        backend = runtime.backend
        if backend is None:
            return
        self._lost(runtime, f"{reason}; it was replaced")
        await backend.stop(0.0)

    # -- internals --------------------------------------------------------------------------

    def _runtime(self, name: str, entry: ModelEntry) -> ModelRuntime:
        return ModelRuntime(name=name, entry=entry, admission=Admission(name, entry.limits))

    def _set_state(self, runtime: ModelRuntime, state: State) -> None:
        if runtime.state == state:
            return
        runtime.state = state
        self._changes.notify()
        event = {"type": "state", "model": runtime.name, "state": state.value}
        self.events.publish({**event, "error": runtime.last_error})


def _about(name: str, message: str) -> str:
    """`model 'x' could not load: <reason>`, without naming the model twice."""
    for prefix, replacement in ((f"model {name!r}: ", ""), (f"model {name!r} ", "it ")):
        if message.startswith(prefix):
            message = replacement + message[len(prefix) :]
            break
    return f"model {name!r} could not load: {message}"


def _consume_exception(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # the waiters report it; keep asyncio from logging it as lost
