"""A worker process as the gateway starts it: its socket, its environment, its run directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.support import ROOT, Gateway, free_port, wait_until, write_config


def ask(gw: Gateway, model: str = "a") -> httpx.Response:
    return gw.post(f"/{model}", {"prompt": "hello", "max_length": 3})


def registry(faulty_model: Path, fault_file: Path, *, with_a: bool = True) -> str:
    model = f"""
          a:
            source: {faulty_model}
            trust_remote_code: true
            env: {{LLMGW_TEST_FAULT_FILE: "{fault_file}"}}
    """
    return f"""
        gateway: {{watch_config: false, drain_timeout_s: 60}}
        models:
          b: {{source: {faulty_model}, trust_remote_code: true}}
{model if with_a else ""}
    """


def test_a_model_added_back_while_its_old_worker_drains_keeps_serving_after_the_drain(
    faulty_model: Path, tmp_path: Path
) -> None:
    hang = tmp_path / "hang"
    config = write_config(tmp_path, registry(faulty_model, hang))
    with Gateway(config) as gw, ThreadPoolExecutor(6) as pool:
        assert ask(gw).status_code == 200
        old_pid = gw.models()["a"]["pid"]
        hang.write_text("hang")
        in_flight = pool.submit(ask, gw)  # holds the old worker in its drain
        assert wait_until(lambda: gw.models()["a"]["in_flight"] == 1, timeout=10)
        config.write_text(registry(faulty_model, hang, with_a=False))
        assert gw.client.post("/admin/reload").json()["removed"] == ["a"]
        # Back, as a new entry (its own fault file) with a new worker, while the old drains.
        config.write_text(registry(faulty_model, tmp_path / "no-fault"))
        assert gw.client.post("/admin/reload").json()["added"] == ["a"]
        assert ask(gw).status_code == 200
        assert gw.models()["a"]["pid"] != old_pid
        hang.unlink()  # the old request finishes; its worker stops
        assert in_flight.result(timeout=30).status_code == 200
        assert wait_until(lambda: not os.path.exists(f"/proc/{old_pid}"), timeout=20)
        # Concurrent requests open new connections to the new worker: its socket is there.
        assert [r.status_code for r in pool.map(lambda _: ask(gw), range(6))] == [200] * 6
        assert gw.models()["a"]["state"] == "ready"


def test_workers_get_no_key_variable_and_only_allowed_ones(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f"""
        gateway:
          auth: {{api_keys_env: GW_TEST_KEYS, admin_keys_env: HF_ADMIN_KEYS}}
        models:
          a:
            source: {tiny_model}
            env: {{MODEL_SETTING: "from the registry"}}
          remote: {{upstream: {{url: "http://127.0.0.1:9", api_key_env: TORCH_UPSTREAM_KEY}}}}
        """,
    )
    secrets = {
        "GW_TEST_KEYS": "user-key",
        "HF_ADMIN_KEYS": "admin-key",  # an allowed prefix, but a key source
        "TORCH_UPSTREAM_KEY": "upstream-key",  # likewise
        "AWS_SECRET_ACCESS_KEY": "not the worker's business",
    }
    with Gateway(config, env={**secrets, "HF_ENDPOINT": "http://hub.invalid"}) as gw:
        headers = {"Authorization": "Bearer user-key"}
        assert gw.post("/a", {"prompt": "hi", "max_length": 2}, headers=headers).status_code == 200
        [pid] = gw.workers()
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        environ = dict(item.decode().split("=", 1) for item in raw if item)
    assert not set(secrets) & set(environ)
    assert not {"user-key", "admin-key", "upstream-key"} & set(environ.values())
    assert environ["MODEL_SETTING"] == "from the registry"
    assert environ["HF_ENDPOINT"] == "http://hub.invalid"  # what the hubs read still passes
    assert environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert environ["CUDA_VISIBLE_DEVICES"] == ""
    assert environ["PATH"] == os.environ["PATH"]


def serve_until_exit(config: Path, env: dict[str, str], log: Path) -> int:
    """`serve` run to its end (killed after a minute); its exit code, its output in `log`."""
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*command, "--port", str(free_port())],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return -1


def test_the_run_directory_of_a_killed_gateway_is_removed_by_the_next_one(
    tiny_model: Path, tmp_path: Path
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    config = write_config(tmp_path, f"models:\n  a: {{source: {tiny_model}}}\n")
    with Gateway(config, env={"TMPDIR": str(temp)}) as first:
        [left] = list(temp.glob("llmgw-*"))
        first.stop(signal.SIGKILL)
    assert left.exists()  # nothing ran to remove it
    with Gateway(config, env={"TMPDIR": str(temp)}) as second:
        assert not left.exists()
        [own] = list(temp.glob("llmgw-*"))
        assert (own / "owner").read_text().split()[0] == str(second.process.pid)
    assert list(temp.glob("llmgw-*")) == []  # a clean stop removes its own


def test_a_temporary_directory_too_long_for_a_socket_fails_at_start(
    tiny_model: Path, tmp_path: Path
) -> None:
    temp = tmp_path / ("t" * (100 - len(str(tmp_path))))
    temp.mkdir()
    config = write_config(tmp_path, f"models:\n  a: {{source: {tiny_model}}}\n")
    log = tmp_path / "serve.log"
    assert serve_until_exit(config, {"TMPDIR": str(temp)}, log) == 2
    output = log.read_bytes()
    assert b"too long for a unix socket path" in output and b"TMPDIR" in output
    assert list(temp.iterdir()) == []


def test_a_long_temporary_directory_and_a_64_character_name_still_serve(
    tiny_model: Path, tmp_path: Path
) -> None:
    name = "m" * 64
    temp = tmp_path / ("t" * (64 - len(str(tmp_path))))  # room for a socket, not for the name
    temp.mkdir()
    config = write_config(tmp_path, f"models:\n  {name}: {{source: {tiny_model}}}\n")
    with Gateway(config, env={"TMPDIR": str(temp)}) as gw:
        assert ask(gw, name).status_code == 200
