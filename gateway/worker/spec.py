"""What the gateway tells a worker to serve (passed as JSON in LLMGW_WORKER_SPEC)."""

from __future__ import annotations

from pydantic import BaseModel

from gateway.registry.config import ModelEntry

SPEC_ENV = "LLMGW_WORKER_SPEC"


class WorkerSpec(BaseModel):
    name: str
    entry: ModelEntry
    weights: str  # an absolute local path, or the hub id when entry.hub is not local
    socket: str  # unix socket the worker serves on
    cache_dir: str  # where hub snapshots live
    gpus: int = 0  # GPUs visible to the worker (CUDA_VISIBLE_DEVICES is already narrowed)
    max_memory: dict[str, int] | None = None  # keyed by local GPU ordinal or "cpu"
