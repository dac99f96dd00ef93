"""API keys: Bearer tokens checked before any route runs.

Policy by path, whatever the prefix: `/health` and `/ready` are open (probes); `/admin/*`
needs an admin key (or, when no admin keys are configured, an API key); everything else
(inference, model listing, metrics, the OpenAPI document) needs an API key. With no keys
configured at all the gateway is open, which is why it binds 127.0.0.1 by default.
The playground's page and assets are open too: static files, and the page sends the key.
Open paths are open to GET and HEAD only.
Keys come from an environment variable (comma-separated) or a file (one per line, `#`
comments), never from models.yaml, and are compared in constant time. The keys in force
are read through a callable at every request, so a reload that re-reads the sources (and
swaps the result in) takes effect at the next request.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.middleware import send_error
from gateway.api.routes.playground import PATHS as PLAYGROUND_PATHS
from gateway.errors import Forbidden, GatewayError, Unauthorized
from gateway.registry.config import Auth
from gateway.registry.yaml_reader import YamlProblem, decode, read_bytes

# Probes, and the playground's static files (they hold no data; the page sends the key).
OPEN_PATHS = frozenset({"/health", "/ready", *PLAYGROUND_PATHS})


class KeySourceError(Exception):
    """A configured key source (variable or file) is missing, unreadable or empty."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key  # the `gateway.auth` key that names the source


@dataclass(frozen=True)
class Keys:
    api: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)


def load_keys(auth: Auth) -> Keys:
    """Read every configured source now (blocking I/O); raises KeySourceError."""
    api = _read(auth.api_keys_env, auth.api_keys_file, "api_keys")
    admin = _read(auth.admin_keys_env, auth.admin_keys_file, "admin_keys")
    return Keys(tuple(api), tuple(admin))


def key_files(auth: Auth) -> list[str]:
    """The files keys are read from (what a watcher of the configuration also watches)."""
    return [f for f in (auth.api_keys_file, auth.admin_keys_file) if f is not None]


def _read(env: str | None, file: str | None, kind: str) -> list[str]:
    keys: list[str] = []
    if env is not None:
        value = os.environ.get(env)
        if not value:
            message = f"environment variable {env} (named in gateway.auth) is not set"
            raise KeySourceError(message, f"{kind}_env")
        keys += [k.strip() for k in value.split(",") if k.strip()]
    if file is not None:
        try:
            lines = decode(read_bytes(os.path.expanduser(file))).splitlines()
        except YamlProblem as exc:
            raise KeySourceError(f"key file {file}: {exc.message}", f"{kind}_file") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if (env or file) and not keys:
        raise KeySourceError(
            f"no keys found in {env or file}", f"{kind}_{'env' if env else 'file'}"
        )
    return keys


def _matches(presented: str, keys: Iterable[str]) -> bool:
    # Compare against every key, always, so timing does not reveal which one nearly matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: Callable[[], Keys]) -> None:
        self.app = app
        self.keys = keys  # the keys in force, read once per request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.keys()
        if scope["type"] != "http" or not keys.enabled:
            await self.app(scope, receive, send)
            return
        error = check(keys, scope["path"], scope["method"], dict(scope["headers"]))
        if error is not None:
            await send_error(send, error)
            return
        await self.app(scope, receive, send)


def check(keys: Keys, path: str, method: str, headers: dict[bytes, bytes]) -> GatewayError | None:
    """The error to answer a request with under `keys`, or None to let it through."""
    if method == "OPTIONS":  # CORS preflights carry no credentials
        return None
    if path in OPEN_PATHS and method in ("GET", "HEAD"):  # a POST there is the seed route
        return None
    presented = _bearer(headers)
    if presented is None:
        return Unauthorized(
            "missing API key: send `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if path == "/admin" or path.startswith("/admin/"):
        if _matches(presented, keys.admin or keys.api):
            return None
        if _matches(presented, keys.api):
            return Forbidden("this key may not use the admin API", code="admin_key_required")
        return Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})
    if _matches(presented, keys.api + keys.admin):
        return None
    return Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    value = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
