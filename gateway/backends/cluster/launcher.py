"""Models as Ray Serve deployments: `serve --cluster` swaps the launcher, nothing else.

Each model is one Serve application, `llmgw-<model>`, deployed on its first request (as a
worker is started on one machine), updated in place when its entry changes (Serve rolls its
replicas over, or only retunes them when just the deployment's options changed) and deleted
when the model is unloaded or removed. Its replicas run on whichever nodes hold their
resources (gateway/backends/cluster/resources.py) and scale between `replicas.min` and
`replicas.max` on the requests in flight; with `min: 0` the cluster scales the model to
zero after its idle time and starts a replica on the next request, so the cluster, not the
gateway, does idle unloading (`Backend.scales_itself`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from gateway import __version__
from gateway.backends.cluster.replica import ModelReplica, ReplicaSettings
from gateway.backends.cluster.resources import actor_options, live_nodes, replica_resources, unfit
from gateway.backends.cluster.transport import HandleTransport
from gateway.backends.launcher import Backend, LoadFailed, Progress
from gateway.backends.upstream import Upstream
from gateway.registry.changes import what_a_replica_reads
from gateway.registry.config import ModelEntry

log = logging.getLogger(__name__)

APP_PREFIX = "llmgw-"
STATUS_INTERVAL_S = 1.0


def app_name(model: str) -> str:
    return APP_PREFIX + model


def deployment_options(entry: ModelEntry, idle_s: float | None) -> dict[str, Any]:
    """Serve options for a model: placement, replicas, autoscaling, backpressure."""
    replicas = entry.replicas
    floor = replicas.min if idle_s is not None and not entry.pinned else max(1, replicas.min)
    autoscaling: dict[str, Any] = {
        "min_replicas": floor,
        "max_replicas": replicas.max,
        "initial_replicas": max(1, floor),  # deployed for a request: one replica at once
        "target_ongoing_requests": replicas.target_ongoing_requests,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 30.0 if idle_s is None else max(1.0, idle_s),
        # The load is averaged over this window before a downscale: Serve's 30 s default
        # would add itself to a short idle time (it must exceed Serve's 10 s metric interval).
        "look_back_period_s": 30.0 if idle_s is None else min(30.0, max(11.0, idle_s)),
    }
    if idle_s is not None:
        autoscaling["downscale_to_zero_delay_s"] = idle_s
    limits = entry.limits
    return {
        "name": "model",
        "ray_actor_options": actor_options(entry),
        "autoscaling_config": autoscaling,
        # A replica takes what its worker batches; the rest wait in the gateway's queue.
        "max_ongoing_requests": limits.max_concurrency,
        "max_queued_requests": limits.max_queue,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 20.0,
    }


def replica_version(entry: ModelEntry, settings: ReplicaSettings) -> str:
    """A digest of what a replica reads at its start: its version for Serve."""
    view = what_a_replica_reads(entry).model_dump(mode="json", warnings=False)
    shown = json.dumps([__version__, view, dataclasses.asdict(settings)], sort_keys=True)
    return hashlib.sha256(shown.encode()).hexdigest()[:16]


class ClusterBackend:
    """A model's Serve application, seen as one backend by the supervisor."""

    pid: int | None = None
    probe_path: str | None = None  # Serve probes every replica (ModelReplica.check_health)
    scales_itself = True

    def __init__(self, name: str, handle: Any, launcher: RayLauncher) -> None:
        self.name = name
        self.launcher = launcher
        self.app = app_name(name)
        self.replicas: dict[str, dict[str, Any]] = {}
        self.upstream = Upstream(
            "http://replica",
            transport=HandleTransport(handle, self._served_by),
            label=f"the replica of {name!r}",
        )
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._served: dict[str, int] = {}
        self._submitting = asyncio.Lock()
        self.runtime: dict[str, Any] = {}
        self._describe()
        self._watch = asyncio.create_task(self._watch_status())

    def _describe(self) -> None:
        replicas = list(self.replicas.values())
        running = sum(r["state"] == "ALIVE" for r in replicas)
        self.runtime = {
            "cluster": {"application": self.app, "replicas": replicas, "running": running}
        }

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._exited

    def _served_by(self, info: Any) -> None:
        self._served[info.replica] = self._served.get(info.replica, 0) + 1

    async def _watch_status(self) -> None:
        """Keep the replica table fresh; the application vanishing is this backend's exit."""
        while not self._exited.done():
            try:
                present, replicas = await asyncio.to_thread(_replicas_of, self.app)
            except Exception:
                log.exception("reading the replicas of %s failed", self.app)
                present, replicas = True, list(self.replicas.values())
            if not present:
                self._exited.set_result(-1)
                return
            for replica in replicas:
                replica["served"] = self._served.get(replica["replica"], 0)
            self.replicas = {r["replica"]: r for r in replicas}
            self._describe()
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def update(self, entry: ModelEntry, on_progress: Progress) -> None:
        """Roll the replicas over to a changed entry; the application and handle stay."""
        async with self._submitting:
            await self.launcher.submit(self.name, entry, on_progress, fresh=False)
        await self.launcher.until_running(self.name, on_progress)

    async def stop(self, grace_s: float) -> None:
        from ray import serve

        self._watch.cancel()
        try:
            async with self._submitting:  # an update being handed to Serve is deleted too
                if not self.launcher.closing_with_ray:
                    await asyncio.to_thread(serve.delete, self.app, _blocking=True)
        finally:
            if not self._exited.done():
                self._exited.set_result(0)
            await self.upstream.aclose()


class RayLauncher:
    """Deploys models onto the cluster the gateway joined (gateway/backends/cluster/connect.py)."""

    def __init__(
        self,
        settings: ReplicaSettings,
        idle_s: Callable[[ModelEntry], float | None],
        *,
        key_sources: Callable[[], Iterable[str]] = tuple,
        local: bool = False,
    ) -> None:
        self.settings = settings
        self.key_sources = key_sources  # read at each deploy: a reload may name new ones
        self.idle_s = idle_s  # the model's idle time in force: the cluster scales on it
        self.local = local  # a Ray this gateway started, and stops with every replica
        self.closing_with_ray = False

    def close(self) -> None:
        """The gateway is stopping: a Ray of its own goes with every application in it, so
        none is deleted one by one (a signal to the process group may have stopped Ray
        already, and a delete would wait a minute for it)."""
        self.closing_with_ray = self.local

    async def launch(self, name: str, entry: ModelEntry, on_progress: Progress) -> Backend:
        handle = await self.submit(name, entry, on_progress, fresh=True)
        try:
            await self.until_running(name, on_progress)
        except BaseException:
            await asyncio.to_thread(_delete_quietly, app_name(name))
            raise
        return ClusterBackend(name, handle, self)

    async def submit(
        self, name: str, entry: ModelEntry, on_progress: Progress, *, fresh: bool
    ) -> Any:
        """Hand the model's application to Serve and return its handle, without waiting for
        its replicas. Resubmitting a running application is Serve's rolling update: replicas
        of the new entry start as the old ones stop, a few at a time."""
        from ray import serve

        needs = replica_resources(entry)
        problem = unfit(needs, await asyncio.to_thread(live_nodes))
        if problem:
            raise LoadFailed("no_room", f"model {name!r} fits on no node: {problem}")
        options = deployment_options(entry, self.idle_s(entry))
        settings = dataclasses.replace(self.settings, secrets=tuple(sorted(self.key_sources())))
        # Serve restarts replicas when their version changes, and applies a change to the
        # options alone (replica counts, idle time, queue) to the running ones.
        deployment = serve.deployment(**options)(ModelReplica).options(
            version=replica_version(entry, settings), _internal=True
        )
        app = deployment.bind(name, entry, settings)
        verb = "deploying to" if fresh else "updating its replicas on"
        on_progress({"event": "progress", "message": f"{verb} the Ray cluster"})
        # Serve's own non-blocking run (serve.run would also wait for the replicas): once
        # it returns, the controller holds the application, so a delete cannot precede it.
        submitting = asyncio.ensure_future(
            asyncio.to_thread(
                serve._run, app, _blocking=False, name=app_name(name), route_prefix=None
            )
        )
        try:
            return await asyncio.shield(submitting)
        except asyncio.CancelledError:
            await asyncio.wait({submitting})
            raise

    async def until_running(self, name: str, on_progress: Progress) -> None:
        """Wait for the application to run, reporting its replicas; LoadFailed if it fails."""
        while True:
            state, status = await _deploy_status(name)
            on_progress({"event": "progress", "message": _first_line(status)})
            if state == "RUNNING":
                return
            if state in ("DEPLOY_FAILED", "DELETING", None):
                why = _replica_failure(name, status) or f"model {name!r}: {_first_line(status)}"
                raise LoadFailed("launch", why)
            await asyncio.sleep(STATUS_INTERVAL_S)


async def _deploy_status(name: str) -> tuple[str | None, str]:
    """The application's state (None: gone) and a line on its replicas, with Serve's
    message (the traceback of a replica that failed to start)."""
    from ray import serve

    try:
        status = await asyncio.to_thread(serve.status)
    except Exception as exc:
        return "UNKNOWN", f"deploying ({type(exc).__name__})"
    app = status.applications.get(app_name(name))
    if app is None:
        return None, "its application is gone from the cluster"
    states = {
        state: count for d in app.deployments.values() for state, count in d.replica_states.items()
    }
    shown = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()))
    message = next((d.message for d in app.deployments.values() if d.message), app.message)
    line = f"replicas: {shown or 'none yet'}" + (f"; {message}" if message else "")
    return str(getattr(app.status, "value", app.status)), line


def _first_line(text: str, limit: int = 300) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _replica_failure(name: str, status: str) -> str | None:
    """What stopped the replicas from starting, from the traceback Serve reports: the
    backend's own reason (the worker's LoadFailed) when it gave one."""
    reasons: list[str] = re.findall(r"LoadFailed: (.+)$", status, flags=re.MULTILINE)
    if reasons:
        return reasons[-1].strip()
    errors: list[str] = re.findall(r"^\w*(?:Error|Exception): (.+)$", status, flags=re.MULTILINE)
    if errors:
        return f"model {name!r}: its replicas failed to start: {errors[-1].strip()}"
    return None


def _replicas_of(app: str) -> tuple[bool, list[dict[str, Any]]]:
    """Whether the application exists, and its live replicas with their nodes."""
    from ray import serve
    from ray._private import state

    if app not in serve.status().applications:
        return False, []
    prefix = f"ServeReplica:{app}:"
    replicas = []
    for actor_id, actor in state.actors().items():
        if actor.get("ActorClassName", "").startswith(prefix) and actor.get("State") != "DEAD":
            replicas.append(
                {
                    "replica": actor_id,
                    "node": actor.get("Address", {}).get("NodeID"),
                    "state": actor.get("State"),
                    "pid": actor.get("Pid"),
                }
            )
    return True, replicas


def _delete_quietly(app: str) -> None:
    from ray import serve

    try:
        serve.delete(app, _blocking=True)
    except Exception:
        log.exception("deleting %s failed", app)
