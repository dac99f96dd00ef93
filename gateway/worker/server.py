"""The worker's HTTP face: an OpenAI-compatible API over one loaded model.

The gateway reaches it over a unix socket. Prompts are built by the adapter, checked
against the context, queued on the engine; replies come back as one body or as
server-sent events. A client that goes away cancels its row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from adapters.base import Adapter, Message, Prompt, SamplingDefaults
from adapters.chat_template import TemplateFailed
from gateway.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    completion_id,
)
from gateway.errors import BadRequest, ChatTemplateFailed, ContextLengthExceeded, GatewayError
from gateway.http import install_error_handlers, unless_disconnected
from gateway.worker.engine import Engine
from gateway.worker.mailbox import Mailboxes
from gateway.worker.responses import ChunkWriter, Kind, full_reply
from gateway.worker.rows import Delta, Event, Failed, Finished, Row, SamplingParams
from gateway.worker.stats import RequestTrack, WorkerStats


@dataclass
class WorkerState:
    name: str
    adapter: Adapter
    engine: Engine
    defaults: SamplingDefaults
    stop_ids: frozenset[int]
    context_length: int
    info: Callable[[], dict[str, Any]]
    default_max_tokens: int = 256  # the entry's generation.max_new_tokens
    stall_timeout_s: float = 600.0  # a batch without a decoding step this long: unhealthy
    stats: WorkerStats = field(default_factory=WorkerStats)
    mailboxes: Mailboxes = field(default_factory=Mailboxes)
    token_chars: int | None = None  # the longest token's length; read from the vocabulary once
    # The registry's `chat_template:` over the adapter's own format, when it gives one.
    chat_prompt: Callable[[Sequence[Message]], Prompt] | None = None


def create_worker_app(state: WorkerState) -> FastAPI:
    app = FastAPI(
        title=f"llm-gateway worker: {state.name}",
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = state.engine
        stalled = engine.stalled_for()
        if not engine.alive:
            status = "engine stopped"
        elif stalled > state.stall_timeout_s:
            status = f"generation stalled for {stalled:.0f}s"
        else:
            status = "ok"
        body = {"status": status, "queued": engine.queued, "busy_rows": engine.busy_rows}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return state.info()

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """Cumulative counters for the gateway's /metrics (see `stats.py`)."""
        engine = state.engine
        return state.stats.snapshot(queued_rows=engine.queued, running_rows=engine.busy_rows)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        await _could_fit(state, sum(len(m["content"]) for m in messages), "messages")
        prompt = await _build(state.chat_prompt or state.adapter.chat_prompt, messages)
        return await _serve(state, request, "chat", body, prompt, "messages")

    @app.post("/v1/completions", response_model=None)
    async def completion(body: CompletionRequest, request: Request) -> Any:
        await _could_fit(state, len(body.prompt), "prompt")
        prompt = await _build(state.adapter.completion_prompt, body.prompt)
        return await _serve(state, request, "completion", body, prompt, "prompt")

    return app


async def _could_fit(state: WorkerState, chars: int, prompt_param: str) -> None:
    """Refuse, without tokenizing it, text that has more characters than the whole context
    could hold even if every token were the vocabulary's longest: tokenizing megabytes only
    to refuse them costs the worker seconds."""
    if state.token_chars is None:
        state.token_chars = await asyncio.to_thread(_longest_token, state.adapter)
    most = state.context_length * state.token_chars
    if chars > most:
        raise ContextLengthExceeded(
            f"this model's context is {state.context_length} tokens, but the input "
            f"({prompt_param}) is {chars} characters, more than {most} "
            f"({state.token_chars} characters per token at the most) could fill it",
            param=prompt_param,
        )


def _longest_token(adapter: Adapter) -> int:
    # A token's vocabulary form (byte-level or sentencepiece) is at least as long as the
    # text it stands for; the floor of 16 keeps an odd vocabulary from refusing real text.
    vocab = adapter.tokenizer.get_vocab()
    return max(16, max((len(token) for token in vocab), default=0))


async def _build(render: Callable[[Any], Prompt], value: Any) -> Prompt:
    try:
        return await asyncio.to_thread(render, value)
    except ValueError as exc:  # the request's fault: the adapter or template refuses it
        raise BadRequest(str(exc)) from exc
    except TemplateFailed as exc:  # the template's own fault (bounded: the worker goes on)
        logging.getLogger(__name__).warning("%s", exc)
        raise ChatTemplateFailed(str(exc)) from exc


async def _serve(
    state: WorkerState,
    request: Request,
    kind: Kind,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: Prompt,
    prompt_param: str,
) -> Any:
    params = _sampling(state, body, len(prompt.ids), prompt_param)
    mailbox = state.mailboxes.for_loop(asyncio.get_running_loop())
    events: asyncio.Queue[Event] = asyncio.Queue()
    track = state.stats.track()

    def emit(event: Event) -> None:  # called from the generation thread
        track.saw(event)
        if body.stream or not isinstance(event, Delta):  # a whole reply needs no deltas
            mailbox.post(partial(events.put_nowait, event))

    row = Row(
        prompt_ids=prompt.ids,
        params=params,
        stop_ids=state.stop_ids,
        decode=state.adapter.decode,
        emit=emit,
        on_token=track.token,
    )
    state.engine.submit(row)
    reply_id = completion_id("chatcmpl" if kind == "chat" else "cmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = ChunkWriter(kind, reply_id, body.model, include_usage)
        return StreamingResponse(
            _stream(row, events, writer, track), media_type="text/event-stream"
        )
    try:
        done = await unless_disconnected(request, _collect(events))
    finally:
        track.cancel(row)  # a no-op when the row already finished
    return full_reply(kind, reply_id, body.model, done)


def _sampling(
    state: WorkerState, body: SamplingFields, prompt_tokens: int, prompt_param: str
) -> SamplingParams:
    requested = body.max_completion_tokens if isinstance(body, ChatCompletionRequest) else None
    requested = requested or getattr(body, "max_tokens", None)
    room = state.context_length - prompt_tokens
    if room <= 0 or (requested is not None and requested > room):
        raise ContextLengthExceeded(
            f"this model's context is {state.context_length} tokens, but the input "
            f"({prompt_param}) is {prompt_tokens} tokens and max_tokens asks for "
            f"{requested or 1} more ({prompt_tokens + (requested or 1)} in all)",
            param="max_tokens" if requested and room > 0 else prompt_param,
        )
    d = state.defaults
    return SamplingParams(
        max_new_tokens=requested or min(state.default_max_tokens, room),
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        top_k=d.top_k if body.top_k is None else body.top_k,
        repetition_penalty=d.repetition_penalty
        if body.repetition_penalty is None
        else body.repetition_penalty,
        seed=body.seed,
        stop=tuple(body.stop_list()),
    )


async def _collect(events: asyncio.Queue[Event]) -> Finished:
    while True:
        event = await events.get()
        if isinstance(event, Finished):
            return event
        if isinstance(event, Failed):
            raise event.error


async def _stream(
    row: Row, events: asyncio.Queue[Event], writer: ChunkWriter, track: RequestTrack
) -> AsyncIterator[bytes]:
    try:
        if first := writer.first():
            yield first
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield writer.delta(event.text)
            elif isinstance(event, Finished):
                yield writer.last(event)
                return
            else:
                yield writer.error(event.error)
                return
    except GatewayError as exc:
        yield writer.error(exc)
    finally:
        track.cancel(row)  # a no-op when the row already finished
