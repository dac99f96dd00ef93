"""HTTP checks that docker/test.sh runs against a gateway in a container (stdlib only).

python3 docker/client.py URL health|seed|requests
python3 docker/client.py URL drain "COMMAND THAT SENDS SIGTERM"
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


def post(url: str, body: dict[str, Any], timeout: float = 120) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=timeout)


def health(base: str) -> None:
    with urllib.request.urlopen(f"{base}/health", timeout=5) as reply:
        assert reply.status == 200, reply.status


def seed(base: str) -> None:
    with post(f"{base}/demo", {"prompt": "你好", "max_length": 16}) as reply:
        answer = json.load(reply)
    assert answer["status"] == 200 and answer["model"] == "demo" and answer["response"], answer
    print("seed:", answer["response"])


def stream_chat(
    base: str, model: str, max_tokens: int, at: dict[int, Callable[[], None]] | None = None
) -> dict[str, Any]:
    """A streamed chat; `at[n]` runs once the n-th chunk has arrived."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": max_tokens, "stream": True}  # fmt: skip
    text, finish, chunks = "", None, 0
    with post(f"{base}/v1/chat/completions", body) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            chunks += 1
            if at and chunks in at:
                at[chunks]()
            for choice in chunk.get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
    return {"text": text, "finish_reason": finish, "chunks": chunks}


def requests(base: str) -> None:
    health(base)
    seed(base)
    chat = stream_chat(base, "demo", 32)
    assert chat["text"] and chat["finish_reason"] in ("stop", "length"), chat
    print("stream:", chat)


def not_ready(base: str) -> None:
    try:
        urllib.request.urlopen(f"{base}/ready", timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 503, exc.code
        return
    raise AssertionError("the gateway still reports ready while it drains")


def drain(base: str, command: str) -> None:
    """SIGTERM while a long reply streams: the gateway stops being ready, the reply finishes."""

    def signal() -> None:
        subprocess.run(command, shell=True, check=True)

    chat = stream_chat(base, "long", 800, at={1: signal, 300: lambda: not_ready(base)})
    assert chat["finish_reason"] == "length" and chat["chunks"] > 300, chat
    print(
        f"drain: not ready after SIGTERM; the in-flight stream finished ({chat['chunks']} chunks)"
    )


if __name__ == "__main__":
    base, what, *rest = sys.argv[1:]
    checks: dict[str, Callable[..., None]] = {
        "health": health, "seed": seed, "requests": requests, "drain": drain,
    }  # fmt: skip
    checks[what](base, *rest)
