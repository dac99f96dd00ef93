"""What the GPUs a worker sees can run: the dtype `auto` means, and the attention kernel.

bfloat16 and flash-attention 2 both need compute capability 8.0 (Ampere) or newer; an
older GPU gets float16 and PyTorch's SDPA. Without a visible GPU (planning on a machine
that has none) a modern GPU is assumed: bfloat16 and float16 are the same size, so the
plan does not depend on the guess.
"""

from __future__ import annotations

import importlib.util
from typing import Any

AMPERE = (8, 0)


def torch_dtype(name: str, on_gpu: bool) -> Any:
    import torch

    if name == "auto":
        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if gpus_reach(AMPERE) else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def gpus_reach(capability: tuple[int, int]) -> bool:
    """Whether every visible GPU has at least this compute capability (True with none)."""
    import torch

    if not torch.cuda.is_available():
        return True
    count = torch.cuda.device_count()
    return all(tuple(torch.cuda.get_device_capability(i)) >= capability for i in range(count))


def attention(requested: str, model_class: type | None, dtype: Any, on_gpu: bool) -> str | None:
    """The `attn_implementation` to load with, or None for the model's own default.

    A remote-code model supports only what its class declares; asking it for a kernel
    it does not declare fails the load, so such a model keeps its default.
    """
    if requested != "auto":
        return requested
    if model_class is None:
        return None
    if on_gpu and _flash_attention_fits(model_class, dtype):
        return "flash_attention_2"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else None


def _flash_attention_fits(model_class: type, dtype: Any) -> bool:
    import torch

    declared = getattr(model_class, "_supports_flash_attn", False) or getattr(
        model_class, "_supports_flash_attn_2", False
    )  # transformers 5.x and 4.x names
    return (
        bool(declared)
        and dtype in (torch.float16, torch.bfloat16)
        and flash_attn_installed()
        and gpus_reach(AMPERE)
    )


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None
