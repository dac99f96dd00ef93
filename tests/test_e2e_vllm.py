"""Models served by real vLLM CPU processes through the gateway (`engine: vllm`, and vLLM
started as a third-party server by `engine: command`).

Needs vLLM's CPU build in its own environment (tests/fixtures/vllm_env.py; `make test-vllm`
runs every vLLM module).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.base import LoadSpec
from adapters.chat_template import ChatTemplateAdapter, TemplatePrompts
from tests.fixtures.vllm_env import START_S, VLLM_PYTHON, vllm_marks
from tests.support import Gateway, alive, running, wait_until, worker_pids, write_config

pytestmark = vllm_marks()
# The registry's chat template, over the tiny model's own (gateway/worker/tiny.py).
BRACKETS = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama vLLM's CPU attention can run (head_dim 64), slow enough per token
    that a client can leave, or the engine be killed, mid-generation."""
    from gateway.worker.tiny import build

    return build(tmp_path_factory.mktemp("vllm") / "llama", hidden=256, layers=6)


def entry_yaml(model: Path, **extra: str) -> str:
    lines = [
        f"    source: {model}",
        "    engine: vllm",
        f"    python_env: {{python: {VLLM_PYTHON}}}",
        '    env: {VLLM_CPU_KVCACHE_SPACE: "1"}',
        "    limits: {context_length: 1024, max_new_tokens: 1000}",
        "    engine_args: {enforce-eager: true}",
    ]
    return "\n".join(lines + [f"    {k}: {v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def gateway(vllm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("vllm-gw")
    config = write_config(
        directory,
        "gateway:\n  probe_interval_s: 2\n  load_timeout_s: 300\nmodels:\n  tiny-vllm:\n"
        + entry_yaml(
            vllm_model, system_prompt="'Answer briefly.'", chat_template=json.dumps(BRACKETS)
        )
        + "\n",
    )
    with running(config) as gw:
        gw.client.timeout = httpx.Timeout(START_S)
        yield gw


def chat(gw: Gateway, **fields: Any) -> httpx.Response:
    body = {"model": "tiny-vllm", "messages": [{"role": "user", "content": "hello"}], **fields}
    return gw.post("/v1/chat/completions", body)


def test_the_seed_route_chat_and_completions_are_served_by_vllm(gateway: Gateway) -> None:
    seed = gateway.post("/tiny-vllm", {"prompt": "hello", "max_length": 6, "temperature": 0})
    assert seed.status_code == 200, seed.text
    assert seed.json()["usage"]["completion_tokens"] == 6
    assert seed.json()["model"] == "tiny-vllm"
    card = gateway.models()["tiny-vllm"]
    assert card["state"] == "ready" and card["engine"] == "vllm"
    assert "--max-model-len" in card["runtime"]["argv"]
    reply = chat(gateway, max_tokens=5, temperature=0)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    # The registry's system prompt reached the engine: the prompt holds more tokens.
    bare = gateway.post(
        "/v1/completions", {"model": "tiny-vllm", "prompt": "hello", "max_tokens": 4}
    )
    assert bare.status_code == 200, bare.text
    assert reply.json()["usage"]["prompt_tokens"] > bare.json()["usage"]["prompt_tokens"]


def test_vllm_renders_the_registry_s_chat_template(gateway: Gateway, vllm_model: Path) -> None:
    from transformers import AutoTokenizer

    assert "--chat-template" in gateway.models()["tiny-vllm"]["runtime"]["argv"]
    reply = chat(gateway, max_tokens=2)
    assert reply.status_code == 200, reply.text
    tokenizer = AutoTokenizer.from_pretrained(str(vllm_model))
    rendered = "[system] Answer briefly.<|end|>\n[user] hello<|end|>\n[assistant] "
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert reply.json()["usage"]["prompt_tokens"] == len(expected)


def test_fields_the_gateway_does_not_read_reach_vllm(gateway: Gateway) -> None:
    reply = chat(
        gateway,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        return_tokens_as_token_ids=True,
    )
    assert reply.status_code == 200, reply.text
    content = reply.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    assert all(item["token"].startswith("token_id:") for item in content)
    assert all(len(item["top_logprobs"]) == 2 for item in content)
    # What vLLM itself refuses comes back with its status and message.
    refused = chat(gateway, max_tokens=2, temperature=0, n=2)
    assert refused.status_code == 400
    assert "n must be 1" in refused.json()["error"]["message"]
    # The gateway still checks what it reads: its own limits, and text everywhere.
    too_long = chat(gateway, max_tokens=10_000)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "max_tokens_exceeded"
    bad = gateway.client.post(
        "/v1/chat/completions",
        content=b'{"model": "tiny-vllm", "messages": [{"role": "user", "content": "hi"}],'
        b' "tools": [{"function": {"name": "\\ud800"}}]}',
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400 and "lone surrogate" in bad.json()["error"]["message"]


def test_vllm_renders_the_prompt_the_gateway_s_worker_renders(
    gateway: Gateway, vllm_model: Path
) -> None:
    """vLLM renders the registry's chat template itself; the gateway's own worker renders it
    over the `chat_template` adapter: the same token ids, system prompt and history included.
    (tests/test_e2e_vllm_moe.py compares the model's own template with `deepseek_moe`.)"""
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    reply = chat(gateway, messages=messages, max_tokens=1, return_token_ids=True)
    assert reply.status_code == 200, reply.text
    adapter = ChatTemplateAdapter(LoadSpec(vllm_model))
    adapter.tokenizer = adapter.load_tokenizer()
    system = {"role": "system", "content": "Answer briefly."}
    worker = TemplatePrompts(adapter, BRACKETS).chat_prompt([system, *messages])
    assert reply.json()["prompt_token_ids"] == worker.ids


def test_a_stream_relays_vllm_chunks_and_ends_with_done(gateway: Gateway) -> None:
    body = {"model": "tiny-vllm", "prompt": "hello", "max_tokens": 5, "stream": True}
    with gateway.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        data = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["model"] == "tiny-vllm" for c in chunks)
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 1
    seed = gateway.post("/tiny-vllm", {"prompt": "hello", "max_length": 4, "stream": True})
    assert seed.status_code == 200 and seed.text.startswith("data:"), seed.text


def test_sixteen_concurrent_clients_are_all_served(gateway: Gateway) -> None:
    def one(i: int) -> int:
        return chat(gateway, max_tokens=8, seed=i, temperature=1.0).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(16)))
    assert codes == [200] * 16


# Tokens the left stream asks for: about 4 s of decoding here, so the abort (the gateway
# seeing the client go, closing its upstream, vLLM seeing that) has seconds to arrive
# even on a box whose two cores the engine keeps busy.
LONG = 1000


def test_a_client_that_leaves_its_stream_aborts_it_in_vllm(gateway: Gateway) -> None:
    body = {
        "model": "tiny-vllm",
        "prompt": "hi",
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    assert chat(gateway, max_tokens=1).status_code == 200
    port = gateway.models()["tiny-vllm"]["runtime"]["port"]
    time.sleep(2.0)  # vLLM's counters lag its requests a little
    before = _metric(port, "vllm:generation_tokens_total")
    with gateway.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    assert wait_until(lambda: gateway.models()["tiny-vllm"]["in_flight"] == 0, timeout=10)
    assert wait_until(lambda: _running(port) == 0, timeout=30)
    # A short request after it: once it is counted, so is everything the left one made.
    after = chat(gateway, max_tokens=8, ignore_eos=True)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 8
    time.sleep(2.0)
    made = _metric(port, "vllm:generation_tokens_total") - before - 8
    assert 1 <= made < LONG, made  # a stream vLLM ran to its end would count all LONG


def _metric(port: int, name: str, label: str = "") -> float:
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(name + "{") and label in line
    )


def _running(port: int) -> float:
    return _metric(port, "vllm:num_requests_running")


def test_a_killed_vllm_fails_its_request_with_502_and_the_next_starts_a_fresh_one(
    gateway: Gateway,
) -> None:
    assert chat(gateway, max_tokens=2).status_code == 200
    old = set(worker_pids(gateway.process.pid))
    assert old
    body = {"model": "tiny-vllm", "prompt": "hi", "max_tokens": 480, "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool:
        replies = [pool.submit(gateway.post, "/v1/completions", body) for _ in range(8)]
        assert wait_until(lambda: gateway.models()["tiny-vllm"]["in_flight"] >= 1, timeout=10)
        engine = gateway.models()["tiny-vllm"]["pid"]  # the guard: below it, vLLM's tree
        for pid in old - {engine}:
            os.kill(pid, signal.SIGKILL)
        codes = [reply.result(60).status_code for reply in replies]
    assert 502 in codes and set(codes) <= {200, 502}, codes
    assert wait_until(lambda: not set(worker_pids(gateway.process.pid)) & old, timeout=30)
    again = chat(gateway, max_tokens=2)
    assert again.status_code == 200, again.text
    assert not set(worker_pids(gateway.process.pid)) & old


def test_vllm_started_by_command_unloads_when_idle_and_a_killed_gateway_leaves_no_process(
    vllm_model: Path, tmp_path: Path
) -> None:
    """vLLM as a third-party server: `engine: command` with its own argv."""
    argv = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "{model_path}",
        "--served-model-name",
        "{name}",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--enforce-eager",
    ]
    config = write_config(
        tmp_path,
        f"""\
        gateway:
          idle_unload_s: 2
          load_timeout_s: 300
        models:
          by-command:
            source: {vllm_model}
            engine: command
            command: {{argv: {json.dumps(argv)}, ready_path: /health}}
            env: {{VLLM_CPU_KVCACHE_SPACE: "1", VLLM_NO_USAGE_STATS: "1"}}
        """,
    )
    gateway = Gateway(config)
    try:
        gateway.client.timeout = httpx.Timeout(START_S)
        body = {"model": "by-command", "prompt": "hello", "max_tokens": 3}
        assert gateway.post("/v1/completions", body).status_code == 200
        first = set(worker_pids(gateway.process.pid))
        assert len(first) >= 2  # the guard, vLLM's server and its engine core
        assert wait_until(lambda: gateway.models()["by-command"]["state"] == "unloaded", 30)
        assert wait_until(lambda: not set(worker_pids(gateway.process.pid)), timeout=30)
        assert gateway.post("/v1/completions", body).status_code == 200
        tree = set(worker_pids(gateway.process.pid))
        assert tree and not tree & first
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait(10)
        assert wait_until(lambda: not alive(tree), timeout=30), "the engine's tree outlived it"
    finally:
        gateway.__exit__()
