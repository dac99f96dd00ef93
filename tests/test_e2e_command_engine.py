"""`engine: command`: a server the gateway starts by command, behind the same lifecycle and
API as its own worker. The server is a stand-in that echoes what it received
(tests/fixtures/echo_openai.py), or one that misbehaves as each request picks
(tests/fixtures/hostile_openai.py); tests/test_e2e_vllm.py runs real vLLM the same way."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ROOT, Gateway, running, wait_until, worker_pids, write_config

ECHO = ROOT / "tests" / "fixtures" / "echo_openai.py"
HOSTILE = ROOT / "tests" / "fixtures" / "hostile_openai.py"


def config_text(tiny_model: Path, ready_after: float = 0.5) -> str:
    argv = [sys.executable, str(ECHO), "{port}", "--ready-after", str(ready_after)]
    hostile = [sys.executable, str(HOSTILE), "{port}"]
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
      hostile:
        engine: command
        command: {{argv: {json.dumps(hostile)}, ready_path: /health}}
        limits: {{request_timeout_s: 30}}
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


def test_the_seed_route_sends_no_null_fields(gateway: Gateway) -> None:
    sent = json.loads(gateway.post("/echo", {"prompt": "hi"}).json()["response"])
    assert None not in sent.values()
    assert "seed" not in sent and "stream_options" not in sent and sent["stream"] is False
    streamed = events(gateway, "/echo", {"prompt": "hi", "stream": True})
    sent = json.loads(json.loads(streamed[-2])["response"])
    assert None not in sent.values()
    assert "seed" not in sent and sent["stream_options"] == {"include_usage": True}
    seeded = json.loads(gateway.post("/echo", {"prompt": "hi", "seed": 7}).json()["response"])
    assert seeded["seed"] == 7


# -- an engine that misbehaves (tests/fixtures/hostile_openai.py) ----------------------------


def events(gateway: Gateway, path: str, body: dict[str, Any]) -> list[str]:
    reply = gateway.post(path, body)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/event-stream")
    lines = reply.text.splitlines()
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "hostile", "messages": [{"role": "user", "content": text}], **extra}


def assert_engine_failed(reply: httpx.Response, *named: str) -> None:
    assert reply.status_code == 502, reply.text
    error = reply.json()["error"]
    assert error["code"] == "worker_failed" and error["type"] == "server_error"
    for part in named:
        assert part in error["message"]


@pytest.mark.parametrize(
    ("mode", "named"),
    [
        ("no-choices", "without choices"),
        ("empty-choices", "without choices"),
        ("bad-usage", "usage that is not token counts"),
        ("error-200", "HTTP 200 with an error: engine exploded"),
    ],
)
def test_a_seed_reply_that_is_not_a_chat_completion_is_a_502_naming_it(
    gateway: Gateway, mode: str, named: str
) -> None:
    assert_engine_failed(gateway.post("/hostile", {"prompt": mode}), "'hostile'", named)


def test_a_tool_call_reply_is_a_seed_reply_with_no_text(gateway: Gateway) -> None:
    reply = gateway.post("/hostile", {"prompt": "tool-call"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["response"] == "" and reply.json()["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("mode", ["not-json-event", "list-event"])
def test_a_seed_stream_event_that_is_not_a_chunk_is_an_error_event(
    gateway: Gateway, mode: str
) -> None:
    *_, error, done = events(gateway, "/hostile", {"prompt": mode, "stream": True})
    assert done == "[DONE]"
    assert json.loads(error)["status"] == 502
    assert json.loads(error)["error"]["code"] == "worker_failed"


@pytest.mark.parametrize(("mode", "kind"), [("html", "text/html"), ("json-for-stream", "json")])
def test_a_stream_answered_with_a_body_that_is_not_sse_is_a_502(
    gateway: Gateway, mode: str, kind: str
) -> None:
    for path, body in (
        ("/v1/chat/completions", chat(mode, stream=True)),
        ("/v1/completions", {"model": "hostile", "prompt": mode, "stream": True}),
        ("/hostile", {"prompt": mode, "stream": True}),
    ):
        assert_engine_failed(gateway.post(path, body), kind, "not an event stream")
    # Not asked to stream, the engine's HTML is not JSON: the same failure.
    assert_engine_failed(gateway.post("/hostile", {"prompt": "html"}), "not JSON")


def test_a_reply_or_a_stream_line_past_its_cap_is_a_502_and_the_engine_serves_on(
    gateway: Gateway,
) -> None:
    huge = gateway.post("/v1/chat/completions", chat("huge"))
    assert_engine_failed(huge, f"larger than {64 * 1024 * 1024} bytes")
    *_, error, done = events(gateway, "/v1/chat/completions", chat("long-line", stream=True))
    assert json.loads(error)["error"]["code"] == "worker_failed" and done == "[DONE]"
    assert f"longer than {16 * 1024 * 1024} bytes" in json.loads(error)["error"]["message"]
    assert gateway.post("/hostile", {"prompt": "hi"}).json()["response"] == "hey"


def test_an_answer_ends_at_done_though_the_engine_holds_its_connection_open(
    gateway: Gateway,
) -> None:
    # request_timeout_s is 30: a gateway that read on past [DONE] would answer 504 then.
    with httpx.Client(base_url=gateway.url, timeout=15.0) as client:
        for path, body in (
            ("/v1/chat/completions", chat("done-then-hang", stream=True)),
            ("/hostile", {"prompt": "done-then-hang", "stream": True}),
        ):
            reply = client.post(path, json=body)
            assert reply.status_code == 200 and "error" not in reply.text, reply.text
            assert reply.text.rstrip().endswith("data: [DONE]") and "done" in reply.text
    # Its lease was given back with the answer: the model is idle again.
    assert wait_until(lambda: gateway.models()["hostile"]["in_flight"] == 0, timeout=5)


def test_the_client_hears_the_model_name_it_asked_for_not_the_engines(gateway: Gateway) -> None:
    reply = gateway.post("/v1/chat/completions", chat("hi"))
    assert reply.status_code == 200 and reply.json()["model"] == "hostile"
    for path, body in (
        ("/v1/chat/completions", chat("hi", stream=True)),
        ("/v1/completions", {"model": "hostile", "prompt": "hi", "stream": True}),
    ):
        chunks = [json.loads(e) for e in events(gateway, path, body) if e != "[DONE]"]
        assert len(chunks) == 3 and {c["model"] for c in chunks} == {"hostile"}


@pytest.mark.parametrize(("mode", "status"), [("redirect", 302), ("unauthorized", 401)])
def test_an_engine_status_about_the_engine_itself_is_a_502_naming_it(
    gateway: Gateway, mode: str, status: int
) -> None:
    for path, body in (
        ("/v1/chat/completions", chat(mode)),
        ("/v1/chat/completions", chat(mode, stream=True)),
        ("/hostile", {"prompt": mode}),
    ):
        reply = gateway.post(path, body)
        assert_engine_failed(reply, f"the command engine of 'hostile' answered HTTP {status}")
        assert "location" not in reply.headers


def test_an_engine_refusing_the_request_itself_keeps_its_status(gateway: Gateway) -> None:
    reply = gateway.post("/v1/chat/completions", chat("unprocessable"))
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == "tools" and error["code"] == "bad_field"
