"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from gateway.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RelayedChatRequest,
    RelayedCompletionRequest,
)
from gateway.api.service import Inference
from gateway.lifecycle.supervisor import Supervisor

M = TypeVar("M", bound=BaseModel)
# What the routes validate their JSON bodies as (tests/test_wire_fields.py walks them).
VALIDATED_BODIES: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    RelayedChatRequest,
    CompletionRequest,
    RelayedCompletionRequest,
)
# The body is read as JSON and validated once its model is known (`parse_for`); the
# schema shown in /openapi.json is the gateway's own (app.py adds the components).
JsonBody = Annotated[dict[str, Any], Body()]


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def add_body_schemas(schema: dict[str, Any]) -> dict[str, Any]:
    """The components the request bodies above refer to, in an OpenAPI document."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ChatCompletionRequest, CompletionRequest):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    return schema


def parse_for(supervisor: Supervisor, raw: dict[str, Any], strict: type[M], relayed: type[M]) -> M:
    """Validate a body by what serves its model: a relaying engine takes fields the
    gateway does not read; the gateway's own worker refuses them (400 `unknown_field`)."""
    name = raw.get("model")
    runtime = supervisor.models.get(name) if isinstance(name, str) else None
    model = relayed if runtime is not None and runtime.entry.relays else strict
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None


def openai_router(inference: Inference, supervisor: Supervisor) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])

    @router.post(
        "/chat/completions", response_model=None, openapi_extra=_body_schema(ChatCompletionRequest)
    )
    async def chat_completions(body: JsonBody, request: Request) -> Any:
        chat = parse_for(supervisor, body, ChatCompletionRequest, RelayedChatRequest)
        return await inference.chat(chat, request)

    @router.post("/completions", response_model=None, openapi_extra=_body_schema(CompletionRequest))
    async def completions(body: JsonBody, request: Request) -> Any:
        completion = parse_for(supervisor, body, CompletionRequest, RelayedCompletionRequest)
        return await inference.completion(completion, request)

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
