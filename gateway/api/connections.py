"""Bounds on client connections: time to send a request, and how many stay open.

uvicorn closes a keep-alive connection that stays silent after a response, but nothing
bounds a connection that never sends a request, or sends it a byte at a time; each holds a
file descriptor, and once the descriptors run out the gateway accepts nothing, not even
`/health`. `GuardedH11Protocol` (uvicorn's h11 protocol, passed as `Config(http=...)`)
closes a connection whose request header is not complete `header_timeout_s` after it
opened or after its previous response ended, or whose request body is not in within
`BODY_TIMEOUT_FACTOR` times as long.
When `max_connections` are open (fewer where the process's descriptor limit is lower), a
new connection closes the oldest one that is waiting for a request header; when none is
waiting, every open connection is busy with a request, and the new one is closed instead.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
# Descriptors kept for everything but client connections: worker pipes and sockets,
# connections to upstreams, log files, the config watcher.
RESERVED_FDS = 128
# A request body must arrive within this many header timeouts (60 s by default) from the end
# of its header, however its bytes are spaced: enough for a 4 MiB body at 70 KiB/s.
BODY_TIMEOUT_FACTOR = 6.0


def descriptor_cap(max_connections: int) -> int:
    """`max_connections`, lowered so client connections leave room under RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, max(soft // 2, soft - RESERVED_FDS)))


class ConnectionGuard:
    """The open connections of one server, the oldest waiting for a header first."""

    def __init__(self, limits: Callable[[], tuple[float, int]]) -> None:
        self.limits = limits  # (header_timeout_s, max_connections), read live: a reload applies
        self.open: set[GuardedH11Protocol] = set()
        self.waiting: dict[GuardedH11Protocol, None] = {}  # insertion order: oldest first
        self._warned_at = -1e9

    @property
    def header_timeout_s(self) -> float:
        return self.limits()[0]

    def admit(self, connection: GuardedH11Protocol) -> bool:
        """Count a new connection; False if it is to be closed at once."""
        self.open.add(connection)
        if len(self.open) <= descriptor_cap(self.limits()[1]):
            return True
        self._warn()
        oldest = next(iter(self.waiting), None)
        if oldest is None:
            return False
        oldest.close_quietly()
        return True

    def forget(self, connection: GuardedH11Protocol) -> None:
        self.open.discard(connection)
        self.waiting.pop(connection, None)

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning(
                "%d client connections open (gateway.max_connections): closing the "
                "oldest one that has not sent a request",
                len(self.open),
            )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, counted by a `ConnectionGuard`."""

    guard: ConnectionGuard  # set by `guarded_protocol`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_body = False  # the body's deadline is set once, when its header is in

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.guard.admit(self):
            self._await_header()
        else:
            self.close_quietly()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:
            return  # the header's deadline runs on, however slowly its bytes come
        self.guard.waiting.pop(self, None)  # a request header is in
        if state is h11.SEND_BODY:
            if not self._reading_body:  # a body trickled in a byte at a time ends too
                self._reading_body = True
                self._arm(BODY_TIMEOUT_FACTOR)
        else:
            self._reading_body = False
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_header()

    def close_quietly(self) -> None:
        self._disarm()
        self.guard.forget(self)  # now: its descriptor is as good as free
        if not self.transport.is_closing():
            self.transport.close()

    def _await_header(self) -> None:
        self.guard.waiting[self] = None
        self._arm()

    def _arm(self, factor: float = 1.0) -> None:
        self._disarm()
        timeout = self.guard.header_timeout_s * factor
        self._deadline = self.loop.call_later(timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        state = self.conn.their_state
        # A body is late only when we were reading: uvicorn pauses reading while the app
        # has not taken what arrived.
        if state is h11.IDLE or (state is h11.SEND_BODY and not self.flow.read_paused):
            self.close_quietly()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """A protocol class bound to one server's guard, for `uvicorn.Config(http=...)`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
