"""Where a model's modules go: one computation for `llm-gateway plan` and for the loader.

accelerate places whole decoder layers over the budgets in device order: the first GPU
fills before the next is used. `from_pretrained(device_map="auto")` would first rebalance
the budgets (capping every GPU but the last), then send what no longer fits to the CPU
and to disk without a word, so the plan and the loaded model would differ. The loader
therefore never asks for "auto": it passes the map `device_map()` computes here, the
same map `plan` shows, and refuses a model that does not fit its devices.

Budgets are keyed as the worker sees its devices: local GPU ordinals (ints) and "cpu",
which an entry names in `max_memory` to allow CPU offload. Disk offload is never used.
Runs inside a worker or the planner subprocess: torch is imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

Budget = dict[int | str, int]
DeviceMap = dict[str, int | str]


class PlacementError(Exception):
    """The model does not fit the devices and budgets its entry gives it."""


def budget_of(max_memory: Mapping[Any, int] | None) -> Budget:
    """`{"0": 5, "cpu": 9}` (as JSON carries it) -> `{0: 5, "cpu": 9}` (as accelerate wants)."""
    return {_key(k): int(v) for k, v in (max_memory or {}).items()}


def loader_budget(max_memory: Mapping[Any, int] | None, gpus: int) -> Budget:
    """The budget a worker loads under: the entry's, else each visible GPU's free memory."""
    if max_memory:
        return budget_of(max_memory)
    import torch

    return {i: int(torch.cuda.mem_get_info(i)[0]) for i in range(gpus)}


def meta_model(path: Path | str, trust_remote_code: bool, revision: str | None = None) -> Any:
    """The model's architecture on the meta device: no memory, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, revision=revision
    )
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def device_map(model: Any, budget: Budget, dtype: Any) -> DeviceMap:
    """Whole decoder layers over the budget's devices, in order; overflow goes to "disk"."""
    if not budget:
        return {"": "cpu"}
    from accelerate import infer_auto_device_map

    placed = infer_auto_device_map(
        model,
        max_memory=dict(budget),
        no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
        dtype=dtype,
    )
    return {module: device_of(device) for module, device in placed.items()}


def outside(placed: Mapping[str, Any], allowed: set[str]) -> list[str]:
    """Modules placed on a device not in `allowed` (local ordinals as text, maybe "cpu")."""
    return [module for module, device in placed.items() if str(device_of(device)) not in allowed]


def allowed_devices(budget: Mapping[Any, int], gpus: int) -> set[str]:
    """Where an entry lets its model go: its GPUs, and the CPU only if its budget names it."""
    devices = {str(i) for i in range(gpus)} or {"cpu"}
    return devices | ({"cpu"} if "cpu" in {str(k) for k in budget} else set())


def refuse_outside(placed: Mapping[str, Any], allowed: set[str]) -> None:
    """Raise PlacementError naming the modules that would run off the entry's devices."""
    left = outside(placed, allowed)
    if not left:
        return
    where = sorted({str(device_of(placed[m])) for m in left})
    raise PlacementError(
        f"{len(left)} modules ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''}) "
        f"land on {', '.join(where)}, outside the model's devices: raise `max_memory`, "
        "add devices, or allow CPU offload by naming `cpu` in `max_memory` "
        "(`llm-gateway plan` shows the placement)"
    )


def _key(key: Any) -> int | str:
    return int(key) if str(key).isdigit() else str(key)


def device_of(device: Any) -> int | str:
    """accelerate and transformers write a GPU as 0, "0", "cuda:0" or torch.device."""
    if isinstance(device, int):
        return device
    text = str(device)
    if text.startswith("cuda"):
        return int(text.partition(":")[2] or 0)
    return int(text) if text.isdigit() else text
