"""The gateway's side of a started engine: start it under its guard, wait until it
answers its ready path, relay its log, probe it, stop its whole tree.

The engine listens on a private port on 127.0.0.1 (or the unix socket its `command`
names) and is spoken to as any OpenAI-compatible upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.backends.upstream import Upstream

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
READY_POLL_S = 0.5
HOST = "127.0.0.1"


class EngineFailed(Exception):
    """The engine exited, or never became ready (a message for the user)."""


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now. The engine binds it a moment later; a clash there
    makes that start fail and the next request start another."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def exit_code(process: asyncio.subprocess.Process) -> int:
    """A process's exit code once it has exited. `Process.wait()` also waits for its pipes
    to close, which a child it left behind may hold open for good."""
    waiting = asyncio.ensure_future(process.wait())
    try:
        while process.returncode is None and not waiting.done():
            await asyncio.wait({waiting}, timeout=0.1)
    finally:
        waiting.cancel()
    code = process.returncode
    assert code is not None
    return code


class EngineProcess:
    """One started engine: its guard process, its upstream, its log tail."""

    scales_itself = False

    def __init__(
        self,
        name: str,
        engine: str,
        process: asyncio.subprocess.Process,
        upstream: Upstream,
        ready_path: str,
        grace_s: float,
    ) -> None:
        self.name = name
        self.engine = engine
        self.process = process
        self.pid: int | None = process.pid
        self.upstream = upstream
        self.probe_path: str | None = ready_path
        self.runtime: dict[str, Any] = {"engine": engine}
        self.log_tail: deque[str] = deque(maxlen=30)
        self._grace_s = grace_s
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(
        cls,
        name: str,
        engine: str,
        argv: list[str],
        env: dict[str, str],
        upstream: Upstream,
        ready_path: str,
        grace_s: float = 10.0,
    ) -> EngineProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.backends.engines.guard",
            f"{grace_s:g}",
            "--",
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            limit=2**20,
        )
        started = cls(name, engine, process, upstream, ready_path, grace_s)
        assert process.stdout is not None
        started._tasks.append(asyncio.create_task(started._relay(process.stdout)))
        started._tasks.append(asyncio.create_task(started._watch_exit()))
        return started

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._exited

    async def wait_ready(self, on_progress: Progress) -> None:
        """Poll the ready path until it answers 200; raise EngineFailed if the engine exits
        first. The load time-out is the supervisor's."""
        assert self.probe_path is not None
        began = time.monotonic()
        while not self._exited.done():
            try:
                await self.upstream.check(self.probe_path, timeout=5.0)
                return
            except Exception:  # not listening yet, or answering 503 while it loads
                pass
            elapsed = time.monotonic() - began
            last = self.log_tail[-1] if self.log_tail else ""
            on_progress(
                {
                    "event": "progress",
                    "stage": "starting",
                    "message": f"starting {self.engine} ({elapsed:.0f}s){': ' if last else ''}"
                    f"{last[:200]}",
                    "fraction": None,
                }
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), READY_POLL_S)
        await asyncio.sleep(0.05)  # the relay's last lines
        tail = " | ".join(list(self.log_tail)[-5:])
        raise EngineFailed(
            f"the {self.engine} engine exited with code {self._exited.result()} while "
            f"starting: {tail}"
        )

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to the guard, which stops the whole tree within its own grace; SIGKILL
        to the guard's process group only if the guard itself does not end."""
        if self.process.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._exit_code(), max(grace_s, self._grace_s) + 6.0)
            except asyncio.TimeoutError:
                log.warning("the guard of %r did not end; killing its group", self.name)
                self._signal(signal.SIGKILL)
                await self._exit_code()
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        await self.upstream.aclose()
        _, late = await asyncio.wait(self._tasks, timeout=1.0) if self._tasks else ((), ())
        for task in late:
            task.cancel()

    def kill_now(self) -> None:
        """Last resort at interpreter exit. Closing the guard's stdin would do too; this
        does not wait for the event loop."""
        if self.process.returncode is None:
            self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, sig)
            else:
                os.kill(self.process.pid, sig)

    async def _watch_exit(self) -> None:
        code = await self._exit_code()
        if code < 0:
            log.warning("the guard of %r was killed (signal %d)", self.name, -code)
        # A guard that was killed could not take its tree down; what stayed in its process
        # group (vLLM's processes do) goes now. After a clean exit the group is empty. The
        # group's id cannot be reused while a member lives, so this reaches no stranger.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if not self._exited.done():
            self._exited.set_result(code)

    async def _exit_code(self) -> int:
        return await exit_code(self.process)

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                self.log_tail.append(text)
                log.info("[%s] %s", self.name, text)
