"""Generation settings through the real gateway: history and system reach the model, stop
strings cut replies the same way streamed or not, seeds make sampling repeatable, and the
registry's defaults apply when a request leaves them out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Gateway, write_config

DEFAULT_LENGTH = 6


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = write_config(
        tmp_path_factory.mktemp("generation"),
        f"""
        gateway:
          default_model: tiny
        models:
          tiny:
            source: {tiny_model}
            generation: {{max_new_tokens: {DEFAULT_LENGTH}}}
          terse:
            source: {tiny_model}
            system_prompt: Answer in one word.
            generation: {{max_new_tokens: 2, temperature: 0}}
        """,
    )
    with Gateway(config) as gw:
        yield gw


def seed(gateway: Gateway, path: str = "/tiny", **body: Any) -> dict[str, Any]:
    reply = gateway.post(path, body)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def sse(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def test_max_length_left_out_takes_the_registry_default(gateway: Gateway) -> None:
    usage = seed(gateway, prompt="hi", temperature=0)["usage"]
    assert usage["completion_tokens"] == DEFAULT_LENGTH  # random weights rarely say EOS


def test_history_and_system_reach_the_prompt(gateway: Gateway) -> None:
    alone = seed(gateway, prompt="hi", max_length=1)["usage"]["prompt_tokens"]
    with_history = seed(
        gateway, prompt="hi", max_length=1, history=[["who are you?", "a tiny model"]]
    )["usage"]["prompt_tokens"]
    with_dicts = seed(
        gateway,
        prompt="hi",
        max_length=1,
        history=[
            {"role": "user", "content": "who are you?"},
            {"role": "assistant", "content": "a tiny model"},
        ],
    )["usage"]["prompt_tokens"]
    with_system = seed(gateway, prompt="hi", max_length=1, system="Be brief.")["usage"][
        "prompt_tokens"
    ]
    assert with_history == with_dicts > alone
    assert with_system > alone


def test_the_entry_system_prompt_applies_unless_the_request_brings_one(gateway: Gateway) -> None:
    plain = seed(gateway, "/tiny", prompt="hi", max_length=1)["usage"]["prompt_tokens"]
    terse = seed(gateway, "/terse", prompt="hi", max_length=1)["usage"]["prompt_tokens"]
    own = seed(gateway, "/terse", prompt="hi", max_length=1, system="X")["usage"]["prompt_tokens"]
    assert terse > plain
    assert own < terse


def test_the_entry_defaults_apply_per_model(gateway: Gateway) -> None:
    assert seed(gateway, "/terse", prompt="hi")["usage"]["completion_tokens"] == 2


def greedy_text(gateway: Gateway, length: int = 24) -> str:
    return str(seed(gateway, prompt="hello", max_length=length, temperature=0)["response"])


def a_stop_inside(text: str) -> tuple[str, str]:
    """A two-character stop string from the second half of `text`, and the text before it.

    The untrained model's replies hold stray bytes (U+FFFD); the stop avoids them."""
    start = next(
        i
        for i in range(len(text) // 2, len(text) - 1)
        if text[i : i + 2].strip() == text[i : i + 2] and "\ufffd" not in text[i : i + 2]
    )
    stop = text[start : start + 2]
    return stop, text[: text.find(stop)]


def test_a_stop_string_cuts_the_reply_before_it(gateway: Gateway) -> None:
    stop, before = a_stop_inside(greedy_text(gateway))
    reply = seed(gateway, prompt="hello", max_length=24, temperature=0, stop=[stop])
    assert reply["response"] == before
    assert reply["finish_reason"] == "stop"


def test_a_stopped_stream_sends_exactly_the_stopped_text(gateway: Gateway) -> None:
    stop, before = a_stop_inside(greedy_text(gateway))
    body = {"prompt": "hello", "max_length": 24, "temperature": 0, "stop": stop, "stream": True}
    events = sse(gateway.post("/tiny", body))
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["delta"] for e in events[:-2]]
    final = json.loads(events[-2])
    assert "".join(deltas) == final["response"] == before
    assert final["finish_reason"] == "stop"


def test_a_stopped_openai_stream_matches_the_unstreamed_reply(gateway: Gateway) -> None:
    stop, before = a_stop_inside(greedy_text(gateway))
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 24,
        "temperature": 0,
        "stop": [stop],
    }
    whole = gateway.post("/v1/chat/completions", body).json()["choices"][0]
    assert (whole["message"]["content"], whole["finish_reason"]) == (before, "stop")
    chunks = [
        json.loads(e)
        for e in sse(gateway.post("/v1/chat/completions", {**body, "stream": True}))[:-1]
    ]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == before
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_same_seed_samples_the_same_reply(gateway: Gateway) -> None:
    body = {"prompt": "hello", "max_length": 12, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    first = gateway.post("/tiny", body).json()["response"]
    assert gateway.post("/tiny", body).json()["response"] == first


def test_the_seed_stream_format(gateway: Gateway) -> None:
    events = sse(gateway.post("/tiny", {"prompt": "你好", "max_length": 5, "stream": True}))
    assert events[-1] == "[DONE]"
    *deltas, final = [json.loads(e) for e in events[:-1]]
    assert all(set(d) == {"delta", "model"} and d["model"] == "tiny" for d in deltas)
    assert {"response", "status", "time", "model", "finish_reason", "usage"} <= set(final)
    assert final["status"] == 200
    assert final["usage"]["completion_tokens"] == 5
    assert "".join(d["delta"] for d in deltas) == final["response"]
