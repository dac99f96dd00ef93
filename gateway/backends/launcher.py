"""Start a model's backend: a worker process on a unix socket, a started engine (vLLM or
a command, `gateway/backends/engines/`), or a remote upstream.

A worker is `python -m gateway.worker` under the model's interpreter, in its own session
(so a terminal's Ctrl-C reaches the gateway, which then stops its workers in order), with
stdin held open by the gateway (EOF tells the worker the gateway is gone), a JSON-lines
control channel on stdout and its log on stderr, relayed into the gateway's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import gateway
from gateway.backends import rundir, threads
from gateway.backends.engines import argv as engine_argv
from gateway.backends.engines.process import HOST, EngineFailed, EngineProcess, exit_code, free_port
from gateway.backends.envs import EnvironmentBuildFailed, EnvironmentMissing, ensure_python
from gateway.backends.upstream import Upstream
from gateway.backends.workerenv import worker_environment
from gateway.registry.config import ModelEntry
from gateway.registry.hub import locate, missing_message
from gateway.worker.spec import SPEC_ENV, WorkerSpec

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]


class LoadFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class Backend(Protocol):
    """A started model. `exited` completes when it stops serving for good; `probe_path`
    is its health probe (None: not probed, as a remote upstream is not ours to restart);
    `scales_itself`: a cluster deployment, whose replicas come and go on their own (it is
    never unloaded for being idle, and a lost replica is not the model's exit)."""

    upstream: Upstream
    runtime: dict[str, Any]
    pid: int | None
    probe_path: str | None
    scales_itself: bool

    @property
    def exited(self) -> asyncio.Future[int]: ...
    async def stop(self, grace_s: float) -> None: ...


@runtime_checkable
class UpdatesInPlace(Backend, Protocol):
    """A backend that takes a changed entry without stopping (a cluster deployment, whose
    replicas roll over): requests keep being served while it updates."""

    async def update(self, entry: ModelEntry, on_progress: Progress) -> None: ...


class Launcher(Protocol):
    async def launch(self, name: str, entry: ModelEntry, on_progress: Progress) -> Backend: ...


class Killable(Protocol):
    def kill_now(self) -> None: ...


class RemoteBackend:
    pid: int | None = None
    probe_path: str | None = None
    scales_itself = False

    def __init__(self, name: str, entry: ModelEntry) -> None:
        assert entry.upstream is not None
        key = os.environ.get(entry.upstream.api_key_env) if entry.upstream.api_key_env else None
        self.upstream = Upstream(
            entry.upstream.url.rstrip("/"), api_key=key, label=f"upstream of {name!r}"
        )
        self.runtime: dict[str, Any] = {"remote": entry.upstream.url}
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._exited

    async def stop(self, grace_s: float) -> None:
        await self.upstream.aclose()
        if not self._exited.done():
            self._exited.set_result(0)


class WorkerProcess:
    scales_itself = False

    def __init__(self, name: str, process: asyncio.subprocess.Process, socket: str) -> None:
        self.name = name
        self.process = process
        self.pid: int | None = process.pid
        self.socket = socket
        self.upstream = Upstream("http://worker", uds=socket, label=f"the worker of {name!r}")
        self.probe_path: str | None = "/health"
        self.runtime: dict[str, Any] = {}
        self.stderr_tail: deque[str] = deque(maxlen=30)
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._exited

    async def wait_ready(self, on_progress: Progress) -> None:
        """Follow the control channel until the worker is ready; raise LoadFailed if not."""
        assert self.process.stdout is not None and self.process.stderr is not None
        self._tasks.append(asyncio.create_task(self._relay_stderr(self.process.stderr)))
        self._tasks.append(asyncio.create_task(self._watch_exit()))
        while line := await self.process.stdout.readline():
            message = _parse(line)
            if message.get("event") == "progress":
                on_progress(message)
            elif message.get("event") == "ready":
                self.runtime = dict(message.get("runtime") or {})
                self._tasks.append(asyncio.create_task(self._drain(self.process.stdout)))
                return
            elif message.get("event") == "failed":
                await self.stop(5.0)
                raise LoadFailed(str(message.get("kind")), str(message.get("message")))
        code = await self._exit_code()
        await asyncio.sleep(0.05)  # let the stderr relay catch the last lines
        tail = " | ".join(list(self.stderr_tail)[-5:])
        raise LoadFailed("crashed", f"the worker exited with code {code} while loading: {tail}")

    async def stop(self, grace_s: float) -> None:
        if self.process.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._exit_code(), grace_s)
            except asyncio.TimeoutError:
                log.warning(
                    "worker of %r ignored SIGTERM for %.0fs; killing it", self.name, grace_s
                )
                self._signal(signal.SIGKILL)
                await self._exit_code()
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        await self.upstream.aclose()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        await self._settle_tasks()

    async def _settle_tasks(self) -> None:
        """Let the relays read the dead worker's last lines, then end what still runs (a
        child the worker left behind may hold its pipes open)."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(self._tasks, timeout=1.0)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
            # Close the pipes the child still holds: asyncio offers no public way, and an
            # open transport is a descriptor lost for as long as that child lives.
            transport = getattr(self.process, "_transport", None)
            if transport is not None:
                transport.close()

    def kill_now(self) -> None:
        """Last resort at interpreter exit: no event loop needed."""
        if self.process.returncode is None:
            self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    async def _watch_exit(self) -> None:
        code = await self._exit_code()
        if not self._exited.done():
            self._exited.set_result(code)

    async def _exit_code(self) -> int:
        return await exit_code(self.process)

    async def _relay_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                self.stderr_tail.append(text)
                log.info("[%s] %s", self.name, text)

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass


class ProcessLauncher:
    """Starts local workers; remote entries get a `RemoteBackend`."""

    def __init__(
        self,
        run_dir: Path,
        cache_dir: Path,
        envs_dir: Path,
        key_sources: Callable[[], Iterable[str]] = tuple,
        *,
        auto_build_envs: bool = True,
    ) -> None:
        self.run_dir = run_dir
        self.cache_dir = cache_dir
        self.envs_dir = envs_dir
        self.key_sources = key_sources  # read at each launch: a reload may name new ones
        self.auto_build_envs = auto_build_envs
        self.live: set[Killable] = set()
        self._shim = _package_shim(run_dir)
        self._instances = itertools.count(1)
        self.cores = threads.CoreShares()

    async def launch(self, name: str, entry: ModelEntry, on_progress: Progress) -> Backend:
        if entry.is_remote:
            return RemoteBackend(name, entry)
        python = await self._python(name, entry, on_progress)
        if entry.engine != "transformers":
            return await self._launch_engine(name, entry, python, on_progress)
        # Every instance has its own socket: a worker that is still draining after its
        # model was removed, or replaced, removes only its own when it stops.
        socket = rundir.socket_path(self.run_dir, next(self._instances))
        spec = self._spec(name, entry, socket)
        share = self.cores.claim(entry)
        try:
            process = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "gateway.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**self._environment(entry, spec), **share.env},
                start_new_session=True,
                limit=2**20,
            )
        except BaseException:
            share.release()
            raise
        worker = WorkerProcess(name, process, socket)
        worker.exited.add_done_callback(lambda _: share.release())
        self.live.add(worker)
        worker.exited.add_done_callback(lambda _: self.live.discard(worker))
        try:
            await worker.wait_ready(on_progress)
        except BaseException:
            await worker.stop(2.0)
            self.live.discard(worker)
            raise
        return worker

    async def _python(self, name: str, entry: ModelEntry, on_progress: Progress) -> str:
        if entry.engine == "command":
            return sys.executable  # unused: a command names its own program
        try:
            return await ensure_python(
                name, entry, self.envs_dir, auto_build=self.auto_build_envs, on_progress=on_progress
            )
        except (EnvironmentMissing, EnvironmentBuildFailed) as exc:
            raise LoadFailed("environment", str(exc)) from exc

    async def _launch_engine(
        self, name: str, entry: ModelEntry, python: str, on_progress: Progress
    ) -> Backend:
        """vLLM or a command: its argv from the entry, a private port, its guard."""
        model_path = await self._weights(name, entry, on_progress) if entry.source else ""
        port = free_port()
        sequence = next(self._instances)
        socket = rundir.socket_path(self.run_dir, sequence)
        try:
            if entry.engine == "vllm":
                template = None
                if entry.chat_template is not None:
                    template = rundir.chat_template_path(
                        self.run_dir, sequence, entry.chat_template
                    )
                # Off the event loop: sizing the GPUs for `max_memory` runs nvidia-smi.
                args = await asyncio.to_thread(
                    engine_argv.vllm_argv, name, entry, model_path, HOST, port, None, template
                )
                argv = [python, *args]
                ready_path = "/health"
            else:
                assert entry.command is not None
                values = {
                    "port": str(port),
                    "host": HOST,
                    "model_path": model_path,
                    "socket": socket,
                    "name": name,
                }
                argv = engine_argv.command_argv(entry.command.argv, values)
                ready_path = entry.command.ready_path
        except engine_argv.EngineConfigError as exc:
            raise LoadFailed("config", str(exc)) from exc
        over_socket = entry.command is not None and entry.command.names("socket")
        label = f"the {entry.engine} engine of {name!r}"
        if over_socket:
            upstream = Upstream("http://engine", uds=socket, label=label)
        else:
            upstream = Upstream(f"http://{HOST}:{port}", label=label)
        engine = await EngineProcess.start(
            name, entry.engine, argv, self._engine_environment(entry), upstream, ready_path
        )
        self.live.add(engine)
        engine.exited.add_done_callback(lambda _: self.live.discard(engine))
        try:
            await engine.wait_ready(on_progress)
        except EngineFailed as exc:
            await engine.stop(2.0)
            raise LoadFailed("crashed", str(exc)) from exc
        except BaseException:
            await engine.stop(2.0)
            raise
        engine.runtime.update({"port": None if over_socket else port, "argv": argv[1:]})
        return engine

    async def _weights(self, name: str, entry: ModelEntry, on_progress: Progress) -> str:
        """The local directory of the entry's weights, downloaded first if need be (the
        engine is given a path, never a hub id: one cache, one download, for every engine)."""
        assert entry.source is not None
        if entry.hub == "local":
            return entry.source
        found = locate(entry, entry.source, self.cache_dir)
        if found is not None:
            return str(found)
        if not entry.auto_pull:
            raise LoadFailed("weights", missing_message(name, entry, entry.source))
        on_progress({"event": "progress", "stage": "download", "message": "downloading"})
        request = json.dumps(
            {"name": name, "entry": entry.model_dump(mode="json"), "cache": str(self.cache_dir)}
        )
        pull = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.worker.pull",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await pull.communicate(request.encode())
        if pull.returncode != 0:
            raise LoadFailed("weights", err.decode(errors="replace").strip()[-500:])
        return out.decode().strip().splitlines()[-1]

    def _engine_environment(self, entry: ModelEntry) -> dict[str, str]:
        """The worker's allow-list, the entry's `env:`, and vLLM's quiet defaults (no usage
        reports, no hub: it is given a local path)."""
        devices = entry.devices if isinstance(entry.devices, list) else []
        defaults = {
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        settings = {
            "PYTHONUNBUFFERED": "1",
            "DO_NOT_TRACK": "1",
            "LLMGW_PARENT_PID": str(os.getpid()),  # every process of the tree inherits it
            "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in devices),
        }
        base = {**defaults, **os.environ}
        return worker_environment(base, self.key_sources(), entry.env, settings)

    def kill_all(self) -> None:
        for worker in list(self.live):
            worker.kill_now()

    def _spec(self, name: str, entry: ModelEntry, socket: str) -> WorkerSpec:
        assert entry.source is not None
        gpus = len(entry.devices) if isinstance(entry.devices, list) else 0
        return WorkerSpec(
            name=name,
            entry=entry,
            weights=entry.source,
            socket=socket,
            cache_dir=str(self.cache_dir),
            gpus=gpus,
            max_memory=_local_max_memory(entry),
        )

    def _environment(self, entry: ModelEntry, spec: WorkerSpec) -> dict[str, str]:
        """An allow-listed environment (backends/workerenv.py) plus what this worker needs."""
        inherited_path = entry.env.get("PYTHONPATH", os.environ.get("PYTHONPATH"))
        devices = entry.devices if isinstance(entry.devices, list) else []
        settings = {
            SPEC_ENV: spec.model_dump_json(),
            "LLMGW_PARENT_PID": str(os.getpid()),
            "PYTHONPATH": os.pathsep.join(p for p in (str(self._shim), inherited_path) if p),
            "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in devices),
        }
        return worker_environment(os.environ, self.key_sources(), entry.env, settings)


def _local_max_memory(entry: ModelEntry) -> dict[str, int] | None:
    """Re-key max_memory from physical GPU indices to the worker's local ordinals."""
    if not entry.max_memory:
        return None
    devices = entry.devices if isinstance(entry.devices, list) else []
    local = {str(physical): str(ordinal) for ordinal, physical in enumerate(devices)}
    return {local.get(key, key): size for key, size in entry.max_memory.items()}


def _package_shim(run_dir: Path) -> Path:
    """A directory holding only this project's packages, for the worker's PYTHONPATH.

    Putting the packages' parent on PYTHONPATH could shadow a model environment's own
    libraries (when the project is installed into site-packages); links to exactly the two
    packages cannot.
    """
    import adapters

    shim = run_dir / "pkgs"
    shim.mkdir(parents=True, exist_ok=True)
    for package in (gateway, adapters):
        source = Path(package.__file__ or "").parent
        link = shim / source.name
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
    return shim


def _parse(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        print(line.decode(errors="replace").rstrip(), file=sys.stderr)
        return {}
    return message if isinstance(message, dict) else {}
