"""GET /metrics: Prometheus text exposition of the gateway and its workers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api.metrics import GatewayMetrics


def metrics_router(metrics: GatewayMetrics) -> APIRouter:
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Requests, model states, queues, and each ready worker's batching and token stats."""
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
