"""The app factory: the only place where concrete objects are wired together."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from gateway.http import install_error_handlers
from gateway.launcher import Launcher, ProcessLauncher
from gateway.metrics import GatewayMetrics, RequestMetrics
from gateway.middleware import BodyLimit
from gateway.registry import LoadedRegistry
from gateway.routes.health import health_router
from gateway.routes.metrics import metrics_router
from gateway.routes.openai import openai_router
from gateway.routes.seed import seed_router
from gateway.service import Inference
from gateway.supervisor import Supervisor

log = logging.getLogger(__name__)


def create_app(loaded: LoadedRegistry, *, launcher: Launcher | None = None) -> FastAPI:
    registry = loaded.registry
    settings = registry.gateway
    run_dir = Path(tempfile.mkdtemp(prefix="llmgw-"))
    if launcher is None:
        process_launcher = ProcessLauncher(
            run_dir, Path(settings.cache_dir), Path(settings.envs_dir)
        )
        atexit.register(process_launcher.kill_all)  # a last resort if shutdown never ran
        launcher = process_launcher
    supervisor = Supervisor(registry, launcher)
    inference = Inference(supervisor)
    metrics = GatewayMetrics(supervisor)
    accepting = False

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal accepting
        reaper = asyncio.create_task(supervisor.run_reaper())
        accepting = True
        log.info("serving %d models from %s", len(registry.models), loaded.path)
        try:
            yield
        finally:
            accepting = False
            reaper.cancel()
            await supervisor.shutdown()
            shutil.rmtree(run_dir, ignore_errors=True)
            log.info("gateway stopped; every worker has exited")

    app = FastAPI(
        title="llm-gateway",
        version="0.1.0",
        summary="One server for many self-hosted LLMs.",
        lifespan=lifespan,
    )
    app.state.supervisor = supervisor
    app.state.registry = loaded
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(health_router(lambda: accepting))
    app.include_router(metrics_router(metrics))
    app.include_router(openai_router(inference, supervisor))
    app.include_router(seed_router(inference, supervisor))  # last: POST /{model} catches all
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: it sees every status
    return app
