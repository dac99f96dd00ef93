"""Test helpers: run the real gateway as a subprocess on a free port, find its workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, text: str, name: str = "models.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


class Gateway:
    """`python -m gateway serve` on a free port; stop() is SIGTERM and a wait."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], object] | None = None,
        args: Sequence[str] = (),
        healthy_within_s: float = 30.0,
    ) -> None:
        self.config = config
        self.on_cluster = "--cluster" in args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = config.parent / f"gateway-{self.port}.log"
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(config),
                "--port",
                str(self.port),
                *args,
            ],
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,  # e.g. lower a resource limit of the gateway process
        )
        self.client = httpx.Client(base_url=self.url, timeout=60.0)
        try:
            self._wait_healthy(healthy_within_s)
        except BaseException:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.client.close()
            self._log_file.close()
            raise

    def _wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/health", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not come up:\n{self.log.read_text()}")

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, json=body, **kwargs)

    def models(self) -> dict[str, dict[str, Any]]:
        data = self.client.get("/v1/models").json()["data"]
        return {card["id"]: card for card in data}

    def workers(self) -> list[int]:
        return worker_pids(self.process.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        finally:
            self.client.close()
            self._log_file.close()
        return code

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.stop()
        self.client.close()
        self._log_file.close()
        for pid in worker_pids(self.process.pid):  # never leave a stray worker behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def worker_pids(gateway_pid: int) -> list[int]:
    """Live worker processes started by the gateway with this pid (found via /proc)."""
    found = []
    marker = f"LLMGW_PARENT_PID={gateway_pid}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has exited)."""
    found = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.add(pid)
    return found


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@contextlib.contextmanager
def running(config: Path, env: dict[str, str] | None = None) -> Iterator[Gateway]:
    with Gateway(config, env) as gateway:
        yield gateway


def scrape(gateway: Gateway) -> Samples:
    """Every sample of the gateway's GET /metrics, by name and labels."""
    reply = gateway.client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
