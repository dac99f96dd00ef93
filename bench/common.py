"""What every benchmark shares: the model, the environment, and the servers under test.

Every server runs as a child process on 127.0.0.1 in its own process group, with the same
environment (hubs offline), and is stopped, group and all, when its `with` block ends,
however it ends. The gateway runs on its defaults, threads included; every other server,
and the in-process baseline, computes with the thread count the gateway gives its worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "bench"
MODEL_NAME = "bench"
# A Llama a little bigger than the test fixture (hidden 64, 2 layers), so that the model's
# compute, not HTTP, dominates a request: hidden 256, 4 layers, 2.5 M parameters.
MODEL_SHAPE: dict[str, Any] = {"hidden": 256, "layers": 4, "init_std": 0.2, "seed": 0}


def peer_threads() -> int:
    """Intra-op threads of every server other than the gateway, and of the in-process
    baseline: the count the gateway's own policy gives its one CPU worker here (the cores
    less one for the HTTP side, gateway/backends/threads.py), so that every server computes with
    the same threads. On a 2-core machine that is 1, which is also each peer's fastest
    (measured: 2 threads, fighting the HTTP process and the clients for the cores, ran up
    to 10x slower)."""
    from gateway.backends.threads import available_cores, share
    from gateway.registry.config import ModelEntry

    return share(ModelEntry(source="-"), 1, available_cores()) or 1


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def bench_env() -> dict[str, str]:
    """The environment of every process the benchmarks start. No thread count: the gateway
    chooses its workers' own, and each peer is given `peer_threads()` explicitly."""
    home = WORK / "home"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home / "hf"),
        "MODELSCOPE_CACHE": str(home / "modelscope"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # never the caller's shell's
        env.pop(name, None)
    return env


def use_bench_env() -> None:
    """Apply the peers' environment to this process (for the in-process baselines)."""
    os.environ.update({**bench_env(), **thread_env(peer_threads())})


# A 8x larger one, for one question only: how the gateway's overhead ratio depends on how
# long the model computes (benchmark 1b).
LARGE_SHAPE: dict[str, Any] = {"hidden": 512, "layers": 8, "init_std": 0.2, "seed": 0}


def model_path(shape: dict[str, Any] | None = None) -> Path:
    """The benchmark model, built once into .cache/bench/ (deterministic for its shape)."""
    shape = shape or MODEL_SHAPE
    path = WORK / f"llama-h{shape['hidden']}-l{shape['layers']}-s{shape['seed']}"
    if not (path / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.worker.tiny",
                str(path),
                "--hidden",
                str(shape["hidden"]),
                "--layers",
                str(shape["layers"]),
                "--init-std",
                str(shape["init_std"]),
                "--seed",
                str(shape["seed"]),
            ],
            check=True,
            cwd=ROOT,
            env=bench_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server under test: a child process and how to tell that it answers."""

    name: str
    argv: list[str]
    port: int
    ready_path: str
    ready_status: tuple[int, ...] = (200,)
    cwd: Path = ROOT
    env: dict[str, str] = field(default_factory=dict)  # on top of bench_env()
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        log = (WORK / f"{self.name}-{self.port}.log").open("wb")
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env={**bench_env(), **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stop() ends its children too
        )
        log.close()

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from start() until `ready_path` answers; raise if it never does."""
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early; see {self.log_path()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + self.ready_path).status_code in self.ready_status:
                        return time.perf_counter() - self.started_at
                time.sleep(0.01)
        raise RuntimeError(f"{self.name} was not ready in {timeout:g}s; see {self.log_path()}")

    def log_path(self) -> Path:
        return WORK / f"{self.name}-{self.port}.log"

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@contextlib.contextmanager
def serving(server: Server, timeout: float = 120.0) -> Iterator[Server]:
    server.start()
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


# The one setting the benchmarks change on the gateway: batching whole `generate` calls, as
# the in-process baseline does, which shows the serving cost like for like.
PER_GENERATE = "batching: {continuous: false}"


def gateway_server(model: Path, settings: str = "") -> Server:
    """The gateway, started as a user would (`llm-gateway serve`), serving one model on its
    defaults: the entry names its source and nothing else, unless `settings` adds YAML keys
    (e.g. `batching: {continuous: false}`) to it."""
    port = free_port()
    WORK.mkdir(parents=True, exist_ok=True)
    config = WORK / f"models-{port}.yaml"
    extra = "".join(f"    {line}\n" for line in settings.splitlines() if line.strip())
    config.write_text(
        f"gateway:\n"
        f"  default_model: {MODEL_NAME}\n"
        f"  cache_dir: {WORK / 'gw-cache'}\n"
        f"models:\n"
        f"  {MODEL_NAME}:\n"
        f"    source: {model}\n"
        f"{extra}"
    )
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    return Server("gateway", [*argv, "--port", str(port)], port, "/health")


def seed_server(model: Path) -> Server:
    """The seed pattern: one FastAPI script, blocking generate in an async handler."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.seed_server", str(model), "--port", str(port)]
    # The seed app has no health route; any HTTP answer means uvicorn is serving, which the
    # script only starts after loading the model.
    return Server(
        "seed", argv, port, "/", ready_status=(200, 404, 405), env=thread_env(peer_threads())
    )


def hf_server(*, continuous_batching: bool = False) -> Server:
    """`transformers serve` on CPU; it loads a model lazily by the request's `model`.
    By default it does not batch; `--continuous-batching` is its documented option for
    serving many requests at once."""
    port = free_port()
    executable = Path(sys.executable).parent / "transformers"
    argv = [str(executable), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    if continuous_batching:
        argv.append("--continuous-batching")
    return Server("transformers-serve", argv, port, "/health", env=thread_env(peer_threads()))


def machine_notes() -> dict[str, str]:
    import platform

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "load average (1, 5, 15 min)": load,
    }


def worker_socket(gateway_url: str, model: str) -> str:
    """The unix socket of a ready model's worker, read from the worker's own environment
    (same machine, same user): the benchmark reads the worker's raw /stats through it."""
    import json

    pid = httpx.get(f"{gateway_url}/v1/models/{model}", timeout=10).json()["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    spec = next(e for e in environ if e.startswith(b"LLMGW_WORKER_SPEC="))
    return str(json.loads(spec.split(b"=", 1)[1])["socket"])
