"""The web playground: one static page and its assets, shipped in the package.

The files hold no data (every API call from the page carries the user's key), so they are
served without a key; `gateway.playground: false` turns them off, read per request so that
a hot reload takes effect. A strict Content-Security-Policy keeps anything but the page's
own script and style from running, whatever a model replies.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from gateway.errors import NotFound

FILES = Path(__file__).resolve().parents[2] / "playground"
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# What the page loads; auth leaves exactly these open.
PATHS = frozenset({"/playground", *(f"/playground/{n}" for n in ASSETS if n != "index.html")})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def playground_router(enabled: Callable[[], bool]) -> APIRouter:
    router = APIRouter(tags=["playground"], include_in_schema=False)
    bodies = {name: (FILES / name).read_bytes() for name in ASSETS}

    def serve(name: str) -> Response:
        if not enabled():
            raise NotFound("the playground is turned off (gateway.playground)")
        return Response(bodies[name], media_type=ASSETS[name], headers=HEADERS)

    @router.get("/playground")
    async def page() -> Response:
        return serve("index.html")

    @router.get("/playground/{name}")
    async def asset(name: str) -> Response:
        if name not in bodies or name == "index.html" or not enabled():
            raise NotFound(f"no playground file {name!r}")
        return serve(name)

    return router
