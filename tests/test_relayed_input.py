"""What the gateway reads of a body it relays to an engine, and what it refuses there:
any lone surrogate (named, even in a key), a new-token count under a name its limits do not
bound; and what engines take beyond the gateway's own ranges. End to end through a
`command` engine that echoes the body it received (tests/fixtures/echo_openai.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.api.protocol import RelayedChatRequest, RelayedCompletionRequest
from tests.support import ROOT, Gateway, running, write_config

ECHO = ROOT / "tests" / "fixtures" / "echo_openai.py"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    argv = [sys.executable, str(ECHO), "{port}"]
    config = write_config(
        tmp_path_factory.mktemp("relayed"),
        f"""\
        models:
          echo:
            engine: command
            command: {{argv: {json.dumps(argv)}, ready_path: /health}}
            limits: {{max_new_tokens: 64}}
        """,
    )
    with running(config) as gw:
        yield gw


def raw(gateway: Gateway, path: str, text: str) -> Any:
    """POST a body written by hand: JSON escapes for surrogates stay as sent."""
    headers = {"content-type": "application/json"}
    return gateway.client.post(path, content=text.encode(), headers=headers)


def echoed(reply: Any) -> dict[str, Any]:
    choice = reply.json()["choices"][0]
    body: dict[str, Any] = json.loads(choice.get("message", {}).get("content") or choice["text"])
    return body


@pytest.mark.parametrize(
    ("path", "extra", "named"),
    [
        ("/v1/completions", '"logit_bias": {"\\ud800": 1}', "logit_bias.\\ud800"),
        ("/v1/chat/completions", '"metadata": {"\\udfff": 1}', "metadata.\\udfff"),
        ("/v1/chat/completions", '"tools": [{"\\ud83d": "x"}]', "tools[0].\\ud83d"),
    ],
)
def test_a_lone_surrogate_in_a_nested_key_is_a_400_naming_it(
    gateway: Gateway, path: str, extra: str, named: str
) -> None:
    body = '"prompt": "hi"' if path == "/v1/completions" else f'"messages": {json.dumps(USER)}'
    reply = raw(gateway, path, f'{{"model": "echo", {body}, {extra}}}')
    assert reply.status_code == 400, reply.text
    assert named in reply.json()["error"]["message"]
    assert gateway.post("/echo", {"prompt": "hi"}).status_code == 200  # still serving


@pytest.mark.parametrize("alias", ["n_predict", "num_predict", "max_new_tokens"])
def test_a_token_count_under_another_name_is_refused_not_relayed(
    gateway: Gateway, alias: str
) -> None:
    routes: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": USER}),
    ]
    for path, body in routes:
        reply = gateway.post(path, {"model": "echo", **body, alias: 100_000})
        assert reply.status_code == 400, reply.text
        assert alias in reply.json()["error"]["message"]


def test_max_completion_tokens_is_bounded_on_both_routes(gateway: Gateway) -> None:
    chat = {"model": "echo", "messages": USER, "max_completion_tokens": 1_000_000}
    reply = gateway.post("/v1/chat/completions", chat)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "max_tokens_exceeded"
    completion = {"model": "echo", "prompt": "hi", "max_completion_tokens": 1_000_000}
    refused = gateway.post("/v1/completions", completion)
    assert refused.status_code == 400
    assert "max_completion_tokens" in refused.json()["error"]["message"]
    within = gateway.post("/v1/completions", {"model": "echo", "prompt": "hi", "max_tokens": 64})
    assert within.status_code == 200 and echoed(within)["max_tokens"] == 64


def test_engine_ranges_pass_through(gateway: Gateway) -> None:
    body = {
        "model": "echo",
        "messages": USER,
        "top_k": -1,
        "seed": -5,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    reply = gateway.post("/v1/chat/completions", {**body, "stream": False})
    assert reply.status_code == 200, reply.text
    sent = echoed(reply)
    assert (sent["top_k"], sent["seed"]) == (-1, -5)
    assert sent["stream_options"] == body["stream_options"]


def test_a_large_relayed_body_is_checked_in_one_pass() -> None:
    """A 2-million-item field is checked by one encode, not a walk building a path per
    item; a surrogate in it is still found and named."""
    items: list[Any] = [0] * 2_000_000
    RelayedChatRequest.model_validate({"model": "m", "messages": USER, "metadata": items})
    items[1_999_999] = "\ud800"
    with pytest.raises(ValueError, match=r"metadata\[1999999\]"):
        RelayedCompletionRequest.model_validate({"model": "m", "prompt": "x", "metadata": items})


def test_the_strict_worker_ranges_are_unchanged(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from gateway.api.protocol import ChatCompletionRequest

    for field, value in [("top_k", -1), ("seed", -5)]:
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"model": "m", "messages": USER, field: value})
