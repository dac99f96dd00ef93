"""Per-model admission control, checked before any tokenizing or forwarding.

At most `max_concurrency` requests of a model run at once; at most `max_queue` more wait,
first come first served. A request that finds the queue full is refused at once (429 with
Retry-After); one that waits longer than `queue_timeout_s` gets 503. Every admitted
request either runs or receives one of those errors: none is dropped.

A model has one `Admission` for its whole life: a reload that changes its limits updates
it in place, so the requests admitted before the reload are still counted (by the drain at
shutdown, and against the concurrency limit).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.errors import ModelUnavailable, RateLimited
from gateway.registry.config import Limits


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

    def update(self, limits: Limits) -> None:
        """New limits for new requests; those already admitted stay counted here.

        A lower `max_concurrency` lets running requests finish and admits no one until
        fewer than the new limit run; a higher one admits queued requests at once.
        """
        self.limits = limits
        self._grant()

    def _release(self) -> None:
        self.running -= 1
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.running < self.limits.max_concurrency:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.running += 1
                waiter.set_result(None)
