"""The worker refuses text that cannot fit the context before it tokenizes any of it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient

from adapters.base import Message, Prompt
from gateway.worker.server import WorkerState, create_worker_app

CONTEXT = 8
LONGEST = 20  # the fake vocabulary's longest token, in characters


class Untokenizable:
    """An adapter whose prompt building says it was reached: it must not be, past the bound."""

    class tokenizer:  # stands in for a tokenizer object
        @staticmethod
        def get_vocab() -> dict[str, int]:
            return {"a": 0, "b" * LONGEST: 1}

    def chat_prompt(self, messages: Sequence[Message]) -> Prompt:
        raise ValueError("the adapter was asked to tokenize")

    def completion_prompt(self, text: str) -> Prompt:
        raise ValueError("the adapter was asked to tokenize")


@pytest.fixture(scope="module")
def client() -> TestClient:
    state = WorkerState(
        name="m",
        adapter=cast(Any, Untokenizable()),
        engine=cast(Any, None),
        defaults=cast(Any, None),
        stop_ids=frozenset(),
        context_length=CONTEXT,
        info=dict,
    )
    return TestClient(create_worker_app(state))


def chat(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat("x" * (CONTEXT * LONGEST + 1)), "messages"),
        ("/v1/completions", {"model": "m", "prompt": "x" * (CONTEXT * LONGEST + 1)}, "prompt"),
    ],
)
def test_text_longer_than_the_context_could_hold_is_refused_untokenized(
    client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    reply = client.post(path, json=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", param)
    assert f"is {CONTEXT * LONGEST + 1} characters" in error["message"]


def test_text_within_the_bound_is_tokenized(client: TestClient) -> None:
    reply = client.post("/v1/chat/completions", json=chat("x" * (CONTEXT * LONGEST)))
    assert reply.json()["error"]["message"] == "the adapter was asked to tokenize"
