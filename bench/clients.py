"""How the benchmarks talk to each server: one request shape for all, tokens counted from
each server's own `usage`, greedy decoding everywhere so every server does the same work."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx

# Its first greedy token on the benchmark model is whole text (" can"), so a streaming server
# can send it at once rather than hold back half a character (checked by bench.ttft).
PROMPT = "Tell me a story."


@dataclass(frozen=True)
class Target:
    """A server under test, as a client sees it."""

    name: str
    url: str
    kind: Literal["openai", "seed"]
    model: str = ""  # the request's `model` (the gateway's name, or a path for HF serve)

    def request(self, max_tokens: int, stream: bool = False) -> tuple[str, dict[str, Any]]:
        if self.kind == "seed":
            return "/", {"prompt": PROMPT, "max_length": max_tokens}
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if stream:
            body["stream"] = True
        return "/v1/chat/completions", body


def client(connections: int = 64, timeout: float = 120.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


async def complete(http: httpx.AsyncClient, target: Target, max_tokens: int) -> int:
    """One non-streamed request; returns the completion tokens the server reports."""
    path, body = target.request(max_tokens)
    reply = await http.post(target.url + path, json=body)
    reply.raise_for_status()
    return int(reply.json()["usage"]["completion_tokens"])


async def first_content(http: httpx.AsyncClient, target: Target, max_tokens: int) -> float:
    """Seconds from sending a streamed request to its first chunk of generated text."""
    path, body = target.request(max_tokens, stream=True)
    started = time.perf_counter()
    first: float | None = None
    async with http.stream("POST", target.url + path, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if first is None and has_content(line):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"{target.name} streamed no text")
    return first


def has_content(line: str) -> bool:
    if not line.startswith("data:") or line.endswith("[DONE]"):
        return False
    chunk = json.loads(line[5:])
    return any(c.get("delta", {}).get("content") for c in chunk.get("choices", []))


async def stream_all(http: httpx.AsyncClient, target: Target, max_tokens: int) -> int:
    """One streamed request read to its end; returns the chunks of text it carried."""
    path, body = target.request(max_tokens, stream=True)
    chunks = 0
    async with http.stream("POST", target.url + path, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            chunks += has_content(line)
    return chunks
