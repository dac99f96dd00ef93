"""OpenAI-shaped reply bodies and stream chunks, built from a row's events."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from gateway.errors import GatewayError
from gateway.worker.rows import Finished

Kind = Literal["chat", "completion"]


def usage(done: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def finish_reason(done: Finished) -> str:
    return "length" if done.reason == "length" else "stop"


def full_reply(kind: Kind, reply_id: str, model: str, done: Finished) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": done.text},
            "finish_reason": finish_reason(done),
            "logprobs": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": done.text,
            "finish_reason": finish_reason(done),
            "logprobs": None,
        }
        obj = "text_completion"
    return {
        "id": reply_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(done),
    }


class ChunkWriter:
    """Server-sent-event lines for one streamed reply."""

    def __init__(self, kind: Kind, reply_id: str, model: str, include_usage: bool) -> None:
        self.kind = kind
        self.reply_id = reply_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def first(self) -> bytes:
        if self.kind == "chat":
            return self._chunk({"role": "assistant", "content": ""}, None)
        return b""

    def delta(self, text: str) -> bytes:
        return self._chunk({"content": text} if self.kind == "chat" else text, None)

    def last(self, done: Finished) -> bytes:
        out = self._chunk({} if self.kind == "chat" else "", finish_reason(done))
        if self.include_usage:
            out += self._event({**self._head(), "choices": [], "usage": usage(done)})
        return out + b"data: [DONE]\n\n"

    def error(self, error: GatewayError) -> bytes:
        return self._event(error.envelope()) + b"data: [DONE]\n\n"

    def _head(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.reply_id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, delta: Any, finish: str | None) -> bytes:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        body: dict[str, Any] = {**self._head(), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return self._event(body)

    @staticmethod
    def _event(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
