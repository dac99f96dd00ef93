"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.service import Inference
from gateway.supervisor import Supervisor


def openai_router(inference: Inference, supervisor: Supervisor) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await inference.chat(body, request)

    @router.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await inference.completion(body, request)

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [model_card(supervisor, name) for name in supervisor.models],
        }

    @router.get("/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        supervisor.get(name)
        return model_card(supervisor, name)

    return router


def model_card(supervisor: Supervisor, name: str) -> dict[str, Any]:
    runtime = supervisor.get(name)
    created = int(runtime.last_used or 0)
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "llm-gateway",
        "description": runtime.entry.description,
        "default": name == supervisor.registry.gateway.default_model,
        **supervisor.status(runtime),
    }
