"""Memory accounting: what a model will take on each device, and what must go to fit it.

Budgets are per device (`"cpu"`, `"0"`, `"1"`, ...) in `gateway.memory_budget`; a device
without a budget is not limited. A model's footprint is estimated before it loads (the
registry's `memory_bytes`, else its weight files scaled to the dtype it loads in) and
replaced by what the worker measured once it is ready (GPU, per device: the allocator's
reserve, the CUDA context and the KV cache at the configured batch and context, never
below the estimate; CPU: parameter and buffer bytes, not the Python runtime around them).
A vLLM model holds what vLLM preallocates (`gateway/backends/engines/memory.py`): on each GPU its
`gpu_memory_utilization` of the GPU's memory, whatever its weights; on the CPU its
weights and the KV cache `VLLM_CPU_KVCACHE_SPACE` sizes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.backends import meminfo
from gateway.backends.engines import memory as vllm_memory
from gateway.registry.config import ModelEntry

Footprint = dict[str, int]  # device -> bytes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
RUNTIME_HEADROOM = 1.1  # activations and cache on top of the weights


def devices_of(entry: ModelEntry) -> list[str]:
    return ["cpu"] if entry.devices == "cpu" else [str(d) for d in entry.devices]


def estimate(entry: ModelEntry, local_path: Path | None) -> Footprint:
    """Bytes the model should take on each of its devices, before it is loaded."""
    if entry.is_remote:
        return {}
    total = entry.memory_bytes or _from_weight_files(entry, local_path)
    if entry.engine == "vllm":
        return vllm_reservation(entry, total)
    return split(entry, total)


def vllm_reservation(entry: ModelEntry, weights: int) -> Footprint:
    """What vLLM will claim on each device. Without nvidia-smi (a GPU entry planned on
    another machine) a GPU's claim is taken as its `max_memory`, else its weights' share."""
    try:
        ram = None if entry.devices != "cpu" else meminfo.ram_total()
        return vllm_memory.reservation(entry, weights, os.environ, None, ram)
    except vllm_memory.EngineConfigError:
        shares = split(entry, weights)
        return {d: (entry.max_memory or {}).get(d, b) for d, b in shares.items()}


def split(entry: ModelEntry, total: int) -> Footprint:
    devices = devices_of(entry)
    caps = entry.max_memory or {}
    weights = [caps.get(d, 1) for d in devices]
    scale = sum(weights)
    return {d: total * w // scale for d, w in zip(devices, weights, strict=True)}


def measured(entry: ModelEntry, memory: Mapping[str, Any] | None) -> Footprint | None:
    """Footprint from a worker's memory report, or None when it reported nothing usable."""
    if not memory:
        return None
    if entry.devices == "cpu":
        weights = memory.get("weights_bytes")
        return {"cpu": int(weights)} if isinstance(weights, int) else None
    allocated = memory.get("gpu_bytes")
    if not isinstance(allocated, dict):
        return None
    physical = [str(d) for d in entry.devices]  # the worker numbers its GPUs from 0
    held = {
        physical[int(i)]: _gpu_held(memory, str(i))
        for i in allocated
        if str(i).isdigit() and int(i) < len(physical)
    }
    return _at_least_estimated(entry, held)


def _gpu_held(memory: Mapping[str, Any], gpu: str) -> int:
    """What a GPU model can come to hold on one GPU: its allocator's reserve (at least
    what is allocated), the CUDA context, and the KV cache of a full batch; and never
    less than the estimate's headroom over the weights placed there."""

    def part(key: str) -> int:
        value = (memory.get(key) or {}).get(gpu, 0)
        return int(value) if isinstance(value, int) else 0

    reserve = max(part("gpu_bytes"), part("gpu_reserved_bytes"))
    held = reserve + part("gpu_context_bytes") + part("gpu_kv_cache_bytes")
    return max(held, int(part("gpu_weights_bytes") * RUNTIME_HEADROOM))


def _at_least_estimated(entry: ModelEntry, held: Footprint) -> Footprint:
    """A registry's `memory_bytes` is a floor: scale the measured shape up to it."""
    total = sum(held.values())
    if not entry.memory_bytes or total >= entry.memory_bytes or total == 0:
        return held
    return {d: -(-b * entry.memory_bytes // total) for d, b in held.items()}


def _from_weight_files(entry: ModelEntry, path: Path | None) -> int:
    if path is None or not path.is_dir():
        return 0
    stored = sum(f.stat().st_size for f in path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
    source_bytes = DTYPE_BYTES.get(_stored_dtype(path), 4)
    target = (
        entry.dtype
        if entry.dtype != "auto"
        else ("float32" if entry.devices == "cpu" else "bfloat16")
    )
    return int(stored * DTYPE_BYTES[target] / source_bytes * RUNTIME_HEADROOM)


def _stored_dtype(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    value = config.get("torch_dtype") or config.get("dtype") or "float32"
    return str(value)


@dataclass(frozen=True)
class Resident:
    name: str
    footprint: Footprint
    busy: bool  # requests in flight, starting, or draining: cannot be evicted now
    pinned: bool
    last_used: float


@dataclass(frozen=True)
class Shortfall:
    device: str
    need: int
    budget: int
    pinned: int = 0  # bytes on the device held by pinned models, which never leave

    def message(self, name: str) -> str:
        held = f", of which pinned models hold {human(self.pinned)}" if self.pinned else ""
        return (
            f"model {name!r} needs {human(self.need)} on device {self.device}, more than its "
            f"budget of {human(self.budget)}{held}"
        )


@dataclass(frozen=True)
class Plan:
    evict: list[str]  # idle models to stop now, least recently used first
    blocked_by: list[str]  # busy models that must drain before it fits
    too_big: Shortfall | None = None  # cannot fit even with every unpinned model gone


def plan(need: Footprint, budgets: Mapping[str, int], residents: Iterable[Resident]) -> Plan:
    """Which models must go (LRU first) so that `need` fits every budgeted device."""
    residents = list(residents)
    used = _usage(residents)
    chosen: list[Resident] = []
    for device, bytes_ in need.items():
        budget = budgets.get(device)
        if budget is None:
            continue
        pinned = sum(r.footprint.get(device, 0) for r in residents if r.pinned)
        if bytes_ + pinned > budget:
            return Plan([], [], Shortfall(device, bytes_, budget, pinned))
        movable = [r for r in residents if not r.pinned and device in r.footprint]
        for resident in sorted(movable, key=lambda r: r.last_used):
            if used.get(device, 0) + bytes_ <= budget:
                break
            if resident in chosen:
                continue
            chosen.append(resident)
            for d, b in resident.footprint.items():
                used[d] = used.get(d, 0) - b
    return Plan([r.name for r in chosen if not r.busy], [r.name for r in chosen if r.busy])


def _usage(residents: Iterable[Resident]) -> dict[str, int]:
    used: dict[str, int] = {}
    for resident in residents:
        for device, bytes_ in resident.footprint.items():
            used[device] = used.get(device, 0) + bytes_
    return used


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"
