"""The worker's share of its machine: intra-op threads, and the batch size that fits.

Threads: the gateway chooses the count (gateway/backends/threads.py) and puts it in the worker's
environment, where OpenMP reads it as torch starts; `apply_threads` also sets it through
torch, which is what torch's own pools follow.

Batch size: with `batching.max_batch_size: auto` the worker sizes it after loading, when
the weights are in memory and the model's shape is known. A batch of `rows` rows at the
context length needs `rows * context * kv_bytes_per_token` bytes of KV cache; the batch
may take up to KV_SHARE of the memory the model's devices have left (and of what its
`max_memory` budget leaves over its weights), the rest staying for activations. It is also
capped by `limits.max_concurrency` (no more rows can ever be admitted) and AUTO_CAP.
"""

from __future__ import annotations

import os
from typing import Any

from gateway.backends.meminfo import meminfo_bytes
from gateway.backends.threads import THREADS_ENV
from gateway.worker.spec import WorkerSpec

AUTO_CAP = 64
KV_SHARE = 0.8
# When a model's configuration does not say how big its KV cache is (remote code with
# other names), the batch stays at the size that served before sizing existed.
UNKNOWN_SHAPE_ROWS = 8


def apply_threads() -> None:
    """Set torch's intra-op threads to the gateway's count, if it gave one."""
    import torch

    raw = os.environ.get(THREADS_ENV)
    if raw:
        torch.set_num_threads(int(raw))


def thread_count() -> int:
    import torch

    return int(torch.get_num_threads())


def kv_bytes_per_token(config: Any, element_size: int) -> int | None:
    """Keys and values of one token over every layer, or None if the config does not say
    (the names of transformers' configs, and GPT-2's)."""
    text_config = getattr(config, "get_text_config", None)
    config = text_config() if callable(text_config) else config
    layers = _size(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _size(config, "num_attention_heads", "n_head")
    kv_heads = _size(config, "num_key_value_heads", "n_head_kv") or heads
    hidden = _size(config, "hidden_size", "n_embd")
    head_dim = _size(config, "head_dim") or (hidden // heads if heads else 0)
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * element_size


def _size(config: Any, *keys: str) -> int:
    """The first of `keys` the config sets to a positive integer (0 if none does)."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def rows_that_fit(per_row_bytes: int | None, free_bytes: int | None, cap: int) -> int:
    """How many rows at full context fit in KV_SHARE of `free_bytes`, between 1 and cap."""
    if per_row_bytes is None or free_bytes is None:
        return min(cap, UNKNOWN_SHAPE_ROWS)
    return max(1, min(cap, int(KV_SHARE * free_bytes) // per_row_bytes))


def batch_size(spec: WorkerSpec, model: Any, context: int) -> int:
    """The engine's batch size: the configured number, or the size that fits ("auto")."""
    setting = spec.entry.batching.max_batch_size
    if setting != "auto":
        return setting
    cap = min(AUTO_CAP, spec.entry.limits.max_concurrency)
    per_token = kv_bytes_per_token(model.config, _element_size(model))
    per_row = None if per_token is None else per_token * context
    return rows_that_fit(per_row, free_memory(spec, model), cap)


def free_memory(spec: WorkerSpec, model: Any) -> int | None:
    """Bytes left for the KV cache on the model's devices, within its budget."""
    budget = spec.max_memory or {}
    if spec.gpus == 0:
        left = mem_available()
        if "cpu" in budget and left is not None:
            left = min(left, budget["cpu"] - _weights_bytes(model))
        return None if left is None else max(0, left)
    import torch

    total = 0
    for index in range(spec.gpus):
        free, _ = torch.cuda.mem_get_info(index)
        if str(index) in budget:
            free = min(free, budget[str(index)] - torch.cuda.memory_reserved(index))
        total += max(0, free)
    return total


def mem_available() -> int | None:
    """The kernel's estimate of memory available to a new allocation, without swapping."""
    return meminfo_bytes("MemAvailable")


def _element_size(model: Any) -> int:
    dtype = getattr(model, "dtype", None)
    size = getattr(dtype, "itemsize", None)
    return size if isinstance(size, int) and size > 0 else 4


def _weights_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
