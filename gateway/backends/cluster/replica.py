"""One replica of a model on a Ray node: the model's usual backend, started there.

The replica starts the same backend one machine would (the transformers worker, vLLM or a
command, in the model's `python_env`, built on that node the first time) with the
node's own launcher, and relays raw HTTP exchanges to it: the gateway in front keeps
every rule (validation, limits, adapters' replies, errors). The first item of a relayed
exchange is `(status, headers, replica)`; the rest are body bytes. Closing the stream in
the gateway cancels the relay here, which aborts the request in the worker. Serve's
health check asks the backend's own probe; a replica whose backend died is replaced.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.backends import rundir
from gateway.backends.launcher import Backend, ProcessLauncher
from gateway.registry.config import ModelEntry

log = logging.getLogger(__name__)

# Request headers the replica passes to its backend; the backend's own key is added there.
RELAYED_HEADERS = frozenset({"content-type", "accept"})


@dataclass(frozen=True)
class ReplicaSettings:
    """What a replica needs of the gateway's settings: where weights and envs live."""

    cache_dir: str
    envs_dir: str
    auto_build_envs: bool
    secrets: tuple[str, ...] = ()  # the registry's key sources: never in a worker's env


@dataclass(frozen=True)
class ReplicaInfo:
    replica: str
    node: str
    pid: int


def on_gpus(entry: ModelEntry, gpus: list[int]) -> ModelEntry:
    """The entry on the node's GPUs Ray handed this replica, in place of the indices written
    for one machine: as many, never another replica's, each with its own memory budget."""
    assert isinstance(entry.devices, list)
    moved = dict(zip((str(d) for d in entry.devices), (str(g) for g in gpus), strict=True))
    update: dict[str, Any] = {"devices": gpus}
    if entry.max_memory is not None:
        update["max_memory"] = {moved.get(k, k): v for k, v in entry.max_memory.items()}
    return entry.model_copy(update=update)


class ModelReplica:
    """The body of each model's Serve deployment (gateway/backends/cluster/launcher.py)."""

    async def __init__(self, name: str, entry: ModelEntry, settings: ReplicaSettings) -> None:  # type: ignore[misc]
        import ray

        context = ray.get_runtime_context()
        self.info = ReplicaInfo(
            replica=context.get_actor_id() or "", node=context.get_node_id(), pid=os.getpid()
        )
        if isinstance(entry.devices, list):
            entry = on_gpus(entry, [int(g) for g in ray.get_gpu_ids()])
        self.run_dir = rundir.create()
        self.launcher = ProcessLauncher(
            self.run_dir,
            Path(settings.cache_dir),
            Path(settings.envs_dir),
            key_sources=lambda: settings.secrets,
            auto_build_envs=settings.auto_build_envs,
        )
        self.backend: Backend = await self.launcher.launch(name, entry, self._progress)
        self.name = name
        self._stopping = False
        self._end_with_backend = asyncio.create_task(self._exit_when_backend_exits())

    async def _exit_when_backend_exits(self) -> None:
        """A backend gone unasked leaves a replica that can serve nothing: it ends at once,
        so Serve routes around it and starts another (a health check takes up to 10 s)."""
        code = await self.backend.exited
        if self._stopping:
            return
        log.error("the backend of %r exited (code %s): ending this replica", self.name, code)
        rundir.remove(self.run_dir)
        os._exit(1)

    def _progress(self, message: dict[str, Any]) -> None:
        log.info("loading: %s", message.get("message") or message)

    async def relay(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[Any]:
        wanted = [(k, v) for k, v in headers if k.lower() in RELAYED_HEADERS]
        async with self.backend.upstream.exchange(method, path, wanted, body) as response:
            yield response.status_code, list(response.headers.items()), self.info
            async for chunk in response.aiter_raw():
                yield chunk

    async def describe(self) -> dict[str, Any]:
        return {**self.backend.runtime, "node": self.info.node, "pid": self.info.pid}

    async def check_health(self) -> None:
        if self.backend.exited.done():
            raise RuntimeError(f"the backend of {self.name!r} exited")
        if self.backend.probe_path:
            await self.backend.upstream.check(self.backend.probe_path, timeout=10.0)

    async def __del__(self) -> None:
        self._stopping = True
        try:
            await asyncio.wait_for(self.backend.stop(5.0), 15.0)
        finally:
            rundir.remove(self.run_dir)
