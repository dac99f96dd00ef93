"""Hot reload of models.yaml: on a file change, SIGHUP or POST /admin/reload.

An invalid file is rejected as a whole: the registry in force stays, and the error is kept
for GET /admin/config and written to the log. A valid one is applied by the supervisor,
which keeps unchanged models loaded and untouched. The key sources named in `gateway.auth`
are read again at every reload (and their files are watched with models.yaml); a source
that is now missing or empty rejects the reload like an invalid file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from gateway.api.auth import Keys, KeySourceError, key_files, load_keys
from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.config import GatewaySettings
from gateway.registry.load import (
    ConfigError,
    ConfigIssue,
    LoadedRegistry,
    load_registry,
    require_cluster_for,
)

log = logging.getLogger(__name__)

# What a reload does with each `gateway:` key. "live": read from the settings in force at
# each use, so the reload applies it; "restart": read once at start, so a change is listed
# in `restart_required` and logged. A key missing here is reported as needing a restart.
ON_RELOAD: dict[str, Literal["live", "restart"]] = {
    "host": "restart",  # the listening socket is bound at start
    "port": "restart",
    "default_model": "live",  # the supervisor's registry
    "idle_unload_s": "live",
    "load_timeout_s": "live",
    "drain_timeout_s": "live",
    "probe_interval_s": "live",  # the prober, from its next interval
    "probe_failures": "live",
    "memory_budget": "live",  # residency plans every load against the budget in force
    "max_body_bytes": "live",  # BodyLimit, per request
    "cache_dir": "restart",  # the worker launcher is built with it at start
    "envs_dir": "restart",
    "auto_build_envs": "restart",  # the worker launcher is built with it at start
    "watch_config": "live",  # the watcher runs always and asks at each poll
    "cors_origins": "live",  # LiveCORS, per request
    "auth": "live",  # key sources re-read at every reload; ApiKeyAuth, per request
    "header_timeout_s": "live",  # ConnectionGuard, per new connection
    "max_connections": "live",
    "playground": "live",  # read per request by the playground's routes
    "cluster": "restart",  # the launcher is chosen at start
}


def restart_required(old: GatewaySettings, new: GatewaySettings) -> list[str]:
    return [
        key
        for key in type(new).model_fields
        if ON_RELOAD.get(key) != "live" and getattr(old, key) != getattr(new, key)
    ]


class Reloader:
    def __init__(self, loaded: LoadedRegistry, supervisor: Supervisor, keys: Keys) -> None:
        self.loaded = loaded
        self.supervisor = supervisor
        self.keys = keys  # the API keys in force
        self.loaded_at = time.time()
        self.last_error: str | None = None
        self.last_report: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self.loaded.path

    def settings(self) -> GatewaySettings:
        """The `gateway:` settings in force."""
        return self.loaded.registry.gateway

    async def reload(self) -> dict[str, Any]:
        """Re-read the file and key sources and apply them; raises ConfigError (keeping the
        configuration in force)."""
        async with self._lock:
            try:
                # Reading and parsing block: off the event loop, so /health keeps answering.
                fresh, keys = await asyncio.to_thread(self._read)
            except ConfigError as exc:
                self.last_error = exc.render()
                log.error("models.yaml rejected; the previous configuration stays:\n%s", exc)
                raise
            self.last_error = None
            keys_changed = keys != self.keys
            if fresh.digest == self.loaded.digest and not keys_changed:
                return {"applied": False, "reason": "neither the file nor its key sources changed"}
            restart = restart_required(self.settings(), fresh.registry.gateway)
            report = asdict(self.supervisor.apply(fresh.registry))
            # Swapped together, with no await in between: a request sees all or nothing.
            self.loaded, self.keys = fresh, keys
            self.loaded_at = time.time()
            self.last_report = {
                "applied": True,
                **report,
                "keys_changed": keys_changed,
                "restart_required": restart,
            }
            log.info("models.yaml reloaded: %s", self.last_report)
            if restart:
                keys_text = ", ".join(f"gateway.{k}" for k in restart)
                log.warning("%s changed: takes effect after a restart", keys_text)
            return self.last_report

    def _read(self) -> tuple[LoadedRegistry, Keys]:
        fresh = load_registry(self.path)
        require_cluster_for(fresh, self.supervisor.cluster)
        try:
            return fresh, load_keys(fresh.registry.gateway.auth)
        except KeySourceError as exc:
            loc = ("gateway", "auth", exc.key)
            hint = "fix the source, or remove it from gateway.auth to turn its keys off"
            issue = ConfigIssue(".".join(loc), str(exc), hint, fresh.line(loc))
            raise ConfigError(str(self.path), [issue]) from None

    async def reload_quietly(self) -> None:
        """Reload for the watcher and SIGHUP, where nobody waits for an answer: log, never raise."""
        try:
            await self.reload()
        except ConfigError:
            pass  # recorded in last_error and the log
        except Exception:
            log.exception("reloading %s failed; the previous configuration stays", self.path)

    async def watch(self, interval_s: float = 1.0) -> None:
        """Poll the file and its key files while `watch_config` is on; reload on a change.

        Never ends on an error: a failed poll or reload is logged and the next poll runs.
        """
        seen = self._stamps()
        while True:
            await asyncio.sleep(interval_s)
            try:
                stamps = self._stamps()
                if stamps != seen:
                    seen = stamps
                    if self.settings().watch_config:
                        await self.reload_quietly()
            except Exception:
                log.exception("watching %s failed; still watching", self.path)

    def _stamps(self) -> tuple[tuple[int, int] | None, ...]:
        paths = [self.path, *map(Path, key_files(self.settings().auth))]
        return tuple(_stamp(p) for p in paths)

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
        stat = path.expanduser().stat()
    except (OSError, RuntimeError):
        return None
    return stat.st_mtime_ns, stat.st_size
