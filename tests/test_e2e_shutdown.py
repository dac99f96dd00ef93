"""No worker outlives its gateway, however the gateway ends."""

from __future__ import annotations

import contextlib
import json
import signal
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.support import Gateway, wait_until, worker_pids, write_config


def loaded_gateway(tiny_model: Path, tmp_path: Path) -> tuple[Gateway, list[int]]:
    config = write_config(tmp_path, f"models:\n  a:\n    source: {tiny_model}\n")
    gateway = Gateway(config)
    assert gateway.post("/a", {"prompt": "hi", "max_length": 2}).status_code == 200
    workers = gateway.workers()
    assert len(workers) == 1
    return gateway, workers


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_the_gateway_and_its_workers(tiny_model: Path, tmp_path: Path) -> None:
    gateway, workers = loaded_gateway(tiny_model, tmp_path)
    with gateway:
        assert gateway.stop(signal.SIGINT) in (0, -signal.SIGINT)
        assert not any(alive(pid) for pid in workers)
    assert "every worker has exited" in gateway.log.read_text()


def test_workers_exit_on_their_own_when_the_gateway_is_killed(
    tiny_model: Path, tmp_path: Path
) -> None:
    gateway, workers = loaded_gateway(tiny_model, tmp_path)
    with gateway:
        gateway.stop(signal.SIGKILL)  # no shutdown code runs in the gateway
        # The worker notices on its own (parent-death signal, stdin EOF). Generous bound.
        assert wait_until(lambda: not any(alive(pid) for pid in workers), timeout=20)
        assert worker_pids(gateway.process.pid) == []


def test_workers_exit_when_the_gateway_dies_mid_generation(
    tiny_model: Path, tmp_path: Path
) -> None:
    gateway, workers = loaded_gateway(tiny_model, tmp_path)

    def long_generation() -> None:
        with (
            httpx.Client(base_url=gateway.url, timeout=60) as client,
            contextlib.suppress(httpx.HTTPError),
        ):
            client.post("/a", json={"prompt": "long", "max_length": 1000})

    with gateway, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(long_generation)
        assert wait_until(lambda: gateway.models()["a"]["in_flight"] == 1, timeout=10)
        gateway.stop(signal.SIGKILL)
        assert wait_until(lambda: not any(alive(pid) for pid in workers), timeout=20)
        pending.result(timeout=30)  # the client saw the connection drop, not a hang


def test_sigterm_drains_in_flight_requests_refuses_new_ones_then_stops_workers(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, f"gateway: {{drain_timeout_s: 60}}\nmodels:\n  a:\n    source: {tiny_model}\n"
    )
    gateway = Gateway(config)
    body = {"prompt": "long", "max_length": 900, "temperature": 0}
    with gateway, ThreadPoolExecutor(3) as pool:
        assert gateway.post("/a", {"prompt": "warm", "max_length": 1}).status_code == 200
        workers = gateway.workers()
        in_flight = [pool.submit(gateway.client.post, "/a", json=body) for _ in range(2)]
        assert wait_until(lambda: gateway.models()["a"]["in_flight"] == 2, timeout=10)
        gateway.process.send_signal(signal.SIGTERM)
        # While it drains it still answers: not ready, and no new work.
        assert wait_until(lambda: gateway.client.get("/ready").status_code == 503, timeout=10)
        refused = gateway.post("/a", {"prompt": "late", "max_length": 2})
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert "shutting down" in refused.json()["error"]["message"]
        replies = [f.result(timeout=120) for f in in_flight]
        assert [r.status_code for r in replies] == [200, 200]  # finished, not cut
        assert gateway.process.wait(60) in (0, -signal.SIGTERM)
        assert not any(alive(pid) for pid in workers)
    assert "drain complete" in gateway.log.read_text()


def test_sigterm_after_a_reload_that_changed_limits_still_drains_every_stream(
    faulty_model: Path, tmp_path: Path
) -> None:
    fault = tmp_path / "fault"

    def text(concurrency: int) -> str:
        return f"""
        gateway: {{drain_timeout_s: 60, watch_config: false}}
        models:
          a:
            source: {faulty_model}
            trust_remote_code: true
            env: {{LLMGW_TEST_FAULT_FILE: "{fault}"}}
            limits: {{max_concurrency: {concurrency}}}
        """

    config = write_config(tmp_path, text(4))
    gateway = Gateway(config)
    body = {"prompt": "long", "max_length": 60, "stream": True}
    held = threading.Event()

    def stream() -> list[str]:
        events = []
        with (
            httpx.Client(base_url=gateway.url, timeout=120) as client,
            client.stream("POST", "/a", json=body) as reply,
        ):
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if not held.is_set():
                        held.set()
                        fault.write_text("hang")  # hold every stream, once
        return events

    with gateway, ThreadPoolExecutor(2) as pool:
        assert gateway.post("/a", {"prompt": "warm", "max_length": 1}).status_code == 200
        streams = [pool.submit(stream) for _ in range(2)]
        assert wait_until(lambda: gateway.models()["a"]["in_flight"] == 2, timeout=30)
        assert held.wait(30)
        config.write_text(textwrap.dedent(text(8)))
        assert gateway.client.post("/admin/reload").json()["changed"] == ["a"]
        gateway.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: gateway.client.get("/ready").status_code == 503, timeout=10)
        # Longer than the server's own 5 s grace for open connections after the drain:
        # a drain that lost count of these streams would let the server cut them now.
        time.sleep(6)
        assert gateway.process.poll() is None
        fault.unlink()
        events = [f.result(timeout=120) for f in streams]
        assert gateway.process.wait(60) in (0, -signal.SIGTERM)
    for one in events:
        assert one[-1] == "[DONE]"
        reply = json.loads(one[-2])
        assert "error" not in reply and reply["response"]
    assert "drain complete" in gateway.log.read_text()
