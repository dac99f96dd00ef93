"""How many intra-op threads each CPU worker gets (torch-free: the gateway decides).

Intra-op threads that outnumber the free cores spin against each other (OpenMP workers
busy-wait), and two CPU workers that each take every core do the same to each other. So
each CPU worker gets a share: the `threads` of its entry where given (or an
OMP_NUM_THREADS written in its `env:`), otherwise the machine's cores, less one left to
the gateway's own event loop where there is more than one (as vLLM leaves one to its API
server), divided among the CPU workers running when it starts, never more than the cores.
Shares are computed at launch: a worker keeps its count until it is restarted, so loading
a second CPU model does not shrink the first one's.

The count reaches the worker before torch starts (OMP_NUM_THREADS and MKL_NUM_THREADS in
its environment) and as THREADS_ENV, which the worker applies with torch.set_num_threads.
GPU workers keep torch's own default unless their entry gives `threads`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from gateway.registry.config import ModelEntry

THREADS_ENV = "LLMGW_THREADS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, narrowed by a cgroup CPU quota
    (a container limited to 2 CPUs on a 64-core host has 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    return max(1, cores)


def is_cpu(entry: ModelEntry) -> bool:
    return not isinstance(entry.devices, list)


def share(entry: ModelEntry, cpu_workers: int, cores: int) -> int | None:
    """The thread count of a worker for `entry` when `cpu_workers` CPU workers, itself
    included, run on `cores` cores; None leaves torch's default (GPU workers)."""
    if entry.threads is not None:
        return entry.threads
    written = entry.env.get("OMP_NUM_THREADS", "")
    if written.isdigit() and int(written) > 0:  # set by hand in the entry's `env:`: it wins
        return int(written)
    if not is_cpu(entry):
        return None
    spare = cores - 1 if cores > 1 else 1  # one core for the gateway's event loop
    return max(1, min(cores, spare // max(1, cpu_workers)))


def environment(threads: int | None) -> dict[str, str]:
    if threads is None:
        return {}
    count = str(threads)
    return {"OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count, THREADS_ENV: count}


class CoreShares:
    """Counts the CPU workers started and not yet exited, so that each new one gets its
    share of the cores. A claim is counted from before the process starts, so two models
    loading at once see each other."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or available_cores()
        self.running = 0

    def claim(self, entry: ModelEntry) -> Claim:
        counted = is_cpu(entry)
        if counted:
            self.running += 1
        return Claim(self, share(entry, self.running, self.cores), counted)


class Claim:
    """One worker's share; `release` (idempotent) when its process has exited."""

    def __init__(self, shares: CoreShares, threads: int | None, counted: bool) -> None:
        self.shares = shares
        self.threads = threads
        self.env = environment(threads)
        self._counted = counted

    def release(self) -> None:
        if self._counted:
            self._counted = False
            self.shares.running -= 1
