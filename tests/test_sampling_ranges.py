"""Every sampling setting has one accepted range, the same on every route and in the
registry: its bounds pass, the first value past them (and NaN, infinities) is refused."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pydantic
import pytest

from gateway.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SeedRequest
from gateway.registry.config import Generation

ACCEPTED: dict[str, list[Any]] = {
    "temperature": [0, 1e-9, 0.7, 2],
    "top_p": [1e-9, 0.5, 1],
    "top_k": [0, 1, 50, 1_000_000],
    "repetition_penalty": [0.01, 1, 10],
    "seed": [0, 2**63 - 1],
}
REFUSED: dict[str, list[Any]] = {
    "temperature": [-1e-9, 2.0001, math.nan, math.inf, -math.inf],
    "top_p": [0, -0.5, 1.0001, math.nan, math.inf],
    "top_k": [-1, 1_000_001, 2**64],
    "repetition_penalty": [1e-38, 0, 0.0099, 10.01, -1, math.nan, math.inf],
    "seed": [-1, 2**63],
}


def seed(**fields: Any) -> Any:
    return SeedRequest(prompt="x", **fields)


def chat(**fields: Any) -> Any:
    return ChatCompletionRequest(
        model="m", messages=[ChatMessage(role="user", content="x")], **fields
    )


def completion(**fields: Any) -> Any:
    return CompletionRequest(model="m", prompt="x", **fields)


BUILDERS: dict[str, Callable[..., Any]] = {
    "seed": seed,
    "chat": chat,
    "completion": completion,
    "registry": Generation,
}


def cases(ranges: dict[str, list[Any]]) -> list[tuple[str, str, Any]]:
    return [
        (where, field, value)
        for where in BUILDERS
        for field, values in ranges.items()
        if not (where == "registry" and field == "seed")  # a seed is per request only
        for value in values
    ]


@pytest.mark.parametrize(("where", "field", "value"), cases(ACCEPTED), ids=str)
def test_the_bounds_of_each_range_are_accepted(where: str, field: str, value: Any) -> None:
    assert getattr(BUILDERS[where](**{field: value}), field) == value


@pytest.mark.parametrize(("where", "field", "value"), cases(REFUSED), ids=str)
def test_a_value_past_a_range_is_refused_naming_its_field(
    where: str, field: str, value: Any
) -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        BUILDERS[where](**{field: value})
    assert [error["loc"] for error in refused.value.errors()] == [(field,)]


def test_nan_sent_as_a_json_literal_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        SeedRequest.model_validate_json('{"prompt": "x", "repetition_penalty": NaN}')
    assert refused.value.errors()[0]["loc"] == ("repetition_penalty",)
