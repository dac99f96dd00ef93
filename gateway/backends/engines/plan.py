"""`llm-gateway plan NAME` for `engine: vllm`: what vLLM would hold on each GPU and how
much KV cache that leaves, without a GPU and without the weights.

vLLM shards every weight over the GPUs of `devices` (tensor parallel), reserves its
`gpu_memory_utilization` of each GPU (`gateway/backends/engines/memory.py`) and gives the KV cache
what the shard and the activations leave. Each GPU holds its share of every token's KV
heads, so the token capacity is the smallest GPU's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gateway.backends import meminfo
from gateway.backends.engines import memory
from gateway.backends.engines.argv import vllm_dtype
from gateway.registry.config import ModelEntry

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


class VllmPlanError(Exception):
    """The plan cannot be made (a message for the user)."""


def kv_per_token(config: Mapping[str, Any], dtype_bytes: int, tp: int) -> tuple[int | None, str]:
    """KV cache bytes one token takes on each GPU, and how that was reckoned (or why it is
    unknown): 2 (K and V) × layers × KV heads per GPU × head dim × bytes."""
    if "kv_lora_rank" in config or "q_lora_rank" in config:
        return None, "multi-head latent attention (MLA): vLLM sizes its cache differently"
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim")
    if head_dim is None and isinstance(heads, int) and heads > 0:
        hidden = config.get("hidden_size")
        head_dim = hidden // heads if isinstance(hidden, int) and hidden % heads == 0 else None
    fields = (layers, kv_heads, head_dim)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in fields):
        return None, "config.json lacks num_hidden_layers, attention heads or head_dim"
    assert isinstance(layers, int) and isinstance(kv_heads, int) and isinstance(head_dim, int)
    per_gpu = max(1, kv_heads // tp)  # vLLM replicates KV heads when there are fewer than GPUs
    return 2 * layers * per_gpu * head_dim * dtype_bytes, (
        f"2 × {layers} layers × {per_gpu} of {kv_heads} KV heads × {head_dim} head dim "
        f"× {dtype_bytes} bytes"
    )


def weights_dtype(entry: ModelEntry, config: Mapping[str, Any]) -> str:
    """The dtype vLLM loads the weights in: the entry's, else the checkpoint's."""
    dtype = vllm_dtype(entry)
    if dtype == "auto":
        found = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        dtype = str(found).removeprefix("torch.")
    return dtype


def kv_dtype_bytes(entry: ModelEntry, weights: str) -> int | None:
    given = memory.flag_value(entry, "kv-cache-dtype") or "auto"
    if given == "auto":
        return DTYPE_BYTES.get(weights)
    return 1 if given.startswith("fp8") else DTYPE_BYTES.get(given)


def max_model_len(entry: ModelEntry, config: Mapping[str, Any]) -> int | None:
    given = memory.flag_value(entry, "max-model-len")
    if given is not None:
        return memory.human_int(given)
    if entry.limits.context_length is not None:
        return entry.limits.context_length
    found = config.get("max_position_embeddings")
    return found if isinstance(found, int) else None


def reservations(
    entry: ModelEntry, weights: int, gpu_memory: int | None
) -> tuple[dict[str, int], dict[str, int | None], float | None, str]:
    """What vLLM holds per device, each GPU's size where known, the fraction, and where the
    GPU sizes came from. Without nvidia-smi and `--gpu-memory`, `max_memory` stands in."""
    if entry.devices == "cpu":
        held = memory.reservation(entry, weights, os.environ, None, meminfo.ram_total())
        return held, {"cpu": None}, None, "the machine's RAM"
    gpus = [str(g) for g in entry.devices]
    if gpu_memory is not None:
        totals, source = {g: gpu_memory for g in gpus}, "--gpu-memory"
    else:
        try:
            totals, source = memory.gpu_total_bytes(), "nvidia-smi"
        except memory.EngineConfigError as exc:
            return _without_sizes(entry, weights, gpus, str(exc))
    held = memory.reservation(entry, weights, os.environ, totals)
    fraction = None
    if memory.explicit_kv_bytes(entry, os.environ) is None:
        fraction = memory.utilization(entry, totals)
    return held, {g: totals.get(g) for g in gpus}, fraction, source


def _without_sizes(
    entry: ModelEntry, weights: int, gpus: list[str], why: str
) -> tuple[dict[str, int], dict[str, int | None], float | None, str]:
    unknown: dict[str, int | None] = {g: None for g in gpus}
    if memory.explicit_kv_bytes(entry, os.environ) is not None:  # no GPU size needed
        return memory.reservation(entry, weights, os.environ, {}), unknown, None, "unneeded"
    if entry.max_memory and memory.flag_value(entry, "gpu-memory-utilization") is None:
        held = {g: entry.max_memory[g] for g in gpus}
        return held, unknown, None, "max_memory"
    raise VllmPlanError(
        f"the GPUs' sizes are unknown ({why}): pass each GPU's memory, e.g. "
        "`--gpu-memory 24GiB`, or run `plan` where nvidia-smi lists them"
    )


def vllm_plan(
    name: str,
    entry: ModelEntry,
    weights: Mapping[str, Any],
    config: Mapping[str, Any],
    gpu_memory: int | None = None,
) -> dict[str, Any]:
    """The plan as JSON-ready data. `weights` is the planner's answer (architecture,
    parameters, dtype, total_bytes); `config` the model's config.json."""
    total = int(weights["total_bytes"])
    try:
        tp = memory.tensor_parallel_size(entry)
        held, sizes, fraction, source = reservations(entry, total, gpu_memory)
        length = max_model_len(entry, config)
    except memory.EngineConfigError as exc:
        raise VllmPlanError(str(exc)) from None
    on_cpu = entry.devices == "cpu"
    shard = total if on_cpu else -(-total // tp)
    activations = 0 if on_cpu else memory.ACTIVATION_ALLOWANCE
    dtype_bytes = kv_dtype_bytes(entry, str(weights["dtype"]))
    per_token, how = (
        (None, "unknown KV cache dtype")
        if dtype_bytes is None
        else kv_per_token(config, dtype_bytes, 1 if on_cpu else tp)
    )
    devices: dict[str, dict[str, int | None]] = {}
    warnings: list[str] = []
    for device, reserved in held.items():
        room = reserved - shard - activations
        if room <= 0:
            warnings.append(_no_room(device, reserved, shard, activations, fraction))
        kv = max(room, 0)
        devices[device] = {
            "total_bytes": sizes.get(device),
            "reserved_bytes": reserved,
            "weights_bytes": shard,
            "activation_bytes": activations,
            "kv_cache_bytes": kv,
            "kv_tokens": None if per_token is None else kv // per_token,
        }
    tokens = None if per_token is None else min(int(d["kv_tokens"] or 0) for d in devices.values())
    sequences = None if tokens is None or not length else tokens // length
    if sequences == 0 and tokens:
        warnings.append(
            f"the KV cache holds {tokens:,} tokens, less than one sequence of max_model_len "
            f"{length:,}: vLLM refuses to start; lower `limits.context_length` or give it "
            "more memory"
        )
    notes = [] if source != "max_memory" else [
        "no nvidia-smi and no --gpu-memory: each GPU's `max_memory` is taken as what vLLM "
        "reserves (vLLM's fraction is max_memory over the GPU's size); pass --gpu-memory "
        "SIZE for the exact figure"
    ]  # fmt: skip
    return {
        "model": name,
        "engine": "vllm",
        "architecture": weights["architecture"],
        "parameters": weights["parameters"],
        "dtype": weights["dtype"],
        "total_bytes": total,
        "tensor_parallel_size": 1 if on_cpu else tp,
        "gpu_memory_utilization": fraction,
        "gpu_sizes_from": source,
        "devices": devices,
        "kv_bytes_per_token": per_token,
        "kv_per_token_from": how,
        "kv_tokens": tokens,
        "max_model_len": length,
        "sequences": sequences,
        "fits": not warnings,
        "warnings": warnings,
        "notes": notes,
    }


def _no_room(
    device: str, reserved: int, shard: int, activations: int, fraction: float | None
) -> str:
    what = f"gpu_memory_utilization {fraction:.4f}" if fraction is not None else "vLLM"
    return (
        f"{_label(device)}: {what} reserves {_gib(reserved)}, not more than its weights' "
        f"shard ({_gib(shard)}) and the activation allowance ({_gib(activations)}): no room "
        f"for a KV cache ({_gib(shard + activations - reserved)} short), so vLLM would "
        "refuse to start; raise `max_memory` (or --gpu-memory-utilization) or add GPUs to "
        "`devices`"
    )


def render(plan: Mapping[str, Any]) -> str:
    tp = plan["tensor_parallel_size"]
    lines = [
        f"{plan['model']}: {plan['architecture']}, {plan['parameters']:,} parameters, "
        f"{_gib(plan['total_bytes'])} in {plan['dtype']}, on vLLM",
        f"  tensor parallel size {tp}: {_gib(-(-plan['total_bytes'] // tp))} of weights per GPU"
        + _fraction(plan),
        f"  {'device':<8}{'size':>12}{'reserved':>12}{'weights':>12}{'activations':>13}"
        f"{'KV cache':>12}{'KV tokens':>11}",
    ]
    for device, row in plan["devices"].items():
        tokens = "?" if row["kv_tokens"] is None else f"{row['kv_tokens']:,}"
        size = "?" if row["total_bytes"] is None else _gib(row["total_bytes"])
        lines.append(
            f"  {_label(device):<8}{size:>12}{_gib(row['reserved_bytes']):>12}"
            f"{_gib(row['weights_bytes']):>12}{_gib(row['activation_bytes']):>13}"
            f"{_gib(row['kv_cache_bytes']):>12}{tokens:>11}"
        )
    lines.append(_kv_line(plan))
    lines += [f"note: {note}" for note in plan["notes"]]
    lines += [f"warning: {warning}" for warning in plan["warnings"]]
    gpus = any(device.isdigit() for device in plan["devices"])
    allowance = " (activations: a 2 GiB allowance per GPU; vLLM measures its own at start)"
    lines.append(f"fits{allowance if gpus else ''}" if plan["fits"] else "does not fit")
    return "\n".join(lines)


def _fraction(plan: Mapping[str, Any]) -> str:
    source = plan["gpu_sizes_from"]
    if plan["gpu_memory_utilization"] is not None:
        return (
            f"; gpu_memory_utilization {plan['gpu_memory_utilization']:.4f} (GPU sizes: {source})"
        )
    return "; reserved: each GPU's max_memory" if source == "max_memory" else ""


def _kv_line(plan: Mapping[str, Any]) -> str:
    if plan["kv_bytes_per_token"] is None:
        return f"KV cache per token: unknown ({plan['kv_per_token_from']})"
    line = (
        f"KV cache: {plan['kv_bytes_per_token'] / 1024:.1f} KiB per token per GPU "
        f"({plan['kv_per_token_from']}); room for {plan['kv_tokens']:,} tokens"
    )
    if plan["sequences"] is not None:
        line += f": {plan['sequences']:,} sequences of max_model_len {plan['max_model_len']:,}"
    return line


def _label(device: str) -> str:
    return f"GPU {device}" if device.isdigit() else device


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"
