"""One request inside a batched generation: its tokens, its text, when it ends.

A `Row` is fed one token per decoding step by the generation thread. It detokenizes
incrementally (never emitting half a UTF-8 character), holds back text that might be the
start of a stop string, and reports deltas and its end through `emit`, which the engine
makes thread-safe. Streaming and non-streaming replies are built from the same events, so
they carry the same text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # below this, sampling is greedy in all but name


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    text: str


@dataclass(frozen=True)
class Failed:
    error: GatewayError


Event = Delta | Finished | Failed


@dataclass
class Row:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    decode: Callable[[Sequence[int]], str]
    emit: Callable[[Event], None]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: Any = None  # a torch.Generator, made by the sampler on first use
    on_token: Callable[[int], None] | None = None  # told the count after each token (stats)
    _sent: int = 0
    _stop_hit: bool = False
    _prefix: int = 0
    _read: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        """Take the token this row produced in the latest decoding step."""
        if self.done or self.finish_if_cancelled():
            return
        try:
            self._take(token)
        except Exception as exc:  # this row's text failed: the batch it shares must not
            self._fail_unexpectedly(exc)

    def _take(self, token: int) -> None:
        if token in self.stop_ids:
            self.finish("stop")
            return
        self.output_ids.append(token)
        if self.on_token is not None:
            self.on_token(len(self.output_ids))
        if self._detokenize():
            self.finish("stop")
        elif len(self.output_ids) >= self.params.max_new_tokens:
            self.finish("length")
        else:
            self._flush(self._safe_end())

    def finish_if_cancelled(self) -> bool:
        """End the row if its client went away; True if it is cancelled."""
        if self.cancelled.is_set():
            self.finish("cancelled")
            return True
        return False

    def finish(self, reason: str) -> None:
        if self.done:
            return
        try:
            if not self._stop_hit and self._detokenize(final=True):
                reason = "stop"  # the held-back text completed a stop string
        except Exception as exc:
            self._fail_unexpectedly(exc)
            return
        self.finish_reason = reason
        self._flush(len(self.text))
        self.emit(Finished(reason, len(self.prompt_ids), len(self.output_ids), self.text))

    def fail(self, error: GatewayError) -> None:
        """End the row with an error; never raises, as the row shares its batch."""
        if not self.done:
            self.finish_reason = "error"
            try:
                self.emit(Failed(error))
            except Exception:
                log.exception("a row could not be told that it failed")

    def _fail_unexpectedly(self, exc: Exception) -> None:
        log.exception("a row failed while taking its token")
        self.fail(GatewayError(f"detokenizing failed: {type(exc).__name__}: {exc}"[:500]))

    def _detokenize(self, final: bool = False) -> bool:
        """Extend `text` with what the new tokens spell; True if a stop string was hit."""
        # Decode a short window rather than the whole reply: a token's text can depend on
        # its neighbours (leading spaces, multi-byte characters split across tokens).
        ids = self.output_ids
        if self._read == len(ids):
            return False
        before = self.decode(ids[self._prefix : self._read])
        after = self.decode(ids[self._prefix :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return False  # an incomplete character: wait for the next token
        added = after[len(before) :]
        self.text += added
        self._prefix, self._read = self._read, len(ids)
        return self._cut_at_stop_string(len(added))

    def _cut_at_stop_string(self, added: int) -> bool:
        longest = max((len(s) for s in self.params.stop), default=0)
        if not longest:
            return False
        start = max(0, len(self.text) - added - longest + 1)
        hits = [i for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self._stop_hit = True
        return bool(hits)

    def _safe_end(self) -> int:
        """How much text can be sent: hold back a tail that may begin a stop string."""
        held = 0
        for stop in self.params.stop:
            for size in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:size]):
                    held = size
                    break
        return len(self.text) - held

    def _flush(self, end: int) -> None:
        if end > self._sent:
            self.emit(Delta(self.text[self._sent : end]))
            self._sent = end
