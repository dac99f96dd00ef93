"""What a worker measures about its own work: batch sizes, time to first token, tokens
generated, and how promptly cancelled rows stop.

Everything is cumulative since the worker started. The gateway reads `snapshot()` as JSON
(`GET /stats` on the worker's socket) when its `/metrics` is scraped, and labels it with the
model's name, so this module needs neither prometheus nor torch. The generation thread
records and the event loop reads, so one lock guards the numbers.

Cancellation: `tokens_after_cancel` is how many tokens a row gained after the worker learned
that its client had gone, and `recent_cancels` keeps when each of a cancelled row's last
tokens was made, so a benchmark can also count the tokens made between the client's own
disconnect and the worker noticing it.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from gateway.worker.engine import BatchRecord
from gateway.worker.rows import Delta, Event, Finished, Row

BATCH_SIZE_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BOUNDS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
RECENT_CANCELS = 64
TIMELINE = 16  # token times remembered per live row, for the cancellation timeline


class Histogram:
    """Counts per bucket (the last one is +Inf) and a sum; not thread-safe on its own."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


class WorkerStats:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._histograms = {
            "batch_size": Histogram(BATCH_SIZE_BOUNDS),
            "time_to_first_token_seconds": Histogram(TTFT_BOUNDS),
            "request_tokens_per_second": Histogram(RATE_BOUNDS),
            "batch_tokens_per_second": Histogram(RATE_BOUNDS),
        }
        self._counters: dict[str, float] = {
            "generated_tokens": 0,
            "prompt_tokens": 0,
            "generation_seconds": 0.0,
            "batches": 0,
            "cancelled_requests": 0,
            "tokens_after_cancel": 0,
        }
        self._finished: dict[str, int] = {}
        self._recent_cancels: deque[dict[str, Any]] = deque(maxlen=RECENT_CANCELS)

    def on_batch(self, record: BatchRecord) -> None:
        """The engine's `on_batch` callback (generation thread)."""
        with self._lock:
            self._histograms["batch_size"].observe(record.size)
            if record.seconds > 0 and record.new_tokens:
                self._histograms["batch_tokens_per_second"].observe(
                    record.new_tokens / record.seconds
                )
            self._counters["generated_tokens"] += record.new_tokens
            self._counters["prompt_tokens"] += record.prompt_tokens
            self._counters["generation_seconds"] += record.seconds
            self._counters["batches"] += 1

    def track(self) -> RequestTrack:
        """Start following one request; call right before its row is submitted."""
        return RequestTrack(self)

    def snapshot(self, **gauges: float) -> dict[str, Any]:
        with self._lock:
            return {
                "histograms": {k: h.snapshot() for k, h in self._histograms.items()},
                "counters": dict(self._counters),
                "finished": dict(self._finished),
                "gauges": gauges,
                "recent_cancels": list(self._recent_cancels),
                "time": self.clock(),
            }

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms[name].observe(value)

    def count_finish(self, reason: str, cancel: dict[str, Any] | None) -> None:
        with self._lock:
            self._finished[reason] = self._finished.get(reason, 0) + 1
            if cancel is not None:
                self._counters["cancelled_requests"] += 1
                self._counters["tokens_after_cancel"] += cancel["tokens_after_cancel"]
                self._recent_cancels.append(cancel)


class RequestTrack:
    """One request's timings. `saw` runs in the generation thread, `cancel` on the loop."""

    def __init__(self, stats: WorkerStats) -> None:
        self.stats = stats
        self.started = stats.clock()
        self.first_token: float | None = None
        self.notice: tuple[float, int] | None = None  # (when, tokens then) of the cancel
        self.timeline: deque[tuple[float, int]] = deque(maxlen=TIMELINE)

    def token(self, count: int) -> None:
        """The row's `count`-th token was just made (its `on_token` hook)."""
        self.timeline.append((self.stats.clock(), count))

    def saw(self, event: Event) -> None:
        """An event of the row (its `emit` hook, generation thread)."""
        now = self.stats.clock()
        first = isinstance(event, Delta) or (
            isinstance(event, Finished) and event.reason in ("stop", "length")
        )
        if first and self.first_token is None:
            self.first_token = now
            self.stats.observe("time_to_first_token_seconds", now - self.started)
        if isinstance(event, Finished):
            self._finished(event, now)
        elif not isinstance(event, Delta):  # Failed
            self.stats.count_finish("error", None)

    def cancel(self, row: Row) -> None:
        """Stop the row because its client went away; a no-op once the row has finished."""
        if not row.done and self.notice is None:
            # Count before setting the flag: a token that slips in between counts against us.
            self.notice = (self.stats.clock(), len(row.output_ids))
        row.cancelled.set()

    def _finished(self, event: Finished, now: float) -> None:
        if event.reason != "cancelled":
            if self.first_token is not None and event.completion_tokens > 1:
                elapsed = now - self.first_token
                if elapsed > 0:
                    rate = (event.completion_tokens - 1) / elapsed
                    self.stats.observe("request_tokens_per_second", rate)
            self.stats.count_finish(event.reason, None)
            return
        noticed_at, tokens_then = self.notice or (now, event.completion_tokens)
        self.stats.count_finish(
            "cancelled",
            {
                "noticed_at": noticed_at,
                "finished_at": now,
                "tokens_at_notice": tokens_then,
                "tokens": event.completion_tokens,
                "tokens_after_cancel": max(0, event.completion_tokens - tokens_then),
                "timeline": [list(point) for point in self.timeline],
            },
        )
