"""The per-model record the supervisor keeps, and how it is reported."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from gateway.backends.launcher import Backend
from gateway.backends.upstream import Upstream
from gateway.lifecycle.admission import Admission
from gateway.lifecycle.budget import Footprint
from gateway.registry.config import ModelEntry


class State(str, Enum):
    UNLOADED = "unloaded"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(eq=False)  # identity semantics: runtimes are kept in sets
class ModelRuntime:
    name: str
    entry: ModelEntry
    admission: Admission
    # Counts the reloads that changed what the model's process reads at its start: a load or
    # an update begun under an earlier count has been superseded (even by a change undone).
    epoch: int = 0
    state: State = State.UNLOADED
    backend: Backend | None = None
    start_task: asyncio.Task[Backend] | None = None
    stop_task: asyncio.Task[None] | None = None
    update_task: asyncio.Task[None] | None = None  # a cluster model's rolling update
    in_flight: int = 0
    last_used: float | None = None  # wall clock, for display
    last_used_mono: float = 0.0
    keep_alive_s: float | None = None  # the latest request's wish, overriding the entry's
    load_seconds: float | None = None
    progress: dict[str, Any] | None = None
    last_error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    crashes: list[float] = field(default_factory=list)
    estimate: Footprint = field(default_factory=dict)  # before loading
    footprint: Footprint = field(default_factory=dict)  # held now (reserved or measured)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.state in (State.STARTING, State.DRAINING)


@dataclass(frozen=True)
class Lease:
    name: str
    entry: ModelEntry
    upstream: Upstream


def describe(runtime: ModelRuntime, idle_ttl: float | None) -> dict[str, Any]:
    backend = runtime.backend
    entry = runtime.entry
    runtime_info = backend.runtime if backend else None
    return {
        "state": runtime.state.value,
        "engine": "remote" if entry.is_remote else entry.engine,
        "devices": entry.devices,
        "adapter": entry.adapter,
        "in_flight": runtime.in_flight,
        "queued": runtime.admission.waiting,
        "last_used": runtime.last_used,
        "load_seconds": runtime.load_seconds,
        "progress": runtime.progress,
        "last_error": runtime.last_error,
        "memory": {
            "estimated_bytes": runtime.estimate or None,
            "measured": (runtime_info or {}).get("memory"),
            "held_bytes": runtime.footprint or None,
        },
        "pid": backend.pid if backend else None,
        "runtime": runtime_info,
        "idle_unload_s": idle_ttl,
        "pinned": entry.pinned,
    }
