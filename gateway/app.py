"""The app factory: the only place where concrete objects are wired together."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from gateway.api.auth import ApiKeyAuth, load_keys
from gateway.api.metrics import GatewayMetrics, RequestMetrics
from gateway.api.middleware import BodyLimit, LiveCORS
from gateway.api.routes.admin import admin_router
from gateway.api.routes.health import health_router
from gateway.api.routes.metrics import metrics_router
from gateway.api.routes.openai import add_body_schemas, openai_router
from gateway.api.routes.playground import playground_router
from gateway.api.routes.seed import seed_router
from gateway.api.service import Inference
from gateway.backends import rundir
from gateway.backends.launcher import Launcher, ProcessLauncher
from gateway.http import install_error_handlers
from gateway.lifecycle.background import Background
from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.config import GatewaySettings, ModelEntry, key_sources
from gateway.registry.load import LoadedRegistry, require_cluster_for
from gateway.reloader import Reloader

if TYPE_CHECKING:
    from gateway.backends.cluster.connect import RayCluster
    from gateway.backends.cluster.launcher import RayLauncher

log = logging.getLogger(__name__)


class Readiness:
    """Whether the gateway takes traffic: from startup until a drain begins."""

    def __init__(self) -> None:
        self.accepting = False


def create_app(
    loaded: LoadedRegistry, *, launcher: Launcher | None = None, cluster: RayCluster | None = None
) -> FastAPI:
    """The gateway; with `cluster`, its models are deployed onto that Ray cluster."""
    registry = loaded.registry
    settings = registry.gateway
    require_cluster_for(loaded, cluster is not None)
    keys = load_keys(settings.auth)  # fail at start, not at the first request
    run_dir = rundir.create()
    ray_launcher: RayLauncher | None = None
    if cluster is not None and launcher is None:

        def idle(entry: ModelEntry) -> float | None:
            return supervisor.entry_idle_s(entry)  # the registry of the day

        ray_launcher = _ray_launcher(
            settings,
            idle,
            key_sources=lambda: key_sources(supervisor.registry),
            local=cluster.started_here,
        )
        launcher = ray_launcher
    if launcher is None:
        process_launcher = ProcessLauncher(
            run_dir,
            Path(settings.cache_dir),
            Path(settings.envs_dir),
            key_sources=lambda: key_sources(supervisor.registry),  # the registry of the day
            auto_build_envs=settings.auto_build_envs,
        )
        atexit.register(process_launcher.kill_all)  # a last resort if shutdown never ran
        launcher = process_launcher
    supervisor: Supervisor = Supervisor(registry, launcher, cluster=cluster is not None)
    reloader = Reloader(loaded, supervisor, keys)
    inference = Inference(supervisor)
    metrics = GatewayMetrics(supervisor)
    readiness = Readiness()

    async def drain() -> None:
        """Stop taking work and wait (bounded) for what is in flight to finish."""
        readiness.accepting = False
        timeout = supervisor.registry.gateway.drain_timeout_s
        log.info("draining: waiting up to %gs for in-flight requests", timeout)
        finished = await supervisor.drain(timeout)
        log.info("drain %s", "complete" if finished else "timed out; stopping anyway")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loops = Background()  # run until the shutdown cancels them
        loops.spawn(supervisor.run_reaper(), "idle reaper")
        loops.spawn(supervisor.prober.run(), "health prober")
        loops.spawn(reloader.watch(), "config watcher")  # idle while watch_config is off
        reloads = Background()  # SIGHUP reloads: each runs to its end
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError):  # only the main thread gets signals
            loop.add_signal_handler(
                signal.SIGHUP, lambda: reloads.spawn(reloader.reload_quietly(), "SIGHUP reload")
            )
        readiness.accepting = True
        log.info("serving %d models from %s", len(registry.models), loaded.path)
        try:
            yield
        finally:
            readiness.accepting = False
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)
            await loops.settle(0.0)  # cancelled and awaited
            await reloads.settle(10.0)
            if ray_launcher is not None:
                ray_launcher.close()
            await supervisor.shutdown()
            if cluster is not None:
                await asyncio.to_thread(cluster.close)
            rundir.remove(run_dir)
            log.info("gateway stopped; every worker has exited")

    app = FastAPI(
        title="llm-gateway",
        version="0.1.0",
        summary="One server for many self-hosted LLMs.",
        lifespan=lifespan,
        # Starlette would redirect "/demo/" to "/demo" on the request's own Host header,
        # a host the client chooses; a path with a trailing slash is a 404 instead.
        redirect_slashes=False,
    )
    app.state.supervisor = supervisor
    app.state.registry = loaded
    app.state.reloader = reloader
    app.state.drain = drain
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(health_router(lambda: readiness.accepting))
    app.include_router(metrics_router(metrics))
    app.include_router(openai_router(inference, supervisor))
    app.include_router(admin_router(supervisor, reloader))
    app.include_router(playground_router(lambda: supervisor.registry.gateway.playground))
    app.include_router(seed_router(inference, supervisor))  # last: POST /{model} catches all
    _document_bodies(app)
    # Middleware runs outside-in in reverse order of addition: metrics, CORS, auth, body limit.
    # Each reads the settings in force per request, so a reload applies to the next one.
    app.add_middleware(BodyLimit, max_bytes=lambda: reloader.settings().max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=lambda: reloader.keys)
    app.add_middleware(LiveCORS, origins=lambda: reloader.settings().cors_origins)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: it sees every status
    return app


def _ray_launcher(
    settings: GatewaySettings,
    idle_s: Callable[[ModelEntry], float | None],
    *,
    key_sources: Callable[[], frozenset[str]],
    local: bool,
) -> RayLauncher:
    from gateway.backends.cluster.launcher import RayLauncher
    from gateway.backends.cluster.replica import ReplicaSettings

    replica = ReplicaSettings(
        cache_dir=str(Path(settings.cache_dir).resolve()),
        envs_dir=str(Path(settings.envs_dir).resolve()),
        auto_build_envs=settings.auto_build_envs,
    )
    return RayLauncher(replica, idle_s, key_sources=key_sources, local=local)


def _document_bodies(app: FastAPI) -> None:
    """/openapi.json names the OpenAI bodies, which the routes validate themselves."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_body_schemas(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
