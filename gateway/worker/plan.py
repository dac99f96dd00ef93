"""Where a model's layers would go, computed without a GPU and without weights.

    python -m gateway.worker.plan < request.json > plan.json

The model's architecture is built from its config on the meta device (no memory, no
download; remote code through `auto_map` when the request trusts it), then accelerate
places whole decoder layers over the budgets exactly as `from_pretrained(device_map="auto",
max_memory=...)` would. Runs in a subprocess (`gateway.placement` starts it): the gateway
side never imports torch.

Request: {"config": dir, "dtype": "bfloat16", "budget": {"0": bytes, "cpu": bytes},
"trust_remote_code": bool}; budget keys are the worker's local GPU ordinals, "cpu" or
"disk"; an empty budget means everything on the CPU.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Any


def plan(request: dict[str, Any]) -> dict[str, Any]:
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapters.base import torch_dtype

    trust = bool(request.get("trust_remote_code"))
    config = AutoConfig.from_pretrained(request["config"], trust_remote_code=trust)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    budget = {_key(k): int(v) for k, v in request.get("budget", {}).items()}
    dtype = torch_dtype(
        request.get("dtype", "auto"), on_gpu=any(isinstance(k, int) for k in budget)
    )
    sizes = compute_module_sizes(model, dtype=dtype)
    if budget:
        device_map = infer_auto_device_map(
            model,
            max_memory=budget,
            no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
            dtype=dtype,
        )
    else:
        device_map = {"": "cpu"}
    placed: dict[str, int] = {}
    for module, device in device_map.items():
        placed[str(device)] = placed.get(str(device), 0) + int(sizes[module])
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "total_bytes": int(sizes[""]),
        "placed": placed,
        "device_map": {module: _name(device) for module, device in device_map.items()},
        "sizes": {module: int(sizes[module]) for module in device_map},
    }


def _key(key: str) -> int | str:
    return int(key) if key.isdigit() else key


def _name(device: Any) -> int | str:
    return device if isinstance(device, int) else str(device)


def main() -> int:
    # accelerate warns that the GPUs it plans for are absent, transformers about old config
    # keys: expected here, and stdout must carry only the JSON answer.
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    request = json.loads(sys.stdin.read())
    stdout, sys.stdout = sys.stdout, sys.stderr  # remote code may print
    try:
        answer = plan(request)
    except Exception as exc:
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout = stdout
    print(json.dumps(answer))
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(main())
