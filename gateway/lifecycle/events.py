"""A small broadcast of lifecycle events (state changes, load progress) to SSE listeners."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager
from typing import Any

QUEUE_SIZE = 256


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def publish(self, event: dict[str, Any]) -> None:
        stamped = {"time": time.time(), **event}
        for queue in self._subscribers:
            if queue.full():  # a slow listener loses its oldest events, never blocks us
                queue.get_nowait()
            queue.put_nowait(stamped)

    @contextmanager
    def subscribe(self) -> Any:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        with self.subscribe() as queue:
            while True:
                yield await queue.get()
