"""Hot reload of models.yaml: on a file change, SIGHUP or POST /admin/reload.

An invalid file is rejected as a whole: the registry in force stays, and the error is kept
for GET /admin/config and written to the log. A valid one is applied by the supervisor,
which keeps unchanged models loaded and untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gateway.registry import ConfigError, LoadedRegistry, load_registry
from gateway.supervisor import Supervisor

log = logging.getLogger(__name__)
NEEDS_RESTART = ("host", "port")


class Reloader:
    def __init__(self, loaded: LoadedRegistry, supervisor: Supervisor) -> None:
        self.loaded = loaded
        self.supervisor = supervisor
        self.loaded_at = time.time()
        self.last_error: str | None = None
        self.last_report: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self.loaded.path

    async def reload(self) -> dict[str, Any]:
        """Re-read the file and apply it; raises ConfigError (keeping the old registry)."""
        async with self._lock:
            try:
                fresh = load_registry(self.path)
            except ConfigError as exc:
                self.last_error = exc.render()
                log.error("models.yaml rejected; the previous configuration stays:\n%s", exc)
                raise
            self.last_error = None
            if fresh.digest == self.loaded.digest:
                return {"applied": False, "reason": "the file has not changed"}
            old = self.loaded.registry.gateway
            restart = [
                k for k in NEEDS_RESTART if getattr(old, k) != getattr(fresh.registry.gateway, k)
            ]
            report = asdict(self.supervisor.apply(fresh.registry))
            self.loaded = fresh
            self.loaded_at = time.time()
            self.last_report = {"applied": True, **report, "restart_required": restart}
            log.info("models.yaml reloaded: %s", self.last_report)
            if restart:
                log.warning("gateway.%s changed: takes effect after a restart", ", ".join(restart))
            return self.last_report

    async def reload_quietly(self) -> None:
        with contextlib.suppress(ConfigError):  # recorded in last_error and the log
            await self.reload()

    async def watch(self, interval_s: float = 1.0) -> None:
        """Poll the file; reload when its size or modification time changes."""
        seen = _stamp(self.path)
        while True:
            await asyncio.sleep(interval_s)
            stamp = _stamp(self.path)
            if stamp != seen:
                seen = stamp
                await self.reload_quietly()

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "digest": self.loaded.digest,
            "loaded_at": self.loaded_at,
            "last_error": self.last_error,
            "last_reload": self.last_report,
            "registry": self.loaded.registry.model_dump(mode="json"),
        }


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
