"""Liveness and readiness."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse


def health_router(is_ready: Callable[[], bool]) -> APIRouter:
    router = APIRouter(tags=["health"])

    # HEAD as well: load balancers probe with it.
    @router.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, str]:
        """The process is alive and its event loop answers."""
        return {"status": "ok"}

    @router.api_route("/ready", methods=["GET", "HEAD"])
    async def ready() -> JSONResponse:
        """The gateway takes traffic (503 while starting or shutting down)."""
        ok = is_ready()
        return JSONResponse(
            {"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503
        )

    return router
