"""What a loaded model holds, as the worker reports it (`lifecycle.budget.measured` reads it).

On a GPU the weights are only part of it: the CUDA context (0.3-0.6 GiB per GPU before
anything is allocated), the caching allocator's reserve beyond what is allocated, memory
libraries take outside the allocator (cuBLAS workspaces, kernels loaded on first use),
and the KV cache, which grows with the batch and is counted at its bound: every row of
the largest batch at the full context. The report gives each part per GPU (keyed by the
worker's local ordinal) so that the budget counts what the model can come to hold.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass, field
from typing import Any

# What a CUDA context takes before the first allocation: not visible to the allocator,
# and not measurable from inside the process once the context exists.
CUDA_CONTEXT_BYTES = 512 * 2**20
_LAYER = re.compile(r"\.(\d+)$")


@dataclass(frozen=True)
class Baseline:
    """Device-wide used bytes per visible GPU, read after its context exists, before load."""

    used: dict[int, int] = field(default_factory=dict)


def baseline(gpus: int) -> Baseline:
    if gpus == 0:
        return Baseline()
    return Baseline({i: _used(i) for i in range(gpus)})


def memory_report(
    model: Any, start: Baseline, max_batch_size: int, context_length: int
) -> dict[str, Any]:
    import torch

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    report: dict[str, Any] = {"weights_bytes": weights, "rss_bytes": current_rss()}
    kv = kv_cache_bound(model.config, model.dtype, max_batch_size, context_length)
    report["kv_cache_bytes"] = kv
    if not torch.cuda.is_available():
        return report
    gpus = range(torch.cuda.device_count())
    reserved = {i: int(torch.cuda.memory_reserved(i)) for i in gpus}
    report["gpu_bytes"] = {str(i): int(torch.cuda.memory_allocated(i)) for i in gpus}
    report["gpu_reserved_bytes"] = {str(i): reserved[i] for i in gpus}
    report["gpu_context_bytes"] = {str(i): _context(i, start, reserved[i]) for i in gpus}
    placed = _weights_by_gpu(model)
    report["gpu_weights_bytes"] = {str(i): placed.get(i, 0) for i in gpus}
    report["gpu_kv_cache_bytes"] = {str(i): b for i, b in _kv_by_gpu(model, kv).items()}
    return report


def kv_cache_bound(config: Any, dtype: Any, max_batch_size: int, context_length: int) -> int:
    """Keys and values of every layer for a full batch at the full context (0: unknown)."""
    from gateway.worker.sizing import kv_bytes_per_token

    itemsize = int(getattr(dtype, "itemsize", 0) or 0)
    per_token = kv_bytes_per_token(config, itemsize) or 0
    return per_token * max_batch_size * context_length


def _placement(model: Any) -> dict[str, int | str]:
    from gateway.worker.placing import device_of

    placed = getattr(model, "hf_device_map", None) or {"": getattr(model, "device", "cpu")}
    return {module: device_of(device) for module, device in placed.items()}


def _weights_by_gpu(model: Any) -> dict[int, int]:
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model)
    placed: dict[int, int] = {}
    for module, device in _placement(model).items():
        if isinstance(device, int):
            placed[device] = placed.get(device, 0) + int(sizes.get(module, 0))
    return placed


def _kv_by_gpu(model: Any, kv: int) -> dict[int, int]:
    """The KV bound shared out as the decoder layers are: each layer caches on its device."""
    placed = _placement(model)
    layers = [d for m, d in placed.items() if _LAYER.search(m) and isinstance(d, int)]
    if not layers:  # one device holds the whole model (or the map names no layers)
        gpus = [d for d in placed.values() if isinstance(d, int)]
        return {gpus[0]: kv} if gpus else {}
    share: dict[int, int] = {}
    for device in layers:
        share[device] = share.get(device, 0) + kv // len(layers)
    return share


def _context(gpu: int, start: Baseline, reserved: int) -> int:
    """The context, plus what the process took on the GPU outside the allocator since."""
    if gpu not in start.used:
        return CUDA_CONTEXT_BYTES
    outside_allocator = _used(gpu) - start.used[gpu] - reserved
    return CUDA_CONTEXT_BYTES + max(0, outside_allocator)


def _used(gpu: int) -> int:
    import torch

    free, total = torch.cuda.mem_get_info(gpu)
    return int(total) - int(free)


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
