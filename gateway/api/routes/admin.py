"""Admin API: load and unload models, reload the registry, watch lifecycle events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from gateway.errors import BadRequest
from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.load import ConfigError
from gateway.reloader import Reloader


def admin_router(supervisor: Supervisor, reloader: Reloader) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"])

    @router.post("/models/{name}/load")
    async def load(name: str) -> dict[str, Any]:
        await supervisor.load(name)
        return {"model": name, **supervisor.status(supervisor.get(name))}

    @router.post("/models/{name}/unload")
    async def unload(name: str) -> dict[str, Any]:
        await supervisor.unload(name)
        return {"model": name, **supervisor.status(supervisor.get(name))}

    @router.post("/reload")
    async def reload() -> dict[str, Any]:
        try:
            return await reloader.reload()
        except ConfigError as exc:
            raise BadRequest(exc.render(), code="invalid_config") from None

    @router.get("/config")
    async def config() -> dict[str, Any]:
        return reloader.describe()

    @router.get("/events")
    async def events() -> StreamingResponse:
        """Server-sent events: state changes, load progress, evictions, reloads."""
        return StreamingResponse(_sse(supervisor), media_type="text/event-stream")

    return router


async def _sse(supervisor: Supervisor) -> AsyncIterator[bytes]:
    snapshot = {n: supervisor.status(r)["state"] for n, r in supervisor.models.items()}
    yield _event({"type": "snapshot", "models": snapshot})
    async for event in supervisor.events.stream():
        yield _event(event)


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
