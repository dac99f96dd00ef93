"""The gateway's stream relay and its client to an engine, at the seam: what it forwards,
that it stops reading at `[DONE]`, and that an engine's reply that is malformed, of the
wrong kind or too big fails the request (502) rather than the gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.api.service import _relay, _seed_reply, _seed_stream
from gateway.backends import upstream as upstream_module
from gateway.errors import GatewayError, UpstreamFailed, from_envelope


class Upstream:
    def __init__(self, *events: str) -> None:
        self.events = events
        self.read: list[str] = []
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            for event in self.events:
                self.read.append(event)
                yield event
        finally:
            self.closed = True


def collect(stream: AsyncIterator[bytes]) -> list[str]:
    async def run() -> list[bytes]:
        return [chunk async for chunk in stream]

    return [c.decode().removeprefix("data: ").strip() for c in asyncio.run(run())]


def chunk(text: str, model: str = "m") -> str:
    return json.dumps({"model": model, "choices": [{"delta": {"content": text}}]})


def test_the_relay_stops_reading_at_done_and_closes_the_upstream() -> None:
    upstream = Upstream(chunk("a"), chunk("b"), "[DONE]", ": comment", chunk("late"))
    out = collect(_relay(upstream.__aiter__(), "m", rename=False))
    assert out == [chunk("a"), chunk("b"), "[DONE]"]
    assert upstream.read == [chunk("a"), chunk("b"), "[DONE]"] and upstream.closed


def test_the_relay_renames_only_when_the_upstream_calls_the_model_otherwise() -> None:
    upstream = Upstream(chunk("a", model="org/remote-name"), "[DONE]")
    (first, done) = collect(_relay(upstream.__aiter__(), "local", rename=True))
    assert json.loads(first)["model"] == "local" and done == "[DONE]"


def test_the_seed_stream_stops_at_done_too() -> None:
    upstream = Upstream(chunk("hi"), "[DONE]", chunk("late"))
    out = collect(_seed_stream(upstream.__aiter__(), "m"))
    assert json.loads(out[0]) == {"delta": "hi", "model": "m"}
    assert json.loads(out[-2])["response"] == "hi" and out[-1] == "[DONE]"
    assert upstream.read == [chunk("hi"), "[DONE]"] and upstream.closed


@pytest.mark.parametrize(
    "event",
    [
        "this is not json",
        "[1,2]",
        '"text"',
        '{"choices": {"delta": "x"}}',
        '{"choices": [1]}',
        '{"choices": [{"delta": "x"}]}',
        '{"choices": [{"delta": {"content": 5}}]}',
        '{"choices": [{"delta": {}, "finish_reason": 1}]}',
        '{"choices": [], "usage": {"prompt_tokens": "many"}}',
    ],
)
def test_a_seed_stream_event_that_is_not_a_chunk_ends_it_with_an_error_event(event: str) -> None:
    upstream = Upstream(chunk("hi"), event, chunk("more"), "[DONE]")
    out = collect(_seed_stream(upstream.__aiter__(), "m"))
    assert json.loads(out[0]) == {"delta": "hi", "model": "m"}
    error = json.loads(out[-2])
    assert error["status"] == 502 and error["error"]["code"] == "worker_failed"
    assert "model 'm' answered with" in error["error"]["message"]
    assert out[-1] == "[DONE]" and upstream.closed


def test_an_error_event_that_is_not_an_object_still_ends_the_seed_stream() -> None:
    out = collect(_seed_stream(Upstream('{"error": "boom"}').__aiter__(), "m"))
    assert json.loads(out[0]) == {"error": "boom", "status": 500} and out[-1] == "[DONE]"


def reply(message: Any = None, **extra: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": "hey"} if message is None else message
    return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], **extra}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"id": "x"}, "without choices"),
        ({"id": "x", "choices": []}, "without choices"),
        ({"choices": "many"}, "without choices"),
        ({"choices": [None]}, "without a message"),
        ({"choices": [{"text": "a completion"}]}, "without a message"),
        (reply({"content": ["parts"]}), "content is not a string"),
        (reply(usage={"prompt_tokens": "many"}), "usage that is not token counts"),
        (reply(usage=[1]), "usage that is not token counts"),
        ({"choices": [{"message": {"content": "a"}, "finish_reason": 3}]}, "finish_reason"),
        ({"error": {"message": "engine exploded"}}, "HTTP 200 with an error: engine exploded"),
        ({"error": "engine exploded"}, "HTTP 200 with an error: engine exploded"),
    ],
)
def test_a_reply_that_is_not_a_chat_completion_fails_the_seed_route(
    body: dict[str, Any], named: str
) -> None:
    with pytest.raises(UpstreamFailed) as caught:
        _seed_reply(body, "m")
    assert caught.value.status == 502 and caught.value.code == "worker_failed"
    assert named in caught.value.message


def test_a_tool_call_reply_is_a_seed_reply_with_no_text() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = reply({"role": "assistant", "content": None, "tool_calls": [call]})
    body["choices"][0]["finish_reason"] = "tool_calls"
    body["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    seed = _seed_reply(body, "m")
    assert seed.response == "" and seed.finish_reason == "tool_calls"
    assert seed.usage is not None and seed.usage.total_tokens == 5


# -- an engine's error statuses --------------------------------------------------------------


@pytest.mark.parametrize("status", [201, 204, 301, 302, 304, 401, 403, 407, 600])
def test_an_engine_status_the_client_must_not_see_becomes_a_502_naming_it(status: int) -> None:
    err = from_envelope(status, {"error": {"message": "no", "code": "invalid_api_key"}}, "E")
    assert err.status == 502 and err.code == "worker_failed"
    assert err.message == f"E answered HTTP {status}: no"


@pytest.mark.parametrize("status", [400, 404, 413, 422, 429, 500, 503])
def test_other_engine_errors_keep_their_status(status: int) -> None:
    err = from_envelope(status, {"error": {"message": "no", "param": "tools", "code": "c"}})
    assert (err.status, err.message, err.param, err.code) == (status, "no", "tools", "c")


# -- the client to an engine -----------------------------------------------------------------


class Body:
    """A reply body written in pieces, then `then` 1000 times over (as good as endless, and
    a test of a client that reads it all still ends); counts what was read."""

    def __init__(self, *pieces: bytes, then: bytes = b"") -> None:
        self.pieces = [*pieces, *[then] * 1000] if then else pieces
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            self.read += len(piece)
            yield piece


def engine(
    body: Body,
    kind: str = "text/event-stream",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> upstream_module.Upstream:
    def answer(request: httpx.Request) -> httpx.Response:
        sent = {"content-type": kind, **(headers or {})}
        return httpx.Response(status, headers=sent, content=body)

    transport = httpx.MockTransport(answer)
    return upstream_module.Upstream("http://engine", label="E", transport=transport)


def events_of(upstream: upstream_module.Upstream) -> list[str]:
    async def run() -> list[str]:
        try:
            async with upstream.stream("/v1/chat/completions", {}) as events:
                return [event async for event in events]
        finally:
            await upstream.aclose()

    return asyncio.run(run())


def post(upstream: upstream_module.Upstream) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        try:
            return await upstream.post("/v1/chat/completions", {})
        finally:
            await upstream.aclose()

    return asyncio.run(run())


def failure(work: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        work()
    return caught.value


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("text/html", b"<html>hello</html>"),
        ("application/json", b'{"choices": [{"message": {"content": "hi"}}]}'),
        ("", b"data: [DONE]\n\n"),
    ],
)
def test_a_stream_answered_with_a_body_that_is_not_sse_fails_before_any_event(
    kind: str, body: bytes
) -> None:
    source = Body(body)
    err = failure(lambda: events_of(engine(source, kind)))
    assert err.status == 502 and "not an event stream" in err.message
    assert source.read == 0  # refused on its headers


def test_sse_lines_end_as_sse_allows_even_split_across_pieces() -> None:
    source = Body(b"data: a\r", b"\ndata:b\r\n: comment\rdata: c", b"\n", b"data: [DO", b"NE]\n")
    assert events_of(engine(source, "text/event-stream; charset=utf-8")) == [
        "a",
        "b",
        "c",
        "[DONE]",
    ]


def test_nothing_after_done_is_read() -> None:
    source = Body(b"data: a\n\ndata: [DONE]\n\n", then=b": still here\n\n")
    assert events_of(engine(source)) == ["a", "[DONE]"]
    assert source.read == len(b"data: a\n\ndata: [DONE]\n\n")


def test_a_stream_line_past_the_cap_fails_without_being_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_module, "MAX_SSE_LINE_BYTES", 10_000)
    source = Body(b"data: ok\n\ndata: {", then=b"x" * 1000)  # a line that never ends
    err = failure(lambda: events_of(engine(source)))
    assert err.status == 502 and "stream line longer than 10000 bytes" in err.message
    assert source.read < 12_000


@pytest.mark.parametrize("length", [None, "20000"])
def test_a_reply_past_the_cap_fails_without_being_held(
    monkeypatch: pytest.MonkeyPatch, length: str | None
) -> None:
    monkeypatch.setattr(upstream_module, "MAX_REPLY_BYTES", 10_000)
    source = Body(b'{"pad": "', then=b"x" * 1000)  # valid JSON, if it ever ended
    headers = {"content-length": length} if length else {}
    err = failure(lambda: post(engine(source, "application/json", headers=headers)))
    assert err.status == 502 and "larger than 10000 bytes" in err.message
    assert source.read < (1 if length else 12_000)


def test_an_error_body_past_the_cap_fails_as_the_engine_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_module, "MAX_REPLY_BYTES", 10_000)
    source = Body(b'{"error": {"message": "', then=b"x" * 1000)
    err = failure(lambda: events_of(engine(source, "application/json", status=400)))
    assert err.status == 502 and "HTTP 400 with a body larger than 10000" in err.message
    assert source.read < 12_000


def test_a_reply_within_the_cap_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "MAX_REPLY_BYTES", 10_000)
    pieces = [b'{"pad": "', *[b"x" * 1000] * 9, b'"}']
    assert post(engine(Body(*pieces), "application/json")) == {"pad": "x" * 9000}


def test_a_chunk_already_under_the_registry_name_is_relayed_as_it_came() -> None:
    from gateway.api.service import _rename

    same = '{"id":"c","model":"m","choices":[{"delta":{"content":"a"}}]}'
    assert _rename(same, "m") is same  # no parse, no re-serialisation
    other = '{"id":"c","model":"org/x","choices":[]}'
    assert json.loads(_rename(other, "m"))["model"] == "m"
