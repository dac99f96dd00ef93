"""Worker-side stats and how the gateway turns them into Prometheus families."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from enum import Enum
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.api.metrics import GatewayMetrics
from gateway.api.worker_metrics import WorkerScraper
from gateway.errors import UpstreamFailed
from gateway.lifecycle.admission import Admission
from gateway.registry.config import ModelEntry
from gateway.worker.engine import BatchRecord
from gateway.worker.rows import Event, Row, SamplingParams
from gateway.worker.stats import WorkerStats
from tests.support import ROOT


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_row(stats: WorkerStats, max_new_tokens: int = 50) -> tuple[Row, Any]:
    track = stats.track()
    row: Row

    def emit(event: Event) -> None:
        track.saw(event)

    params = SamplingParams(max_new_tokens)
    row = Row([1, 2, 3], params, frozenset({0}), _letters, emit, on_token=track.token)
    return row, track


def _letters(ids: Any) -> str:
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_histogram_buckets_are_inclusive_and_end_in_inf() -> None:
    stats = WorkerStats()
    for size in (1, 2, 3, 200):
        stats.on_batch(BatchRecord(size=size, prompt_tokens=10, new_tokens=5, seconds=0.1))
    batch = stats.snapshot()["histograms"]["batch_size"]
    assert batch["counts"][:3] == [1, 1, 1]  # le=1, le=2, le=4
    assert batch["counts"][-1] == 1  # above the last bound: +Inf
    assert batch["sum"] == 206
    counters = stats.snapshot()["counters"]
    assert counters["generated_tokens"] == 20 and counters["batches"] == 4


def test_first_token_and_rate_are_timed_from_the_request_start() -> None:
    clock = Clock()
    stats = WorkerStats(clock)
    row, _ = make_row(stats, max_new_tokens=5)
    clock.now += 0.2
    row.push(5)  # first token: 0.2 s after the request started
    for _ in range(4):
        clock.now += 0.1
        row.push(6)
    snap = stats.snapshot()
    ttft = snap["histograms"]["time_to_first_token_seconds"]
    assert sum(ttft["counts"]) == 1 and abs(ttft["sum"] - 0.2) < 1e-9
    rate = snap["histograms"]["request_tokens_per_second"]
    assert abs(rate["sum"] - 4 / 0.4) < 1e-6  # 4 tokens after the first, in 0.4 s
    assert snap["finished"] == {"length": 1}


def test_a_cancel_counts_tokens_made_after_the_worker_noticed() -> None:
    clock = Clock()
    stats = WorkerStats(clock)
    row, track = make_row(stats)
    for _ in range(3):
        clock.now += 0.01
        row.push(7)
    clock.now += 0.005
    track.cancel(row)
    row.output_ids.append(7)  # a token that slipped in while the flag was being set
    track.token(4)
    clock.now += 0.01
    row.push(7)  # the next step sees the flag and ends the row
    snap = stats.snapshot()
    assert snap["counters"]["cancelled_requests"] == 1
    assert snap["counters"]["tokens_after_cancel"] == 1
    (cancel,) = snap["recent_cancels"]
    assert cancel["tokens_at_notice"] == 3 and cancel["tokens"] == 4
    assert abs(cancel["noticed_at"] - 1000.035) < 1e-9
    assert [n for _, n in cancel["timeline"]] == [1, 2, 3, 4]  # one point per token
    assert abs(cancel["timeline"][2][0] - 1000.03) < 1e-9
    track.cancel(row)  # the handler's own `finally` again: no second count
    assert stats.snapshot()["counters"]["cancelled_requests"] == 1


def test_cancelling_a_finished_row_counts_nothing() -> None:
    stats = WorkerStats()
    row, track = make_row(stats, max_new_tokens=2)
    row.push(5)
    row.push(5)
    track.cancel(row)
    snap = stats.snapshot()
    assert snap["counters"]["cancelled_requests"] == 0
    assert snap["finished"] == {"length": 1}


class FakeUpstream:
    def __init__(self, answer: dict[str, Any] | None, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay

    async def get(self, path: str, timeout: float = 5.0) -> dict[str, Any]:
        assert path == "/stats"
        await asyncio.sleep(self.delay)
        if self.answer is None:
            raise UpstreamFailed("gone")
        return self.answer


class Lifecycle(Enum):
    READY = "ready"


def runtime(name: str, upstream: FakeUpstream, pid: int = 1) -> Any:
    """What the scraper reads of a supervisor's model record, and nothing more."""
    entry = ModelEntry(source="/nowhere")
    return SimpleNamespace(
        name=name,
        entry=entry,
        state=Lifecycle.READY,
        backend=SimpleNamespace(pid=pid, upstream=upstream, scales_itself=False),
        admission=Admission(name, entry.limits),
        in_flight=0,
        load_seconds=None,
    )


def render(families: list[Any]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    class Fixed:
        def collect(self) -> Any:
            return iter(families)

    registry = CollectorRegistry()
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_slow_worker_cannot_stall_the_scrape_and_keeps_its_last_numbers() -> None:
    stats = WorkerStats()
    stats.on_batch(BatchRecord(size=3, prompt_tokens=9, new_tokens=12, seconds=0.5))
    answer = stats.snapshot(queued_rows=2, running_rows=3)
    slow = runtime("slow", FakeUpstream(answer))
    fast = runtime("fast", FakeUpstream(answer))
    supervisor: Any = SimpleNamespace(models={"slow": slow, "fast": fast})
    scraper = WorkerScraper(supervisor, timeout_s=0.2)

    first = render(asyncio.run(scraper.scrape()))
    assert first[("llmgw_worker_stats_up", frozenset({("model", "slow")}))] == 1
    slow.backend.upstream.delay = 5.0
    started = time.perf_counter()
    second = render(asyncio.run(scraper.scrape()))
    assert time.perf_counter() - started < 1.0
    assert second[("llmgw_worker_stats_up", frozenset({("model", "slow")}))] == 0
    assert second[("llmgw_worker_stats_up", frozenset({("model", "fast")}))] == 1
    for name in ("slow", "fast"):  # the slow one shows its last answer, not nothing
        labels = frozenset({("model", name)})
        assert second[("llmgw_generated_tokens_total", labels)] == 12
        assert second[("llmgw_batch_size_sum", labels)] == 3
        assert second[("llmgw_batch_size_bucket", labels | {("le", "4.0")})] == 1
        assert second[("llmgw_batch_size_bucket", labels | {("le", "2.0")})] == 0
        assert second[("llmgw_worker_queued_rows", labels)] == 2


def test_a_new_worker_never_shows_its_predecessors_numbers() -> None:
    answer = WorkerStats().snapshot()
    answer["counters"]["generated_tokens"] = 99
    model = runtime("m", FakeUpstream(answer), pid=10)
    supervisor: Any = SimpleNamespace(models={"m": model})
    scraper = WorkerScraper(supervisor, timeout_s=0.2)
    assert (
        render(asyncio.run(scraper.scrape()))[
            ("llmgw_generated_tokens_total", frozenset({("model", "m")}))
        ]
        == 99
    )
    model.backend = SimpleNamespace(pid=11, upstream=FakeUpstream(None), scales_itself=False)
    samples = render(asyncio.run(scraper.scrape()))
    assert ("llmgw_generated_tokens_total", frozenset({("model", "m")})) not in samples
    assert samples[("llmgw_worker_stats_up", frozenset({("model", "m")}))] == 0


def test_each_app_has_its_own_registry() -> None:
    supervisor: Any = SimpleNamespace(models={})
    one = GatewayMetrics(supervisor)
    two = GatewayMetrics(supervisor)  # a shared registry would raise "Duplicated timeseries"
    one.observe("m", "/{model}", "200", 0.1)
    text = asyncio.run(two.render()).decode()
    assert 'llmgw_requests_total{model="m"' not in text
    assert 'llmgw_requests_total{model="m"' in asyncio.run(one.render()).decode()


def test_the_metrics_modules_do_not_import_torch() -> None:
    code = (
        "import sys, gateway.app, gateway.api.metrics, gateway.api.worker_metrics;"
        "import gateway.api.routes.metrics;"
        "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
