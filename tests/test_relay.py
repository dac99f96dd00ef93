"""The gateway's stream relay: what it forwards, and that it reads each upstream body to
its end (a body abandoned after `[DONE]` cannot give its connection back to the pool)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from gateway.api.service import _relay, _seed_stream


class Upstream:
    def __init__(self, *events: str) -> None:
        self.events = events
        self.read_to_end = False

    async def __aiter__(self) -> AsyncIterator[str]:
        for event in self.events:
            yield event
        self.read_to_end = True


def collect(stream: AsyncIterator[bytes]) -> list[str]:
    async def run() -> list[bytes]:
        return [chunk async for chunk in stream]

    return [c.decode().removeprefix("data: ").strip() for c in asyncio.run(run())]


def chunk(text: str, model: str = "m") -> str:
    return json.dumps({"model": model, "choices": [{"delta": {"content": text}}]})


def test_the_relay_reads_past_done_but_forwards_nothing_after_it() -> None:
    upstream = Upstream(chunk("a"), chunk("b"), "[DONE]", chunk("late"))
    out = collect(_relay(upstream.__aiter__(), "m", rename=False))
    assert out == [chunk("a"), chunk("b"), "[DONE]"]
    assert upstream.read_to_end


def test_the_relay_renames_only_when_the_upstream_calls_the_model_otherwise() -> None:
    upstream = Upstream(chunk("a", model="org/remote-name"), "[DONE]")
    (first, done) = collect(_relay(upstream.__aiter__(), "local", rename=True))
    assert json.loads(first)["model"] == "local" and done == "[DONE]"


def test_the_seed_stream_reads_past_done_too() -> None:
    upstream = Upstream(chunk("hi"), "[DONE]")
    out = collect(_seed_stream(upstream.__aiter__(), "m"))
    assert json.loads(out[0]) == {"delta": "hi", "model": "m"}
    assert json.loads(out[-2])["response"] == "hi" and out[-1] == "[DONE]"
    assert upstream.read_to_end
