"""The seed scripts' API: POST /<model> and POST / (the default model)."""

from __future__ import annotations

from typing import Any, NoReturn

from fastapi import APIRouter, Request

from gateway.api.protocol import SeedReply, SeedRequest
from gateway.api.service import Inference
from gateway.errors import MethodNotAllowed
from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.config import RESERVED_NAMES

# Reserved names that are GET routes of the gateway itself.
READ_ONLY_ROUTES = RESERVED_NAMES & {
    "health",
    "ready",
    "metrics",
    "docs",
    "redoc",
    "openapi.json",
    "playground",
}


def seed_router(inference: Inference, supervisor: Supervisor) -> APIRouter:
    router = APIRouter(tags=["seed"])
    responses: dict[int | str, Any] = {200: {"model": SeedReply}}

    @router.post("/", response_model=None, responses=responses)
    async def default_model(body: SeedRequest, request: Request) -> Any:
        return await inference.seed(supervisor.default_model(), body, request)

    # The gateway's own routes are never models: POST /health is the wrong method, not an
    # unknown model (checked before the body, which such a request need not have).
    for name in sorted(READ_ONLY_ROUTES):
        router.add_api_route(
            f"/{name}", _not_a_model, methods=["POST"], include_in_schema=False, response_model=None
        )

    @router.post("/{model}", response_model=None, responses=responses)
    async def named_model(model: str, body: SeedRequest, request: Request) -> Any:
        return await inference.seed(model, body, request)

    return router


async def _not_a_model(request: Request) -> NoReturn:
    raise MethodNotAllowed(
        f"POST {request.url.path} is not a model route; POST /<model> serves a model",
        headers={"Allow": "GET, HEAD"},
    )
