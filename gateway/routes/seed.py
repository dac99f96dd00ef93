"""The seed scripts' API: POST /<model> and POST / (the default model)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway.protocol import SeedReply, SeedRequest
from gateway.service import Inference
from gateway.supervisor import Supervisor


def seed_router(inference: Inference, supervisor: Supervisor) -> APIRouter:
    router = APIRouter(tags=["seed"])
    responses: dict[int | str, Any] = {200: {"model": SeedReply}}

    @router.post("/", response_model=None, responses=responses)
    async def default_model(body: SeedRequest, request: Request) -> Any:
        return await inference.seed(supervisor.default_model(), body, request)

    @router.post("/{model}", response_model=None, responses=responses)
    async def named_model(model: str, body: SeedRequest, request: Request) -> Any:
        return await inference.seed(model, body, request)

    return router
