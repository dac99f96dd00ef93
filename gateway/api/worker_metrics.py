"""Bring what the workers measure into the gateway's /metrics, at scrape time.

Each ready local worker is asked for `GET /stats` (JSON, see `gateway/worker/stats.py`) over
its socket, all at once and each within a short timeout, so one busy or wedged worker can
neither stall the scrape nor hide the others. A worker that misses the timeout is shown
with its last answer and `llmgw_worker_stats_up 0`, rather than having its counters vanish
for a scrape. Remote upstreams have no such endpoint and are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from gateway.api.metric_sources import READY, ModelsView, ModelView
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

HISTOGRAMS = {
    "batch_size": (
        "llmgw_batch_size",
        "Rows in each batched pass (a decoding step, or a generate call)",
    ),
    "time_to_first_token_seconds": (
        "llmgw_time_to_first_token_seconds",
        "In the worker: from a request's arrival to its first generated text",
    ),
    "request_tokens_per_second": (
        "llmgw_request_tokens_per_second",
        "Decoding speed one request saw, after its first token",
    ),
    "batch_tokens_per_second": (
        "llmgw_batch_tokens_per_second",
        "Tokens a batched pass produced per second, all rows together",
    ),
}
COUNTERS = {
    "generated_tokens": ("llmgw_generated_tokens", "Tokens generated (rate() = tokens/s)"),
    "prompt_tokens": ("llmgw_prompt_tokens", "Prompt tokens prefilled"),
    "generation_seconds": ("llmgw_generation_seconds", "Time spent inside generate"),
    "batches": ("llmgw_batches", "Batched passes (decoding steps, or generate calls)"),
    "cancelled_requests": (
        "llmgw_cancelled_requests",
        "Requests whose client left before the reply was complete",
    ),
    "tokens_after_cancel": (
        "llmgw_tokens_after_cancel",
        "Tokens generated for rows after the worker learned their client had left",
    ),
}
GAUGES = {
    "queued_rows": ("llmgw_worker_queued_rows", "Rows waiting for the generation thread"),
    "running_rows": ("llmgw_worker_running_rows", "Rows in the batch being generated"),
}


class WorkerScraper:
    def __init__(self, supervisor: ModelsView, timeout_s: float) -> None:
        self.supervisor = supervisor
        self.timeout_s = timeout_s
        self._last: dict[str, tuple[int | None, dict[str, Any]]] = {}  # name -> (pid, stats)

    async def scrape(self) -> list[Metric]:
        runtimes = [r for r in self.supervisor.models.values() if _scrapable(r)]
        answers = await asyncio.gather(*(self._fetch(r) for r in runtimes))
        fresh: dict[str, bool] = {}
        stats: dict[str, dict[str, Any]] = {}
        for runtime, answer in zip(runtimes, answers, strict=True):
            pid = runtime.backend.pid if runtime.backend else None
            if answer is not None:
                self._last[runtime.name] = (pid, answer)
            last = self._last.get(runtime.name)
            fresh[runtime.name] = answer is not None
            if last is not None and last[0] == pid:  # never a dead worker's numbers
                stats[runtime.name] = last[1]
        return list(families(stats, fresh))

    async def _fetch(self, runtime: ModelView) -> dict[str, Any] | None:
        backend = runtime.backend
        if backend is None:
            return None
        try:
            return await asyncio.wait_for(
                backend.upstream.get("/stats", timeout=self.timeout_s), self.timeout_s
            )
        except (GatewayError, asyncio.TimeoutError) as exc:
            log.debug("no stats from the worker of %r: %s", runtime.name, exc)
            return None


def _scrapable(runtime: ModelView) -> bool:
    # A cluster model's /stats would come from whichever replica Serve picked: not shown.
    backend = runtime.backend
    return (
        runtime.state.value == READY
        and backend is not None
        and not backend.scales_itself
        and not runtime.entry.is_remote
    )


def families(stats: dict[str, dict[str, Any]], fresh: dict[str, bool]) -> Iterator[Metric]:
    """Prometheus families from each model's worker stats (JSON from `WorkerStats`)."""
    up = GaugeMetricFamily(
        "llmgw_worker_stats_up",
        "1 if the worker answered this scrape's stats request in time",
        labels=["model"],
    )
    for name, ok in fresh.items():
        up.add_metric([name], float(ok))
    yield up
    for key, (metric, text) in HISTOGRAMS.items():
        histogram = HistogramMetricFamily(metric, text, labels=["model"])
        for name, body in stats.items():
            if key in body.get("histograms", {}):
                buckets, total = _buckets(body["histograms"][key])
                histogram.add_metric([name], buckets, total)
        yield histogram
    for key, (metric, text) in COUNTERS.items():
        counter = CounterMetricFamily(metric, text, labels=["model"])
        for name, body in stats.items():
            counter.add_metric([name], float(body.get("counters", {}).get(key, 0)))
        yield counter
    finished = CounterMetricFamily(
        "llmgw_worker_requests_finished",
        "Requests the worker finished, by how they ended",
        labels=["model", "reason"],
    )
    for name, body in stats.items():
        for reason, count in sorted(body.get("finished", {}).items()):
            finished.add_metric([name, str(reason)], float(count))
    yield finished
    for key, (metric, text) in GAUGES.items():
        gauge = GaugeMetricFamily(metric, text, labels=["model"])
        for name, body in stats.items():
            gauge.add_metric([name], float(body.get("gauges", {}).get(key, 0)))
        yield gauge


def _buckets(body: dict[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """Per-bucket counts (the last is +Inf) into Prometheus's cumulative `le` buckets."""
    bounds = [float(b) for b in body["bounds"]]
    running = 0.0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip([*bounds, math.inf], body["counts"], strict=True):
        running += count
        buckets.append((floatToGoString(bound), running))
    return buckets, float(body["sum"])
