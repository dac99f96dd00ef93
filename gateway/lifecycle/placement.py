"""`llm-gateway plan NAME`: how a model's layers would fall over its devices, and whether
they fit, shown without a GPU and without downloading weights (`engine: vllm`: its
tensor-parallel shards and KV cache, `gateway/backends/engines/plan.py`).

The architecture comes from the entry's `planning_config` (a directory with config.json,
and modeling code if the model needs remote code) or else from its downloaded snapshot.
`gateway.worker.plan` builds it on the meta device in a subprocess, under the model's own
interpreter when its environment is built, and lets accelerate place it; this module turns
the budgets into the worker's local GPU ordinals (as the worker will see them) and the
answer back into physical GPU indices, decides whether it fits and renders it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gateway.backends.engines import plan as vllm_plan
from gateway.backends.envs import EnvironmentMissing, python_for
from gateway.backends.launcher import _package_shim
from gateway.registry import hub
from gateway.registry.config import ModelEntry, max_memory_problem

GIB = 2**30


class PlanError(Exception):
    """The plan cannot be made (nothing to plan from, no budget, the planner failed)."""


def planning_source(name: str, entry: ModelEntry, cache: Path) -> Path:
    if entry.planning_config:
        path = Path(entry.planning_config)
        return path.parent if path.name == "config.json" else path
    if entry.source is not None and (found := hub.locate(entry, entry.source, cache)):
        return found
    raise PlanError(
        f"model {name!r} is not downloaded and has no `planning_config`; run "
        f"`llm-gateway pull {name}`, or point `planning_config` at a directory holding "
        "its config.json (and modeling code, for remote-code models)"
    )


def budget_for(name: str, entry: ModelEntry) -> dict[str, int]:
    """Budgets keyed as the worker sees its devices: local GPU ordinals and "cpu".

    The same rules as the registry's (`max_memory_problem`), so that a budget `check`
    accepts is one the plan and the loader both place the same way.
    """
    limits = {str(k): v for k, v in (entry.max_memory or {}).items()}
    if entry.devices != "cpu" and not limits:
        raise PlanError(
            f"model {name!r}: `max_memory` gives no budget for its GPUs; planning without "
            "a GPU needs one per device, e.g. `max_memory: {0: 22GiB, 1: 22GiB}`"
        )
    problem = max_memory_problem(limits, entry.devices)
    if problem:
        raise PlanError(f"model {name!r}: `max_memory`: {problem}")
    budget: dict[str, int] = {"cpu": limits["cpu"]} if "cpu" in limits else {}
    for ordinal, physical in enumerate(entry.devices if entry.devices != "cpu" else []):
        budget[str(ordinal)] = limits[str(physical)]
    return budget


def make_plan(
    name: str, entry: ModelEntry, cache: Path, envs_dir: Path, gpu_memory: int | None = None
) -> dict[str, Any]:
    """The layer split of a transformers model, or for `engine: vllm` its tensor-parallel
    shards and KV cache (`gpu_memory`: each GPU's size, where nvidia-smi is absent)."""
    if entry.engine == "vllm":
        return _vllm_plan(name, entry, cache, envs_dir, gpu_memory)
    budget = budget_for(name, entry)
    request = {
        "config": str(planning_source(name, entry, cache)),
        "dtype": entry.dtype,
        "budget": budget,
        "trust_remote_code": entry.trust_remote_code,
    }
    raw = _run_planner(_interpreter(name, entry, envs_dir), request)
    return _physical(name, entry, budget, raw)


def _vllm_plan(
    name: str, entry: ModelEntry, cache: Path, envs_dir: Path, gpu_memory: int | None
) -> dict[str, Any]:
    source = planning_source(name, entry, cache)
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot read {source / 'config.json'}: {exc}") from None
    request = {
        "config": str(source),
        "dtype": vllm_plan.weights_dtype(entry, config),
        "budget": {},  # only the weights' size: vLLM shards every layer over every GPU
        "trust_remote_code": entry.trust_remote_code,
    }
    weights = _run_planner(_interpreter(name, entry, envs_dir), request)
    try:
        return vllm_plan.vllm_plan(name, entry, weights, config, gpu_memory)
    except vllm_plan.VllmPlanError as exc:
        raise PlanError(str(exc)) from None


def _interpreter(name: str, entry: ModelEntry, envs_dir: Path) -> str:
    try:  # the model's own transformers, if its environment is built
        return python_for(name, entry, envs_dir)
    except EnvironmentMissing:
        return sys.executable


def _run_planner(python: str, request: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llmgw-plan-") as run_dir:
        env = {**os.environ, "PYTHONPATH": str(_package_shim(Path(run_dir)))}
        env.setdefault("HF_HUB_OFFLINE", "1")  # plans never download anything
        result = subprocess.run(
            [python, "-m", "gateway.worker.plan"],
            input=json.dumps(request), capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
    try:
        answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise PlanError(f"the planner crashed: {result.stderr.strip()[-800:]}") from None
    if "error" in answer:
        raise PlanError(f"planning failed: {answer['error']}")
    return answer


def _physical(
    name: str, entry: ModelEntry, budget: dict[str, int], raw: dict[str, Any]
) -> dict[str, Any]:
    gpus = entry.devices if isinstance(entry.devices, list) else []

    def physical(device: int | str) -> str:
        return str(gpus[int(device)]) if str(device).isdigit() else str(device)

    device_map = {module: physical(device) for module, device in raw["device_map"].items()}
    allowed = {physical(key) for key in budget} or {"cpu"}
    unplaced = [m for m, device in device_map.items() if device not in allowed]
    shortfall = sum(raw["sizes"][m] for m in unplaced)
    return {
        "model": name,
        "architecture": raw["architecture"],
        "parameters": raw["parameters"],
        "dtype": raw["dtype"],
        "total_bytes": raw["total_bytes"],
        "devices": {physical(d): size for d, size in raw["placed"].items()},
        "budget": {physical(d): size for d, size in budget.items()},
        "device_map": device_map,
        "fits": not unplaced,
        "shortfall_bytes": shortfall,
        "unplaced": unplaced,
    }


def render(plan: dict[str, Any]) -> str:
    if plan.get("engine") == "vllm":
        return vllm_plan.render(plan)
    devices = [d for d in plan["budget"] if d not in plan["devices"]] + list(plan["devices"])
    lines = [
        f"{plan['model']}: {plan['architecture']}, {plan['parameters']:,} parameters, "
        f"{_gib(plan['total_bytes'])} in {plan['dtype']}",
        f"  {'device':<8}{'budget':>12}{'planned':>12}  modules",
    ]
    for device in sorted(set(devices), key=_order):
        modules = [m for m, d in plan["device_map"].items() if d == device]
        budget = plan["budget"].get(device)
        lines.append(
            f"  {_label(device):<8}{_gib(budget) if budget else '-':>12}"
            f"{_gib(plan['devices'].get(device, 0)):>12}  {summarize(modules) or '-'}"
        )
    if plan["fits"]:
        spare = sum(plan["budget"].values()) - plan["total_bytes"]
        extra = f"; {_gib(spare)} of the budget left for activations and the KV cache"
        lines.append(f"fits{extra if plan['budget'] else ''}")
    else:
        lines.append(
            f"does not fit: {_gib(plan['shortfall_bytes'])} short "
            f"({summarize(plan['unplaced'])} left over, placed in whole decoder layers); "
            "raise max_memory, add devices, or allow CPU offload with max_memory.cpu; "
            "the worker refuses to load a model that does not fit"
        )
    return "\n".join(lines)


def summarize(modules: list[str]) -> str:
    """`model.layers.0`, ..., `model.layers.18` -> `model.layers.0-18`."""
    parts: list[str] = []
    run: tuple[str, int, int] | None = None
    for module in modules:
        match = re.fullmatch(r"(.*\.)(\d+)", module)
        if match and run and run[0] == match.group(1) and run[2] + 1 == int(match.group(2)):
            run = (run[0], run[1], int(match.group(2)))
            continue
        if run:
            parts.append(_span(run))
        run = (match.group(1), int(match.group(2)), int(match.group(2))) if match else None
        if not match:
            parts.append(module)
    if run:
        parts.append(_span(run))
    return ", ".join(parts)


def _span(run: tuple[str, int, int]) -> str:
    prefix, first, last = run
    return f"{prefix}{first}" if first == last else f"{prefix}{first}-{last}"


def _order(device: str) -> tuple[int, int]:
    return (0, int(device)) if device.isdigit() else (1, 0 if device == "cpu" else 1)


def _label(device: str) -> str:
    return f"GPU {device}" if device.isdigit() else device


def _gib(size: int | None) -> str:
    return f"{(size or 0) / GIB:.2f} GiB"
