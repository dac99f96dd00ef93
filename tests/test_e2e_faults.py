"""Worker faults through the real gateway: out of memory, crashes, hangs, time-outs, on both
batching paths (remote code batches per `generate`; a native model batches continuously)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import Gateway, wait_until, write_config


class Faults:
    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, kind: str) -> None:
        self.path.write_text(kind)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[Faults]:
    switch = Faults(tmp_path / "fault")
    yield switch
    switch.clear()


def config_with(
    faulty_model: Path,
    tiny_model: Path,
    faults: Faults,
    tmp_path: Path,
    gateway_extra: str = "",
    model_extra: str = "",
) -> Path:
    return write_config(
        tmp_path,
        f"""
        gateway:
          probe_interval_s: 0.5
          probe_failures: 2
          {gateway_extra}
        models:
          faulty:
            source: {faulty_model}
            trust_remote_code: true
            env: {{LLMGW_TEST_FAULT_FILE: "{faults.path}"}}
            {model_extra}
          healthy:
            source: {tiny_model}
        """,
    )


@pytest.fixture
def gateway(
    faulty_model: Path, tiny_model: Path, faults: Faults, tmp_path: Path
) -> Iterator[Gateway]:
    with Gateway(config_with(faulty_model, tiny_model, faults, tmp_path)) as gw:
        yield gw


def ask(gw: Gateway, model: str = "faulty", **extra: object) -> httpx.Response:
    return gw.post(f"/{model}", {"prompt": "hello", "max_length": 4, **extra})


def test_out_of_memory_in_generation_fails_that_request_and_the_worker_keeps_serving(
    gateway: Gateway, faults: Faults
) -> None:
    assert ask(gateway).status_code == 200
    [pid] = gateway.workers()
    faults.set("oom")
    reply = ask(gateway)
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "out_of_memory"
    assert "out of memory" in reply.json()["error"]["message"]
    faults.clear()
    assert ask(gateway).status_code == 200
    assert gateway.workers() == [pid]  # the same worker, still serving


def test_a_worker_killed_mid_request_answers_at_once_and_the_next_request_restarts_it(
    gateway: Gateway, faults: Faults
) -> None:
    assert ask(gateway).status_code == 200
    [first] = gateway.workers()
    faults.set("crash")
    started = time.monotonic()
    reply = ask(gateway)
    assert time.monotonic() - started < 10  # an answer, not a hang
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "worker_failed"
    faults.clear()
    assert ask(gateway).status_code == 200
    assert gateway.workers() != [first] and len(gateway.workers()) == 1
    assert ask(gateway, "healthy").status_code == 200


def test_a_stream_cut_by_a_crash_ends_with_an_error_event(gateway: Gateway, faults: Faults) -> None:
    assert ask(gateway).status_code == 200
    body = {"prompt": "hello", "max_length": 500, "stream": True}
    events: list[str] = []
    with gateway.client.stream("POST", "/faulty", json=body) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 1:
                    faults.set("crash")  # the stream has begun: now the worker dies
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "worker_failed"
    assert "delta" in json.loads(events[0])


def test_repeated_crashes_leave_the_model_failed_with_the_reason(
    gateway: Gateway, faults: Faults
) -> None:
    faults.set("crash")
    for _ in range(3):
        faults.clear()
        assert ask(gateway).status_code == 200
        faults.set("crash")
        assert ask(gateway).status_code == 502
    card = gateway.models()["faulty"]
    assert card["state"] == "failed"
    assert "3 crashes" in card["last_error"]
    refused = ask(gateway)
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert ask(gateway, "healthy").status_code == 200


def test_out_of_memory_while_loading_fails_the_model_not_the_gateway(
    gateway: Gateway, faults: Faults
) -> None:
    faults.set("oom_load")
    reply = ask(gateway)
    assert reply.status_code == 503
    assert "out of memory" in reply.json()["error"]["message"].lower()
    card = gateway.models()["faulty"]
    assert card["state"] == "failed" and "OutOfMemoryError" in card["last_error"]
    assert ask(gateway, "healthy").status_code == 200


def test_a_frozen_worker_is_found_by_the_health_probe_and_replaced(
    gateway: Gateway, faults: Faults
) -> None:
    assert ask(gateway).status_code == 200
    [frozen] = gateway.workers()
    os.kill(frozen, signal.SIGSTOP)
    try:
        assert wait_until(lambda: gateway.models()["faulty"]["pid"] != frozen, timeout=20)
        assert wait_until(lambda: frozen not in gateway.workers(), timeout=10)
    finally:
        if frozen in gateway.workers():
            os.kill(frozen, signal.SIGKILL)
    assert "health probe" in gateway.models()["faulty"]["last_error"]
    assert ask(gateway).status_code == 200


def test_a_stalled_generation_times_out_and_the_worker_is_replaced(
    faulty_model: Path, tiny_model: Path, faults: Faults, tmp_path: Path
) -> None:
    config = config_with(
        faulty_model, tiny_model, faults, tmp_path, model_extra="limits: {request_timeout_s: 2}"
    )
    with Gateway(config) as gw:
        assert ask(gw).status_code == 200
        [stuck] = gw.workers()
        faults.set("hang")
        reply = ask(gw)
        assert reply.status_code == 504
        assert "request_timeout_s=2" in reply.json()["error"]["message"]
        assert wait_until(lambda: stuck not in gw.workers(), timeout=20)
        faults.clear()
        assert ask(gw).status_code == 200


def test_a_full_queue_refuses_with_429_and_nobody_hangs(tiny_model: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f"""
        models:
          m:
            source: {tiny_model}
            limits: {{max_concurrency: 1, max_queue: 1}}
        """,
    )
    with Gateway(config) as gw, ThreadPoolExecutor(8) as pool:
        assert gw.post("/m", {"prompt": "warm", "max_length": 1}).status_code == 200
        replies = list(
            pool.map(
                lambda i: gw.post("/m", {"prompt": f"p{i}", "max_length": 200}, timeout=60),
                range(8),
            )
        )
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) >= 2 and set(statuses) == {200, 429}
        for refused in (r for r in replies if r.status_code == 429):
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"


def test_a_load_slower_than_load_timeout_answers_503_then_serves(
    tiny_model: Path, tmp_path: Path
) -> None:
    slow_python = tmp_path / "slow-python"
    slow_python.write_text(f'#!/bin/sh\nsleep 3\nexec {sys.executable} "$@"\n')
    slow_python.chmod(0o755)
    config = write_config(
        tmp_path,
        f"""
        gateway: {{load_timeout_s: 1}}
        models:
          m:
            source: {tiny_model}
            python_env: {{python: {slow_python}}}
        """,
    )
    with Gateway(config) as gw:
        reply = gw.post("/m", {"prompt": "hi", "max_length": 2})
        assert reply.status_code == 503
        assert reply.json()["error"]["code"] == "load_timeout"
        assert reply.headers["Retry-After"]
        assert wait_until(lambda: gw.models()["m"]["state"] == "ready", timeout=30)
        assert gw.post("/m", {"prompt": "hi", "max_length": 2}).status_code == 200


# -- the same faults on the continuous-batching path ----------------------------------------
# The tiny Llama is transformers-native, so its worker batches continuously; the fault hook
# (tests/fixtures/native_faults.py) reaches it through its entry's `env:`.


def native_config(tiny_model: Path, faults: Faults, tmp_path: Path, model_extra: str = "") -> Path:
    from tests.fixtures.native_faults import build_fault_hook

    hook = build_fault_hook(tmp_path / "fault-hook")
    return write_config(
        tmp_path,
        f"""
        gateway:
          probe_interval_s: 0.5
          probe_failures: 2
        models:
          native:
            source: {tiny_model}
            env: {{LLMGW_TEST_FAULT_FILE: "{faults.path}", PYTHONPATH: "{hook}"}}
            {model_extra}
          healthy:
            source: {tiny_model}
        """,
    )


@pytest.fixture
def native(tiny_model: Path, faults: Faults, tmp_path: Path) -> Iterator[Gateway]:
    with Gateway(native_config(tiny_model, faults, tmp_path)) as gw:
        assert ask(gw, "native").status_code == 200
        assert gw.models()["native"]["runtime"]["batching"] == "continuous"
        yield gw


def test_out_of_memory_in_a_decoding_step_fails_that_request_and_the_continuous_worker_serves_on(
    native: Gateway, faults: Faults
) -> None:
    [pid] = native.workers()
    faults.set("oom_step")
    reply = ask(native, "native")
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "out_of_memory"
    faults.clear()
    assert ask(native, "native").status_code == 200
    assert native.workers() == [pid]


def test_out_of_memory_in_a_prefill_fails_the_arriving_request_not_the_running_stream(
    native: Gateway, faults: Faults
) -> None:
    [pid] = native.workers()
    faults.set("slow")  # the stream is still decoding when the other request arrives
    body = {"prompt": "hello", "max_length": 200, "stream": True}
    events: list[str] = []
    arrived_at = 0
    with native.client.stream("POST", "/native", json=body) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
            if len(events) == 1 and not arrived_at:
                faults.set("slow oom_prefill")
                arrival = ask(native, "native")
                faults.set("slow")
                arrived_at = len(events)
    assert arrival.status_code == 503
    assert arrival.json()["error"]["code"] == "out_of_memory"
    assert events[-1] == "[DONE]" and len(events) > arrived_at + 10  # it went on decoding
    chunks = [json.loads(event) for event in events[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    final = chunks[-1]  # the seed route's whole reply
    assert final["status"] == 200 and final["finish_reason"] == "length"
    assert final["response"] == "".join(chunk.get("delta", "") for chunk in chunks[:-1])
    assert native.workers() == [pid]


def test_a_continuous_worker_killed_mid_request_answers_at_once_and_is_restarted(
    native: Gateway, faults: Faults
) -> None:
    [first] = native.workers()
    faults.set("crash")
    started = time.monotonic()
    reply = ask(native, "native")
    assert time.monotonic() - started < 10  # an answer, not a hang
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "worker_failed"
    faults.clear()
    assert ask(native, "native").status_code == 200
    assert native.workers() != [first] and len(native.workers()) == 1
    assert ask(native, "healthy").status_code == 200


def test_a_stalled_continuous_generation_times_out_and_the_worker_is_replaced(
    tiny_model: Path, faults: Faults, tmp_path: Path
) -> None:
    config = native_config(tiny_model, faults, tmp_path, "limits: {request_timeout_s: 2}")
    with Gateway(config) as gw:
        assert ask(gw, "native").status_code == 200
        assert gw.models()["native"]["runtime"]["batching"] == "continuous"
        [stuck] = gw.workers()
        faults.set("hang")
        reply = ask(gw, "native")
        assert reply.status_code == 504
        assert "request_timeout_s=2" in reply.json()["error"]["message"]
        assert wait_until(lambda: stuck not in gw.workers(), timeout=20)
        faults.clear()
        assert ask(gw, "native").status_code == 200
