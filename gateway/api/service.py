"""What every inference route does, in order: resolve the model, validate limits, take a
lease (admission, lazy load), forward to the model's upstream, relay or translate the reply.

Streams are opened before the response starts, so errors that happen before the first
token (unknown model, full queue, failed load, context too long) keep their HTTP status;
errors after it arrive as an SSE error event followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.api.metrics import label_model
from gateway.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SeedReply,
    SeedRequest,
    Usage,
    now_text,
    resolve_chat,
    resolve_completion,
    seed_to_chat,
)
from gateway.errors import (
    BadRequest,
    GatewayError,
    GatewayTimeout,
    UpstreamFailed,
    UpstreamUnreachable,
)
from gateway.http import unless_disconnected
from gateway.lifecycle.runtime import Lease
from gateway.lifecycle.supervisor import Supervisor

T = TypeVar("T")
CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"
SEED_PARAMS = {"messages": "prompt", "max_tokens": "max_length"}
# Fields the gateway resolves itself (protocol.resolve_*): relayed as it resolved them.
_GATEWAY_FIELDS = {
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "stream",
    "model",
}


class ManagedStream(StreamingResponse):
    """A streaming response that always runs its cleanup, even if never iterated."""

    def __init__(self, body: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


class Inference:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    # -- OpenAI routes ----------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        entry = self.supervisor.get(body.model).entry
        label_model(request, body.model)
        self._check_tokens(body.model, body.requested_tokens(), "max_tokens")
        self._check_messages(body.model, len(body.messages), "messages")
        resolved = resolve_chat(body, entry.generation, entry.system_prompt, entry.relays)
        return await self._openai(request, resolved, CHAT_PATH)

    async def completion(self, body: CompletionRequest, request: Request) -> Any:
        entry = self.supervisor.get(body.model).entry
        label_model(request, body.model)
        self._check_tokens(body.model, body.requested_tokens(), "max_tokens")
        return await self._openai(
            request, resolve_completion(body, entry.generation, entry.relays), COMPLETION_PATH
        )

    async def _openai(
        self, request: Request, body: ChatCompletionRequest | CompletionRequest, path: str
    ) -> Any:
        name = body.model
        payload = self._payload(name, body)
        if body.stream:
            events, close = await self._open_stream(request, name, body.keep_alive, path, payload)
            # The client hears the name it asked for, whatever an engine calls its model; the
            # gateway's own worker already names it so: its chunks are relayed untouched.
            rename = self.supervisor.get(name).entry.relays or payload["model"] != name
            return ManagedStream(_relay(events, name, rename), close)
        reply = await self._call(request, name, body.keep_alive, path, payload)
        reply["model"] = name
        return JSONResponse(reply)

    # -- seed routes ------------------------------------------------------------------------

    async def seed(self, name: str, body: SeedRequest, request: Request) -> Any:
        try:
            return await self._seed(name, body, request)
        except GatewayError as exc:  # the worker speaks chat; name what the client sent
            exc.param = SEED_PARAMS.get(exc.param or "", exc.param)
            raise

    async def _seed(self, name: str, body: SeedRequest, request: Request) -> Any:
        entry = self.supervisor.get(name).entry
        label_model(request, name)
        self._check_tokens(name, body.max_length, "max_length")
        self._check_messages(name, body.message_count(), "history")
        chat = resolve_chat(
            seed_to_chat(body, name), entry.generation, entry.system_prompt, entry.relays
        )
        # Every field of this request is the gateway's: those the seed body left unset
        # (`seed`, `stream_options`, ...) are left out, not sent as nulls.
        payload = {k: v for k, v in self._payload(name, chat).items() if v is not None}
        if body.stream:
            events, close = await self._open_stream(
                request, name, body.keep_alive, CHAT_PATH, payload
            )
            return ManagedStream(_seed_stream(events, name), close)
        reply = await self._call(request, name, body.keep_alive, CHAT_PATH, payload)
        return _seed_reply(reply, name)

    # -- shared -----------------------------------------------------------------------------

    def _check_tokens(self, name: str, requested: int | None, param: str) -> None:
        limit = self.supervisor.get(name).entry.limits.max_new_tokens
        if requested is not None and requested > limit:
            raise BadRequest(
                f"{param} is {requested}, above the limit of {limit} new tokens for model {name!r}",
                param=param,
                code="max_tokens_exceeded",
            )

    def _check_messages(self, name: str, count: int, param: str) -> None:
        # Before any conversion: building and sending a request costs time on the event
        # loop in proportion to its messages, and every model's requests share that loop.
        limit = self.supervisor.get(name).entry.limits.max_messages
        if count > limit:
            raise BadRequest(
                f"the request holds {count} messages, above the limit of {limit} "
                f"(limits.max_messages) for model {name!r}",
                param=param,
                code="too_many_messages",
            )

    def _payload(
        self, name: str, body: ChatCompletionRequest | CompletionRequest
    ) -> dict[str, Any]:
        entry = self.supervisor.get(name).entry
        if entry.relays:
            # As the client sent it (a `content: null` beside `tool_calls` stays), plus what
            # the gateway filled in; the gateway's own unset fields stay out.
            sent = body.model_dump(exclude_unset=True, exclude={"keep_alive"})
            filled = body.model_dump(exclude_none=True, include=_GATEWAY_FIELDS)
            payload = {**{k: v for k, v in sent.items() if k not in _GATEWAY_FIELDS}, **filled}
        else:
            payload = body.model_dump(exclude_none=True, exclude={"keep_alive"})
        upstream = entry.upstream
        payload["model"] = upstream.model if upstream and upstream.model else name
        return payload

    async def _call(
        self,
        request: Request,
        name: str,
        keep_alive: float | None,
        path: str,
        payload: dict[str, Any],
    ) -> dict[str, Any]:
        async def attempt() -> dict[str, Any]:
            async with self.supervisor.lease(name, keep_alive) as lease:
                return await self._timed(lease, lease.upstream.post(path, payload))

        return await unless_disconnected(request, _retry_unreachable(attempt))

    async def _timed(self, lease: Lease, work: Awaitable[T]) -> T:
        timeout = lease.entry.limits.request_timeout_s
        try:
            return await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError:
            raise GatewayTimeout(
                f"model {lease.name!r} did not finish within request_timeout_s={timeout:g}"
            ) from None

    async def _open_stream(
        self,
        request: Request,
        name: str,
        keep_alive: float | None,
        path: str,
        payload: dict[str, Any],
    ) -> tuple[AsyncIterator[str], Callable[[], Awaitable[None]]]:
        """Take a lease and open the upstream stream; return its events and their cleanup."""
        stack = AsyncExitStack()

        async def open_() -> AsyncIterator[str]:
            try:
                lease = await stack.enter_async_context(self.supervisor.lease(name, keep_alive))
                events = await stack.enter_async_context(lease.upstream.stream(path, payload))
            except UpstreamUnreachable:
                await stack.aclose()  # give the lease back before a retry takes another
                raise
            return _deadline(events, lease)

        try:
            events = await unless_disconnected(request, _retry_unreachable(open_))
        except BaseException:
            await stack.aclose()
            raise
        return events, stack.aclose


async def _retry_unreachable(attempt: Callable[[], Awaitable[T]]) -> T:
    """Retry once when the worker could not even be reached (it died between requests):
    nothing was sent, so the retry cannot run a request twice."""
    try:
        return await attempt()
    except UpstreamUnreachable:
        return await attempt()


async def _deadline(events: AsyncIterator[str], lease: Lease) -> AsyncIterator[str]:
    timeout = lease.entry.limits.request_timeout_s
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    iterator = events.__aiter__()
    try:
        while True:
            try:
                data = await asyncio.wait_for(iterator.__anext__(), max(0.0, end - loop.time()))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise GatewayTimeout(
                    f"model {lease.name!r} did not finish within request_timeout_s={timeout:g}"
                ) from None
            yield data
    finally:
        await _close(iterator)


async def _relay(events: AsyncIterator[str], name: str, rename: bool) -> AsyncIterator[bytes]:
    try:
        async for data in _until_done(events):
            yield b"data: " + (_rename(data, name) if rename else data).encode() + b"\n\n"
    except GatewayError as exc:
        yield _sse(exc.envelope())
    yield b"data: [DONE]\n\n"


async def _until_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events before `[DONE]`; nothing after it is read. An engine may keep its
    connection open past its answer (SSE comments, or nothing): reading on would turn a
    finished answer into a time-out and hold the lease. The events' iterator is closed
    here, the upstream response by the stream's cleanup (which also gives the lease back)."""
    try:
        async for data in events:
            if data == "[DONE]":
                return
            yield data
    finally:
        await _close(events)


async def _close(events: AsyncIterator[str]) -> None:
    if isinstance(events, AsyncGenerator):
        await events.aclose()


def _rename(data: str, name: str) -> str:
    # vLLM is started under the registry name and writes compact JSON: its chunks need no
    # parse and re-serialisation, which would cost the gateway CPU on every token.
    if f'"model":{json.dumps(name, ensure_ascii=False)}' in data:
        return data
    try:
        chunk = json.loads(data)
    except ValueError:
        return data
    if isinstance(chunk, dict) and "model" in chunk:
        chunk["model"] = name
        return json.dumps(chunk, ensure_ascii=False)
    return data


def _seed_reply(reply: dict[str, Any], name: str) -> SeedReply:
    """The seed reply to an engine's chat completion. A reply that is not one is the
    engine's failure (502, naming what was wrong), never the gateway's; a tool-call reply
    (`content: null` beside `tool_calls`) is one, with no text."""
    if "error" in reply:
        raise _answered(name, f"HTTP 200 with an error: {_error_message(reply)}")
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _answered(name, "a chat completion without choices")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _answered(name, "a choice without a message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise _answered(name, "a message whose content is not a string")
    return SeedReply(
        response=content or "",
        time=now_text(),
        model=name,
        finish_reason=_finish_reason(choice, name),
        usage=_usage(reply.get("usage"), name),
    )


async def _seed_stream(events: AsyncIterator[str], name: str) -> AsyncIterator[bytes]:
    """Seed-route stream: `{"delta"}` events, then the full seed reply, then [DONE]. An
    event that is not a chat completion chunk ends it with an error event, as a broken
    connection does."""
    text, finish, usage = "", None, None
    try:
        async for data in _until_done(events):
            chunk = _seed_chunk(data, name)
            if "error" in chunk:
                yield _sse({**chunk, "status": _status_of(chunk)})
                yield b"data: [DONE]\n\n"
                return
            usage = chunk.get("usage") or usage
            for delta, finished in _seed_deltas(chunk, name):
                finish = finished or finish
                if delta:
                    text += delta
                    yield _sse({"delta": delta, "model": name})
        reply = SeedReply(
            response=text,
            time=now_text(),
            model=name,
            finish_reason=finish,
            usage=_usage(usage, name),
        )
    except GatewayError as exc:
        yield _sse({**exc.envelope(), "status": exc.status})
        yield b"data: [DONE]\n\n"
        return
    yield _sse(reply.model_dump())
    yield b"data: [DONE]\n\n"


def _seed_chunk(data: str, name: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise _answered(name, f"a stream event that is not JSON: {data[:100]!r}") from None
    if not isinstance(chunk, dict):
        raise _answered(name, f"a stream event that is not a JSON object: {data[:100]!r}")
    return chunk


def _seed_deltas(chunk: dict[str, Any], name: str) -> list[tuple[str | None, str | None]]:
    """Each choice's text and finish reason in a chunk."""
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise _answered(name, "a stream event whose choices are not a list")
    found = []
    for choice in choices:
        delta = choice.get("delta") or {} if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            raise _answered(name, "a stream event whose choice or delta is not an object")
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise _answered(name, "a stream event whose content is not a string")
        found.append((content, _finish_reason(choice, name)))
    return found


def _finish_reason(choice: object, name: str) -> str | None:
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    if finish is not None and not isinstance(finish, str):
        raise _answered(name, "a finish_reason that is not a string")
    return finish


def _usage(usage: object, name: str) -> Usage | None:
    if not usage:
        return None
    try:
        return Usage.model_validate(usage)
    except ValidationError:
        raise _answered(name, f"usage that is not token counts: {str(usage)[:200]}") from None


def _answered(name: str, what: str) -> UpstreamFailed:
    return UpstreamFailed(f"model {name!r} answered with {what}")


def _error_message(body: dict[str, Any]) -> str:
    detail = body.get("error")
    message = detail.get("message") if isinstance(detail, dict) else detail
    return str(message)[:500]


def _status_of(chunk: dict[str, Any]) -> int:
    detail = chunk.get("error")
    code = detail.get("code") if isinstance(detail, dict) else None
    return 503 if code == "out_of_memory" else 500


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
