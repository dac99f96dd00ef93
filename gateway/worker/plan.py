"""Where a model's layers would go, computed without a GPU and without weights.

    python -m gateway.worker.plan < request.json > plan.json

The model's architecture is built from its config on the meta device (no memory, no
download; remote code through `auto_map` when the request trusts it), then
`gateway.worker.placing` places whole decoder layers over the budgets: the same map the
worker passes to `from_pretrained`. Runs in a subprocess (`gateway.lifecycle.placement` starts it):
the gateway side never imports torch.

Request: {"config": dir, "dtype": "bfloat16", "budget": {"0": bytes, "cpu": bytes},
"trust_remote_code": bool}; budget keys are the worker's local GPU ordinals or "cpu"; an
empty budget means everything on the CPU.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Any


def plan(request: dict[str, Any]) -> dict[str, Any]:
    from accelerate.utils import compute_module_sizes

    from adapters.loading import torch_dtype
    from gateway.worker.placing import budget_of, device_map, meta_model

    model = meta_model(request["config"], bool(request.get("trust_remote_code")))
    budget = budget_of(request.get("budget"))
    dtype = torch_dtype(
        request.get("dtype", "auto"), on_gpu=any(isinstance(k, int) for k in budget)
    )
    sizes = compute_module_sizes(model, dtype=dtype)
    placed_map = device_map(model, budget, dtype)
    placed: dict[str, int] = {}
    for module, device in placed_map.items():
        placed[str(device)] = placed.get(str(device), 0) + int(sizes[module])
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "total_bytes": int(sizes[""]),
        "placed": placed,
        "device_map": placed_map,
        "sizes": {module: int(sizes[module]) for module in placed_map},
    }


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
