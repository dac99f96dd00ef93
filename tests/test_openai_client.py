"""Contract test: the official `openai` Python client against the real gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support import Gateway, write_config

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = write_config(
        tmp_path_factory.mktemp("openai"),
        f"""
        gateway:
          default_model: tiny
        models:
          tiny:
            description: the first tiny model
            source: {tiny_model}
            limits: {{max_new_tokens: 64}}
          other:  # listed, never loaded here
            source: {tiny_model}
        """,
    )
    with Gateway(config) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key="not-needed", max_retries=0, timeout=60
    ) as client:
        yield client


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert reply.object == "chat.completion"
    assert reply.model == "tiny"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 8


def test_streamed_deltas_spell_the_unstreamed_greedy_reply(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=16, temperature=0
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert {c.model for c in chunks} == {"tiny"}


def test_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5)
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_streamed_completion_matches_the_unstreamed_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=0)
    stream = client.completions.create(
        model="tiny", prompt="Once", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text


def test_models_list_has_every_registry_entry(client: openai.OpenAI) -> None:
    assert sorted(model.id for model in client.models.list()) == ["other", "tiny"]


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "llm-gateway")
    extra = model.model_extra or {}
    assert extra["description"] == "the first tiny model"
    assert extra["default"] is True
    assert extra["state"] in {"unloaded", "starting", "ready"}


def test_an_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 404
    assert (error.code, error.param, error.type) == ("model_not_found", "model", "not_found_error")
    assert "valid models: other, tiny" in error.message


def test_an_unknown_model_raises_not_found_before_a_stream_starts(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, stream=True)


def test_retrieving_an_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_a_bad_request_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=65)
    error = caught.value
    assert error.status_code == 400
    assert (error.param, error.code) == ("max_tokens", "max_tokens_exceeded")


def test_an_invalid_value_raises_bad_request_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    assert caught.value.param == "messages"
