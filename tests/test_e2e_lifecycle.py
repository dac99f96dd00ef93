"""Lifecycle through the real gateway: budgets, eviction, idle unload, admin API, reload."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.lifecycle.budget import RUNTIME_HEADROOM, human
from tests.support import Gateway, wait_until, write_config


def weights(model: Path) -> int:
    return (model / "model.safetensors").stat().st_size


def two_models(tiny_model: Path, tiny_model_b: Path, extra: str = "") -> str:
    budget = int(weights(tiny_model) * 1.5)  # room for one tiny model, not two
    return f"""
    gateway:
      default_model: a
      memory_budget: {{cpu: {budget}}}
    models:
      a:
        source: {tiny_model}
        limits: {{max_new_tokens: 2000}}
      b:
        source: {tiny_model_b}
    {extra}
    """


class WorkerCounter:
    """Samples the gateway's live workers in the background; remembers the most at once."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(self.gateway.workers()))
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most


def ask(gateway: Gateway, model: str, tokens: int = 4) -> httpx.Response:
    return gateway.post(f"/{model}", {"prompt": "hello", "max_length": tokens})


def test_alternating_models_under_a_one_model_budget_all_succeed_one_worker_at_a_time(
    tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, two_models(tiny_model, tiny_model_b))
    with Gateway(config) as gw:
        counter = WorkerCounter(gw)
        statuses = [ask(gw, name).status_code for name in ["a", "b", "a", "b", "a"]]
        assert counter.stop() == 1
        assert statuses == [200] * 5
        models = gw.models()
        assert models["a"]["state"] == "ready" and models["b"]["state"] == "unloaded"
        held = models["a"]["memory"]["held_bytes"]["cpu"]
        assert held == models["a"]["memory"]["measured"]["weights_bytes"]


def test_a_long_request_is_not_interrupted_when_another_model_is_asked_for(
    tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, two_models(tiny_model, tiny_model_b))
    with Gateway(config) as gw, ThreadPoolExecutor(2) as pool:
        assert ask(gw, "a", 1).status_code == 200
        long = pool.submit(ask, gw, "a", 900)
        assert wait_until(lambda: gw.models()["a"]["in_flight"] == 1)
        other = pool.submit(ask, gw, "b")
        assert wait_until(lambda: (gw.models()["b"]["progress"] or {}).get("stage") == "waiting")
        assert gw.models()["b"]["state"] == "starting"
        finished = long.result()
        assert finished.status_code == 200  # ran to its own end: EOS or its token limit
        assert finished.json()["finish_reason"] in ("stop", "length")
        assert other.result().status_code == 200
        assert gw.models()["a"]["state"] == "unloaded"


def test_a_model_larger_than_its_budget_is_refused_with_both_numbers(
    tiny_model: Path, tmp_path: Path
) -> None:
    budget = weights(tiny_model) // 2
    config = write_config(
        tmp_path,
        f"""
        gateway: {{memory_budget: {{cpu: {budget}}}}}
        models:
          a: {{source: {tiny_model}}}
        """,
    )
    with Gateway(config) as gw:
        reply = ask(gw, "a")
        assert reply.status_code == 503
        message = reply.json()["error"]["message"]
        need = int(weights(tiny_model) * RUNTIME_HEADROOM)
        assert (
            f"needs {human(need)} on device cpu, more than its budget of {human(budget)}" in message
        )
        assert gw.workers() == []


def test_idle_unload_ends_the_worker_process(tiny_model: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path, f"models:\n  a:\n    source: {tiny_model}\n    idle_unload_s: 1\n"
    )
    with Gateway(config) as gw:
        assert ask(gw, "a").status_code == 200
        [pid] = gw.workers()
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=15)
        assert gw.models()["a"]["state"] == "unloaded"
        assert ask(gw, "a").status_code == 200  # and it comes back on demand


def test_keep_alive_zero_unloads_right_after_the_request(tiny_model: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, f"models:\n  a:\n    source: {tiny_model}\n")
    with Gateway(config) as gw:
        reply = gw.post(
            "/v1/chat/completions",
            {
                "model": "a",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "keep_alive": 0,
            },
        )
        assert reply.status_code == 200
        assert wait_until(lambda: gw.workers() == [], timeout=15)
        assert gw.post("/a", {"prompt": "x", "max_length": 2, "keep_alive": -1}).status_code == 200
        time.sleep(1.5)
        assert len(gw.workers()) == 1


def test_admin_load_unload_and_the_event_stream(tiny_model: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, f"models:\n  a:\n    source: {tiny_model}\n")
    with Gateway(config) as gw:
        events: list[dict[str, object]] = []

        def listen() -> None:
            with httpx.stream("GET", f"{gw.url}/admin/events", timeout=30) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        if events[-1].get("state") == "unloaded":
                            return

        listener = threading.Thread(target=listen)
        listener.start()
        assert wait_until(lambda: bool(events))  # the snapshot arrived: subscribed
        loaded = gw.client.post("/admin/models/a/load")
        assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
        assert len(gw.workers()) == 1
        unloaded = gw.client.post("/admin/models/a/unload")
        assert unloaded.json()["state"] == "unloaded" and gw.workers() == []
        listener.join(30)
        states = [e["state"] for e in events if e["type"] == "state"]
        assert states == ["starting", "ready", "draining", "unloaded"]
        assert gw.client.post("/admin/models/zzz/load").status_code == 404


@pytest.fixture(params=[True])
def reloading(
    request: pytest.FixtureRequest, tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> Iterator[tuple[Gateway, Path]]:
    watch = "true" if request.param else "false"
    config = write_config(
        tmp_path,
        f"""
        gateway: {{default_model: a, watch_config: {watch}}}
        models:
          a: {{source: {tiny_model}}}
          b: {{source: {tiny_model_b}}}
          c: {{source: {tiny_model}}}
        """,
    )
    with Gateway(config) as gw:
        yield gw, config


def test_editing_the_file_reloads_every_case(
    reloading: tuple[Gateway, Path], tiny_model: Path, tiny_model_b: Path
) -> None:
    gw, config = reloading
    for name in "abc":
        assert ask(gw, name).status_code == 200
    pids = {name: card["pid"] for name, card in gw.models().items()}
    config.write_text(
        f"""
gateway: {{default_model: d}}
models:
  a: {{source: {tiny_model}}}
  b: {{source: {tiny_model_b}, generation: {{max_new_tokens: 3}}}}
  d: {{source: {tiny_model_b}}}
"""
    )
    assert wait_until(lambda: "d" in gw.models(), timeout=10)
    models = gw.models()
    assert set(models) == {"a", "b", "d"}  # c removed, d added
    assert models["a"]["pid"] == pids["a"] and models["a"]["state"] == "ready"  # untouched
    assert wait_until(lambda: not os.path.exists(f"/proc/{pids['c']}"))  # c drained and stopped
    assert ask(gw, "c").status_code == 404
    reply = gw.post("/b", {"prompt": "hello"}).json()  # b restarted with its new entry
    assert reply["usage"]["completion_tokens"] == 3
    assert gw.models()["b"]["pid"] != pids["b"]
    assert gw.post("/", {"prompt": "hello", "max_length": 2}).json()["model"] == "d"


def test_an_invalid_file_is_rejected_whole_and_the_old_config_stays(
    reloading: tuple[Gateway, Path],
) -> None:
    gw, config = reloading
    good = config.read_text()
    config.write_text(good.replace("default_model: a", "default_model: nope"))
    assert wait_until(lambda: gw.client.get("/admin/config").json()["last_error"], timeout=10)
    described = gw.client.get("/admin/config").json()
    assert "'nope' is not a model" in described["last_error"]
    assert described["registry"]["gateway"]["default_model"] == "a"
    assert gw.post("/", {"prompt": "x", "max_length": 1}).json()["model"] == "a"
    assert "previous configuration stays" in gw.log.read_text()
    rejected = gw.client.post("/admin/reload")
    assert rejected.status_code == 400 and rejected.json()["error"]["code"] == "invalid_config"


@pytest.mark.parametrize("reloading", [False], indirect=True)  # no file watcher
def test_admin_reload_and_sighup_apply_the_file(reloading: tuple[Gateway, Path]) -> None:
    gw, config = reloading
    text = config.read_text()

    def default() -> str:
        return str(gw.post("/", {"prompt": "x", "max_length": 1}).json()["model"])

    config.write_text(text.replace("default_model: a", "default_model: b"))
    time.sleep(1.5)
    assert default() == "a"  # nothing watches the file
    reply = gw.client.post("/admin/reload").json()
    assert reply["applied"] is True and reply["unchanged"] == ["a", "b", "c"]
    assert default() == "b"
    assert gw.client.post("/admin/reload").json()["applied"] is False
    config.write_text(text)
    gw.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: default() == "a")


def racing(tiny_model: Path, tiny_model_b: Path, tokens: int, with_b: bool = True) -> str:
    b = f"  b: {{source: {tiny_model_b}}}\n" if with_b else ""
    return (
        "gateway: {watch_config: false}\nmodels:\n"
        f"  a: {{source: {tiny_model}, generation: {{max_new_tokens: {tokens}}}}}\n{b}"
    )


def test_requests_waiting_for_loads_through_a_reload_race_are_served_or_404_never_499(
    tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, racing(tiny_model, tiny_model_b, 3))
    with Gateway(config) as gw, ThreadPoolExecutor(32) as pool:

        def ask_a() -> httpx.Response:
            return gw.post("/a", {"prompt": "hello"})

        a_replies = [pool.submit(ask_a) for _ in range(8)]
        b_replies = [pool.submit(ask, gw, "b", 2) for _ in range(4)]
        assert wait_until(lambda: {c["state"] for c in gw.models().values()} == {"starting"})
        for i in range(16):  # each rewrite changes a (and the first removes b) while it loads
            config.write_text(racing(tiny_model, tiny_model_b, 4 + i % 2, with_b=False))
            assert gw.client.post("/admin/reload").json()["applied"] is True
            a_replies.append(pool.submit(ask_a))
            time.sleep(0.2)
        config.write_text(racing(tiny_model, tiny_model_b, 3, with_b=False))
        assert gw.client.post("/admin/reload").json()["changed"] == ["a"]
        a_done = [f.result(timeout=120) for f in a_replies]
        b_done = [f.result(timeout=120) for f in b_replies]
    assert [r.status_code for r in b_done] == [404] * 4
    assert [r.status_code for r in a_done] == [200] * len(a_done)
    assert {r.json()["usage"]["completion_tokens"] for r in a_done} == {3}  # the last entry


def test_requests_waiting_for_a_load_that_is_unloaded_get_503_with_retry_after(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, f"models:\n  a:\n    source: {tiny_model}\n")
    with Gateway(config) as gw, ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(ask, gw, "a") for _ in range(3)]
        waiting.append(pool.submit(gw.client.post, "/admin/models/a/load"))
        assert wait_until(lambda: gw.models()["a"]["state"] == "starting")
        assert gw.client.post("/admin/models/a/unload").json()["state"] == "unloaded"
        replies = [f.result(timeout=60) for f in waiting]
        assert [r.status_code for r in replies] == [503] * 4
        assert all(int(r.headers["Retry-After"]) >= 1 for r in replies)
        assert all("unloaded while it loaded" in r.json()["error"]["message"] for r in replies)
        assert ask(gw, "a").status_code == 200  # and the next request loads it


def test_a_model_loaded_by_the_admin_api_stays_past_the_first_reaper_pass(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, f"models:\n  a:\n    source: {tiny_model}\n    idle_unload_s: 4\n"
    )
    with Gateway(config) as gw:
        assert gw.client.post("/admin/models/a/load").json()["state"] == "ready"
        time.sleep(1.5)  # three reaper passes (every 0.5 s), well within idle_unload_s
        assert gw.models()["a"]["state"] == "ready" and len(gw.workers()) == 1
        assert wait_until(lambda: gw.models()["a"]["state"] == "unloaded", timeout=20)
