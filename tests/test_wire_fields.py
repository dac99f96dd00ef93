"""Every string a client can send, on every route, is checked as Unicode text.

A lone UTF-16 surrogate ("\\ud800") is valid JSON but has no UTF-8 form: a field that lets
one through fails later, on the way to the worker, with a 500 and a reset connection.
The walk below finds every string field of every route's body (gateway and worker), so a
field added later without `WireStr` fails here.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from gateway.api.protocol import (
    UNICODE_TEXT,
    ChatCompletionRequest,
    CompletionRequest,
    SeedRequest,
)
from gateway.api.routes.openai import VALIDATED_BODIES
from gateway.registry.load import load_registry
from gateway.worker.server import WorkerState, create_worker_app
from tests.test_config import NoLauncher

BAD = "a\ud800b"


def route_bodies(app: FastAPI) -> set[type[BaseModel]]:
    return set(_bodies(app.routes))


def _bodies(routes: list[Any]) -> Iterator[type[BaseModel]]:
    for route in routes:
        if isinstance(route, APIRoute) and route.body_field is not None:
            body = route.body_field.field_info.annotation
            if get_origin(body) is dict:  # validated by the route itself, by model
                yield from VALIDATED_BODIES
            else:
                yield cast(type[BaseModel], body)
        # An included router (FastAPI keeps it whole, or copies its routes, by version).
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _bodies(included.routes)


def string_leaves(annotation: Any, metadata: list[Any], path: str) -> Iterator[tuple[str, bool]]:
    """(path, checked) for every `str` reachable from `annotation`."""
    origin = get_origin(annotation)
    if annotation is str:
        yield path, UNICODE_TEXT in metadata
    elif origin is Annotated:
        base, *extra = get_args(annotation)
        yield from string_leaves(base, [*metadata, *extra], path)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            yield from string_leaves(field.annotation, list(field.metadata), f"{path}.{name}")
    elif origin is Literal:
        return  # fixed values: a surrogate can never match one
    elif origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            yield from string_leaves(arg, metadata, path)
    else:  # list[...], tuple[...], dict[...]
        for arg in get_args(annotation):
            yield from string_leaves(arg, [], f"{path}[]")


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> set[type[BaseModel]]:
    from gateway.app import create_app

    directory = tmp_path_factory.mktemp("routes")
    config = directory / "models.yaml"
    config.write_text(f"models:\n  m: {{source: {directory}}}\n")
    gateway = create_app(load_registry(config), launcher=NoLauncher())
    with TestClient(gateway):  # runs the lifespan, which cleans up after create_app
        found = route_bodies(gateway)
    state = WorkerState(
        name="m",
        adapter=cast(Any, None),
        engine=cast(Any, None),
        defaults=cast(Any, None),
        stop_ids=frozenset(),
        context_length=8,
        info=dict,
    )
    return found | route_bodies(create_worker_app(state))


def test_every_string_field_of_every_route_checks_its_text(
    bodies: set[type[BaseModel]],
) -> None:
    assert {SeedRequest, ChatCompletionRequest, CompletionRequest} <= bodies
    leaves = [leaf for body in bodies for leaf in string_leaves(body, [], body.__name__)]
    paths = {path for path, _ in leaves}
    assert {  # the walk reaches nested fields, union members and list items
        "ChatCompletionRequest.messages[].content",
        "ChatCompletionRequest.messages[].content[].text",
        "ChatCompletionRequest.messages[].name",
        "ChatCompletionRequest.stop[]",
        "CompletionRequest.user",
        "SeedRequest.history[][]",
        "SeedRequest.history[].content",
        "SeedRequest.system",
    } <= paths
    unchecked = [path for path, checked in leaves if not checked]
    assert unchecked == [], "string fields without WireStr"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
PARTS = [{"type": "text", "text": "a"}, {"type": "text", "text": BAD}]
SURROGATES: list[Any] = [
    pytest.param(ChatCompletionRequest, {**CHAT, "model": BAD}, "model", id="chat-model"),
    pytest.param(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": BAD}]},
                 "messages", id="chat-content"),
    pytest.param(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": PARTS}]},
                 "messages", id="chat-content-part"),
    pytest.param(ChatCompletionRequest,
                 {**CHAT, "messages": [{"role": "user", "content": "hi", "name": BAD}]},
                 "messages", id="chat-name"),
    pytest.param(ChatCompletionRequest, {**CHAT, "user": BAD}, "user", id="chat-user"),
    pytest.param(ChatCompletionRequest, {**CHAT, "stop": BAD}, "stop", id="chat-stop"),
    pytest.param(ChatCompletionRequest, {**CHAT, "stop": ["x", BAD]}, "stop", id="chat-stops"),
    pytest.param(CompletionRequest, {"model": "m", "prompt": BAD}, "prompt", id="completion"),
    pytest.param(CompletionRequest, {"model": "m", "prompt": "x", "stop": BAD}, "stop",
                 id="completion-stop"),
    pytest.param(SeedRequest, {"prompt": BAD}, "prompt", id="seed-prompt"),
    pytest.param(SeedRequest, {"prompt": "x", "system": BAD}, "system", id="seed-system"),
    pytest.param(SeedRequest, {"prompt": "x", "stop": [BAD]}, "stop", id="seed-stop"),
    pytest.param(SeedRequest, {"prompt": "x", "history": [[BAD, "a"]]}, "history",
                 id="seed-history-pair"),
    pytest.param(SeedRequest, {"prompt": "x", "history": [{"role": "user", "content": BAD}]},
                 "history", id="seed-history-turn"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "body", "field"), SURROGATES)
def test_a_lone_surrogate_in_any_string_field_is_refused(
    model: type[BaseModel], body: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    errors = caught.value.errors()
    # pydantic itself refuses it where a length is checked; WireStr does everywhere else.
    refused = [e for e in errors if "lone surrogate" in e["msg"] or e["type"] == "string_unicode"]
    assert refused and all(e["loc"][0] == field for e in refused)


def test_valid_text_outside_the_basic_plane_is_accepted() -> None:
    # A surrogate pair in JSON decodes to one real character, which is fine.
    assert SeedRequest.model_validate({"prompt": "\U0001f600 你好"}).prompt == "\U0001f600 你好"
