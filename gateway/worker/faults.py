"""What kind of failure an exception from a model is: one detector, used everywhere.

Running out of memory is not a bug: the request (or the load) was too big for the memory
left, so it is reported as such (503, `out_of_memory`) and the worker keeps serving.
`torch.OutOfMemoryError` exists only from torch 2.5 on; older builds raise
`torch.cuda.OutOfMemoryError` (from 1.13) or a plain `RuntimeError` whose message says so,
and the CPU allocator raises a `RuntimeError` of its own. So the types are looked up where
they exist, never assumed, and the message is the fallback. torch is not imported here: an
exception that torch raised means torch is already loaded.
"""

from __future__ import annotations

import sys

_MESSAGES = ("out of memory", "outofmemory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True if `exc`, or an exception it was raised from, means memory ran out."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _memory_error_types()):
            return True
        text = f"{type(current).__name__} {current}".lower()
        if any(message in text for message in _MESSAGES):
            return True
        current = current.__cause__
    return False


def _memory_error_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [MemoryError]
    torch = sys.modules.get("torch")
    for owner in (torch, getattr(torch, "cuda", None)):
        kind = getattr(owner, "OutOfMemoryError", None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            found.append(kind)
    return tuple(found)
