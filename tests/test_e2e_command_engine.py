"""`engine: command`: a server the gateway starts by command, behind the same lifecycle and
API as its own worker. The server is a stand-in that echoes what it received
(tests/fixtures/echo_openai.py); tests/test_e2e_vllm.py runs real vLLM the same way."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, Gateway, running, wait_until, worker_pids, write_config

ECHO = ROOT / "tests" / "fixtures" / "echo_openai.py"


def config_text(tiny_model: Path, ready_after: float = 0.5) -> str:
    argv = [sys.executable, str(ECHO), "{port}", "--ready-after", str(ready_after)]
    return f"""\
    gateway:
      probe_interval_s: 0.5
    models:
      echo:
        engine: command
        command: {{argv: {json.dumps(argv)}, ready_path: /health}}
        system_prompt: Be brief.
        generation: {{temperature: 0.3, max_new_tokens: 17}}
        limits: {{max_new_tokens: 64}}
      tiny:
        source: {tiny_model}
    """


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = write_config(tmp_path_factory.mktemp("command"), config_text(tiny_model))
    with running(config) as gw:
        yield gw


def relayed(reply: dict[str, Any]) -> dict[str, Any]:
    choice = reply["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    body: dict[str, Any] = json.loads(text)
    return body


def test_fields_the_gateway_does_not_read_are_relayed_untouched(gateway: Gateway) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    body = {
        "model": "echo",
        "messages": messages,
        "tools": tools,
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 3,
        "n": 2,
        "presence_penalty": 0.5,
        "keep_alive": 30,
    }
    reply = gateway.post("/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    sent = relayed(reply.json())
    for field in ("tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "n"):
        assert sent[field] == body[field]
    assert sent["presence_penalty"] == 0.5
    # What the gateway does for every engine: the system prompt, the entry's defaults.
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, *messages]
    assert sent["temperature"] == 0.3 and sent["max_tokens"] == 17
    assert "keep_alive" not in sent and sent["model"] == "echo"


def test_the_seed_route_and_completions_work_on_a_command_engine(gateway: Gateway) -> None:
    seed = gateway.post("/echo", {"prompt": "hi", "max_length": 5})
    assert seed.status_code == 200, seed.text
    sent = json.loads(seed.json()["response"])
    assert sent["messages"][-1] == {"role": "user", "content": "hi"} and sent["max_tokens"] == 5
    done = gateway.post("/v1/completions", {"model": "echo", "prompt": [1, 2], "echo": True})
    assert done.status_code == 200, done.text
    assert relayed(done.json())["prompt"] == [1, 2]
    stream = gateway.post("/v1/completions", {"model": "echo", "prompt": "x", "stream": True})
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")


def test_the_gateways_own_worker_still_refuses_what_it_does_not_support(gateway: Gateway) -> None:
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    tool = gateway.post("/v1/chat/completions", {"model": "tiny", **base, "tools": []})
    assert tool.status_code == 400 and tool.json()["error"]["code"] == "unknown_field"
    many = gateway.post("/v1/chat/completions", {"model": "tiny", **base, "n": 2})
    assert many.status_code == 400
    # And the gateway's own checks hold for a relayed model too.
    limit = gateway.post("/v1/chat/completions", {"model": "echo", **base, "max_tokens": 65})
    assert limit.status_code == 400 and limit.json()["error"]["code"] == "max_tokens_exceeded"
    choices = gateway.post("/v1/chat/completions", {"model": "echo", **base, "n": 1000})
    assert choices.status_code == 400 and choices.json()["error"]["param"] == "n"
    deep = gateway.client.post(
        "/v1/chat/completions",
        content=b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}],'
        b' "metadata": {"a": [{"b": "\\udfff"}]}}',
        headers={"content-type": "application/json"},
    )
    assert deep.status_code == 400
    assert "metadata.a[0].b" in deep.json()["error"]["message"]
    unknown = gateway.post("/v1/chat/completions", {"model": "nope", **base, "tools": []})
    assert unknown.status_code == 400  # the strict body first, then the unknown model
    missing = gateway.post("/v1/chat/completions", {"model": "nope", **base})
    assert missing.status_code == 404


def test_the_command_engine_shows_its_state_and_a_killed_server_is_replaced(
    gateway: Gateway,
) -> None:
    assert gateway.post("/echo", {"prompt": "hi"}).status_code == 200
    card = gateway.models()["echo"]
    assert card["state"] == "ready" and card["engine"] == "command"
    assert card["runtime"]["port"] > 0
    tree = set(worker_pids(gateway.process.pid)) - set(_worker_pids_of(gateway, "tiny"))
    server = [pid for pid in tree if pid != card["pid"]]
    assert server
    for pid in server:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: gateway.models()["echo"]["state"] != "ready", timeout=10)
    assert gateway.post("/echo", {"prompt": "again"}).status_code == 200
    assert gateway.models()["echo"]["pid"] != card["pid"]


def _worker_pids_of(gateway: Gateway, name: str) -> list[int]:
    pid = gateway.models()[name]["pid"]
    return [pid] if pid else []


def test_a_sigkilled_gateway_leaves_no_process_of_a_command_engine(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, config_text(tiny_model, ready_after=0.0))
    gateway = Gateway(config)
    try:
        assert gateway.post("/echo", {"prompt": "hi"}).status_code == 200
        tree = set(worker_pids(gateway.process.pid))
        assert len(tree) >= 2  # the guard and the server
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait(10)
        assert wait_until(lambda: not set(worker_pids(gateway.process.pid)), timeout=20)
    finally:
        gateway.__exit__()


def test_a_command_that_exits_while_starting_fails_the_load_with_its_output(
    tmp_path: Path,
) -> None:
    argv = [sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(3)"]
    config = write_config(
        tmp_path,
        f"""\
        models:
          broken:
            engine: command
            command: {{argv: {json.dumps(argv)}}}
        """,
    )
    with running(config) as gw:
        reply = gw.post("/broken", {"prompt": "hi"})
        assert reply.status_code in (502, 503), reply.text
        assert "no GPU here" in reply.json()["error"]["message"]
        assert "code 3" in reply.json()["error"]["message"]
        assert gw.models()["broken"]["state"] == "failed"
