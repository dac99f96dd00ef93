"""Hand events from the generation thread to the event loop with one wake-up per burst.

Waking an asyncio loop from another thread (`call_soon_threadsafe`) writes to its self-pipe,
and the woken loop thread then competes with the generation thread for the GIL. Done once
per row per token, that took a fifth of the generation thread's time (py-spy on the
benchmark model, one 16-token request at a time). A mailbox wakes the loop once for
everything posted since the loop last emptied it: at most once per decoding step, however
many rows the batch holds, and the loop delivers the events in the order they were posted.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable


class Mailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: `Mailboxes` keys on the loop, and a strong reference here would keep it alive.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._scheduled = False

    def post(self, deliver: Callable[[], None]) -> None:
        """Run `deliver` on the loop soon (thread-safe, in posting order)."""
        with self._lock:
            self._pending.append(deliver)
            if self._scheduled:
                return  # a wake-up is on its way and will take this one too
            self._scheduled = True
        loop = self._loop()
        if loop is not None:  # a loop that is gone has nobody left to deliver to
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for deliver in pending:
            deliver()


class Mailboxes:
    """One mailbox per running event loop (tests may run several loops in turn)."""

    def __init__(self) -> None:
        self._boxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
            weakref.WeakKeyDictionary()
        )

    def for_loop(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        box = self._boxes.get(loop)
        if box is None:
            box = self._boxes[loop] = Mailbox(loop)
        return box
