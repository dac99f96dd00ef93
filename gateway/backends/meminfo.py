"""The kernel's memory figures (/proc/meminfo), read without torch: the gateway sizes
vLLM's CPU share from them and the worker its batch."""

from __future__ import annotations

import functools

MEMINFO = "/proc/meminfo"


def meminfo_bytes(field: str, path: str = MEMINFO) -> int | None:
    """`field` of /proc/meminfo (`MemTotal`, `MemAvailable`) in bytes, or None if unknown."""
    try:
        with open(path) as lines:
            for line in lines:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@functools.cache
def ram_total() -> int | None:
    """The machine's RAM. It does not change while the gateway runs: read once."""
    return meminfo_bytes("MemTotal")
