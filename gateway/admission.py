"""Per-model admission control, checked before any tokenizing or forwarding.

At most `max_concurrency` requests of a model run at once; at most `max_queue` more wait,
first come first served. A request that finds the queue full is refused at once (429 with
Retry-After); one that waits longer than `queue_timeout_s` gets 503. Every admitted
request either runs or receives one of those errors: none is dropped.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.config import Limits
from gateway.errors import ModelUnavailable, RateLimited


class Admission:
    def __init__(self, name: str, limits: Limits) -> None:
        self.name = name
        self.limits = limits
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.running < self.limits.max_concurrency and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.limits.max_queue:
            raise RateLimited(
                f"model {self.name!r} is at capacity ({self.running} running, "
                f"{len(self._waiters)} queued); retry shortly",
                headers={"Retry-After": "1"},
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.limits.queue_timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the permit arrived as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ModelUnavailable(
                f"model {self.name!r} had no free slot within {self.limits.queue_timeout_s:g}s",
                code="queue_timeout",
                headers={"Retry-After": "5"},
            ) from None

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the permit moves to the waiter; running is unchanged
                return
        self.running -= 1
