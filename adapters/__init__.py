"""Per-model-family adapters: prompt format, loading quirks, generation defaults.

Adapters run inside a model's worker process (they import torch and transformers lazily
there); the gateway only reads this table of names, so it never imports them.
"""

from __future__ import annotations

import importlib
from typing import Any

# name in models.yaml -> "module:Class". One prompt family per module.
ADAPTERS: dict[str, str] = {
    "chat_template": "adapters.chat_template:ChatTemplateAdapter",
    "deepseek_moe": "adapters.deepseek_moe:DeepSeekMoEAdapter",
    "transnormer": "adapters.transnormer:TransNormerAdapter",
}


def adapter_class(name: str) -> Any:
    """Import and return the adapter class registered under `name` (worker side only)."""
    module_name, _, class_name = ADAPTERS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
