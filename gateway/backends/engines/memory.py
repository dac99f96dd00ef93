"""What vLLM takes of each device: the one computation behind its
`--gpu-memory-utilization`, the gateway's memory budgets, and `llm-gateway plan`.

vLLM preallocates. On each GPU of a model it claims `gpu_memory_utilization` of the GPU's
total memory (its weights' shard, activations, and a KV cache that fills the rest), unless
`--kv-cache-memory-bytes` sizes the cache, in which case it claims about its weights, the
cache and the activations. vLLM's CPU build claims the weights and a KV cache of
`VLLM_CPU_KVCACHE_SPACE` GiB (which wins over `--kv-cache-memory-bytes`); with neither
set it grows to `gpu_memory_utilization` of the machine's RAM.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping

from gateway.registry.config import ModelEntry

GIB = 2**30
DEFAULT_UTILIZATION = 0.92  # vLLM 0.32's own default for --gpu-memory-utilization
MAX_UTILIZATION = 0.95  # the most the gateway derives from `max_memory`
# Per GPU, on top of the weights: activations of vLLM's profiling batch, the CUDA context,
# NCCL buffers and CUDA graphs. vLLM measures the real figure at start (its log says
# "Available KV cache memory"); this is the plan's stated allowance.
ACTIVATION_ALLOWANCE = 2 * GIB
KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"

Footprint = dict[str, int]


class EngineConfigError(Exception):
    """The entry cannot be turned into a command line (a message for the user)."""


def flag_value(entry: ModelEntry, name: str) -> str | None:
    """The value `engine_args` gives `--name` (the last one wins, as in vLLM), or None."""
    value = entry.engine_args
    found: str | None = None
    if isinstance(value, Mapping):
        for flag, item in value.items():
            if _flag(flag) == name and item is not False:
                found = "true" if item is True else str(item)
        return found
    items = list(value or [])
    for index, item in enumerate(items):
        flag, equals, inline = item.partition("=")
        if not item.startswith("-") or _flag(flag) != name:
            continue
        following = items[index + 1] if index + 1 < len(items) else "-"
        found = inline if equals else ("true" if following.startswith("-") else following)
    return found


def _flag(text: str) -> str:
    return text.lstrip("-").replace("_", "-").lower()


def tensor_parallel_size(entry: ModelEntry) -> int:
    """One shard per GPU of `devices` (what the gateway passes), unless `engine_args` says."""
    given = flag_value(entry, "tensor-parallel-size")
    if given is not None:
        if not given.isdigit() or int(given) < 1:
            raise EngineConfigError(f"--tensor-parallel-size {given!r} is not a positive integer")
        return int(given)
    return len(entry.devices) if isinstance(entry.devices, list) else 1


def derived_utilization(entry: ModelEntry, totals: Mapping[str, int] | None) -> float | None:
    """`max_memory` as vLLM's one fraction per GPU: the smallest budget's share of its GPU
    (vLLM applies one fraction to every GPU of the model); None without `max_memory`."""
    if entry.devices == "cpu" or not entry.max_memory:
        return None
    gpus = [str(d) for d in entry.devices]
    sizes = dict(totals) if totals is not None else gpu_total_bytes()
    missing = [g for g in gpus if g not in sizes]
    if missing:
        raise EngineConfigError(
            f"cannot turn max_memory into vLLM's gpu_memory_utilization: GPU {missing[0]} "
            "is not listed by nvidia-smi; leave `max_memory` out or fix `devices`"
        )
    share = min(entry.max_memory[g] / sizes[g] for g in gpus)
    return round(min(share, MAX_UTILIZATION), 4)


def utilization(entry: ModelEntry, totals: Mapping[str, int] | None) -> float:
    """The fraction vLLM will run with: `engine_args`, else `max_memory`'s, else its own."""
    given = flag_value(entry, "gpu-memory-utilization")
    if given is not None:
        try:
            return float(given)
        except ValueError:
            raise EngineConfigError(f"--gpu-memory-utilization {given!r} is not a number") from None
    derived = derived_utilization(entry, totals)
    return DEFAULT_UTILIZATION if derived is None else derived


def explicit_kv_bytes(entry: ModelEntry, environ: Mapping[str, str]) -> int | None:
    """The KV cache size the entry fixes, or None when vLLM sizes it from the fraction.
    `environ` is the gateway's: the engine inherits it, under the entry's `env`."""
    if entry.devices == "cpu":
        space = entry.env.get(KV_SPACE_ENV, environ.get(KV_SPACE_ENV, ""))
        if space.strip():
            if not space.strip().isdigit():
                raise EngineConfigError(f"{KV_SPACE_ENV}={space!r} is not a whole number of GiB")
            return int(space) * GIB
    given = flag_value(entry, "kv-cache-memory-bytes")
    return None if given is None or given == "auto" else human_int(given)


def human_int(text: str) -> int:
    """vLLM's integers: 4096, 25.6k (decimal k/m/g/t), 4G (binary K/M/G/T)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)([kmgtKMGT]?)\s*", text)
    if match is None:
        raise EngineConfigError(f"{text!r} is not a size vLLM reads (such as 4G or 4294967296)")
    number, suffix = match.groups()
    scale = {"": 1, **{u: 1000 ** (i + 1) for i, u in enumerate("kmgt")}}
    scale.update({u: 1024 ** (i + 1) for i, u in enumerate("KMGT")})
    return int(float(number) * scale[suffix])


def reservation(
    entry: ModelEntry,
    weights_bytes: int,
    environ: Mapping[str, str],
    totals: Mapping[str, int] | None,
    ram_bytes: int | None = None,
) -> Footprint:
    """Bytes vLLM will hold on each device of the entry. `weights_bytes` is the whole
    model's; `totals` each GPU's memory (None: ask nvidia-smi); `ram_bytes` the machine's."""
    kv = explicit_kv_bytes(entry, environ)
    if entry.devices == "cpu":
        if kv is None and ram_bytes is not None:
            return {"cpu": int(utilization(entry, None) * ram_bytes)}
        return {"cpu": weights_bytes + (kv or 0)}
    gpus = [str(d) for d in entry.devices]
    if kv is not None:
        shard = -(-weights_bytes // tensor_parallel_size(entry))
        return {g: shard + kv + ACTIVATION_ALLOWANCE for g in gpus}
    sizes = dict(totals) if totals is not None else gpu_total_bytes()
    missing = [g for g in gpus if g not in sizes]
    if missing:
        raise EngineConfigError(f"GPU {missing[0]} of `devices` is not listed by nvidia-smi")
    fraction = utilization(entry, sizes)
    return {g: int(fraction * sizes[g]) for g in gpus}


def gpu_total_bytes() -> dict[str, int]:
    """Each GPU's memory by nvidia-smi index (the numbering `devices` uses)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise EngineConfigError("sizing vLLM's share of the GPUs needs nvidia-smi")
    out = subprocess.run(
        [smi, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if out.returncode != 0:
        raise EngineConfigError(f"nvidia-smi failed: {out.stderr.strip() or out.returncode}")
    sizes: dict[str, int] = {}
    for line in out.stdout.splitlines():
        index, _, mib = line.partition(",")
        if index.strip().isdigit() and mib.strip().isdigit():
            sizes[index.strip()] = int(mib.strip()) * 2**20
    return sizes
