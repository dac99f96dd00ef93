"""HTTP plumbing shared by the gateway and its workers: error rendering and disconnects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import (
    BadRequest,
    ClientClosed,
    GatewayError,
    ModelUnavailable,
    UnsupportedMediaType,
    error_for_status,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.envelope(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI envelope; nothing leaks a stack trace."""

    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(request, exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, GatewayError):  # e.g. BodyLimit's 413 while reading
            return error_response(exc.__cause__)
        message = {404: f"no route {request.url.path}", 405: "method not allowed here"}.get(
            exc.status_code, str(exc.detail)
        )
        # The framework's own 400 is a body it could not decode (bad UTF-8, too deep).
        code = "invalid_json" if exc.status_code == 400 else None
        error = error_for_status(exc.status_code, message, code=code)
        error.status = exc.status_code
        error.headers = dict(exc.headers or {})
        return error_response(error)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(GatewayError("internal error; see the gateway log"))

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def validation_error(request: Request, exc: RequestValidationError) -> GatewayError:
    errors: list[Any] = list(exc.errors())
    first = _first_error(errors)
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not isinstance(p, int)]
    loc = [p for p in loc if not _is_union_tag(p)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx")
        reason = ctx.get("error", "invalid") if isinstance(ctx, dict) else "invalid"
        return BadRequest(f"malformed JSON body: {reason}", code="invalid_json")
    if kind == "missing" and not loc:
        return BadRequest("the request body is missing; send a JSON object")
    if not loc and not _is_json(request):
        return UnsupportedMediaType("send a JSON body with Content-Type: application/json")
    if kind == "extra_forbidden":
        return BadRequest(f"unknown field {param!r}", param=param, code="unknown_field")
    if kind == "missing":
        return BadRequest(f"{param} is required", param=param, code="missing_field")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return BadRequest(f"{param or 'body'}: {message}{more}", param=param, code="invalid_value")


def _first_error(errors: list[Any]) -> dict[str, Any]:
    """The error to report: the first field's, and of a union's members the one that got
    deepest (a list of text parts with one bad part, not "Input should be a valid string");
    a member that only lacks an item got nowhere."""
    if not errors:
        return {"loc": (), "msg": "invalid request", "type": ""}
    field = tuple(errors[0].get("loc", ()))[:2]
    same: list[dict[str, Any]] = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
    return max(same, key=lambda e: (e.get("type") != "missing", len(e.get("loc", ()))))


def _is_union_tag(part: str) -> bool:
    # pydantic names the union member it tried ("str", "list[TextPart]", "HistoryTurn");
    # wire fields are snake_case, so a capitalised part is a class name, not a field.
    return "[" in part or part in {"str", "int", "tuple"} or part[:1].isupper()


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.split(";")[0].strip().lower() == "application/json"


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone (call only after the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise `ClientClosed`.

    Only the watcher seeing `http.disconnect` means the client left. Work cancelled from
    inside the gateway (a stop, a shutdown) is answered as a 503 to retry, never as 499.
    Both tasks are cancelled and awaited before this returns, on every path.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _cancel_and_wait(task, watcher)
    left = watcher.done() and not watcher.cancelled() and watcher.exception() is None
    if not task.cancelled() and (task.exception() is None or not left):
        return task.result()
    if left:
        raise ClientClosed("the client closed the connection")
    raise ModelUnavailable(
        "the request was cancelled inside the gateway before it finished; retry",
        headers={"Retry-After": "1"},
    )


async def _cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel what is still running and wait until all of it has unwound."""
    for task in tasks:
        task.cancel()
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        # Cancelled again while unwinding: still let the tasks finish, then pass it on.
        await asyncio.wait(tasks)
        raise
