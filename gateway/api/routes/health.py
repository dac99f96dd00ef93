"""Liveness and readiness."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse


def health_router(is_ready: Callable[[], bool]) -> APIRouter:
    router = APIRouter(tags=["health"])

    # HEAD as well: load balancers probe with it (kept out of the schema: one operation).
    @router.get("/health")
    @router.head("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        """The process is alive and its event loop answers."""
        return {"status": "ok"}

    @router.get("/ready")
    @router.head("/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        """The gateway takes traffic (503 while starting or shutting down)."""
        ok = is_ready()
        return JSONResponse(
            {"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503
        )

    return router
