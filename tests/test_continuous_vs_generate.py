"""Continuous batching gives exactly what `generate` gives, for greedy prompts of different
lengths: left padding, position ids and the cache splice when a shorter or longer row
joins a running batch (or leaves it) must never change a row's tokens."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.base import LoadSpec
from adapters.chat_template import ChatTemplateAdapter
from gateway.worker.engine import BatchRecord, Engine
from gateway.worker.rows import Delta, Event, Finished, Row, SamplingParams

# (prompt, new tokens): lengths from a few tokens to several times the shortest
JOBS = [
    ("a much longer prompt with many more words in it " * 3, 30),
    ("hi", 12),
    ("The quick brown fox jumps over the lazy dog. 0123456789", 24),
    ("thank you", 6),
    ("a much longer prompt with many more words in it " * 6, 18),
    ("who are you?", 20),
    ("what can you do?", 9),
]


@pytest.fixture(scope="module")
def adapter(tiny_model: Path) -> ChatTemplateAdapter:
    loaded = ChatTemplateAdapter(LoadSpec(path=tiny_model, dtype="float32"))
    loaded.load()
    return loaded


class Rows:
    def __init__(self, adapter: ChatTemplateAdapter, continuous: bool) -> None:
        self.adapter = adapter
        self.batches: list[BatchRecord] = []
        self.engine = Engine(adapter, 8, 0.05, on_batch=self.batches.append, continuous=continuous)
        assert self.engine.continuous == continuous
        self.engine.start()

    def row(self, prompt: str, tokens: int) -> tuple[Row, list[Event], threading.Event]:
        events: list[Event] = []
        ended = threading.Event()

        def emit(event: Event) -> None:
            events.append(event)
            if not isinstance(event, Delta):
                ended.set()

        ids = self.adapter.chat_prompt([{"role": "user", "content": prompt}]).ids
        stops = frozenset(self.adapter.stop_token_ids())
        row = Row(ids, SamplingParams(max_new_tokens=tokens), stops, self.adapter.decode, emit)
        return row, events, ended

    def texts(self, rows: list[tuple[Row, list[Event], threading.Event]]) -> list[str]:
        assert all(ended.wait(60) for _, _, ended in rows)
        while self.engine.busy_rows or self.engine.queued:  # the batch record comes last
            time.sleep(0.001)
        ends = [events[-1] for _, events, _ in rows]
        assert all(isinstance(end, Finished) for end in ends), ends
        return [end.text for end in ends]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def generated(adapter: ChatTemplateAdapter) -> Iterator[list[str]]:
    """Each job alone through `generate`: no padding, no splice."""
    rows = Rows(adapter, continuous=False)
    texts = []
    for prompt, tokens in JOBS:
        job = rows.row(prompt, tokens)
        rows.engine.submit(job[0])
        texts.append(rows.texts([job])[0])
    rows.engine.stop()
    yield texts


@pytest.fixture
def continuous(adapter: ChatTemplateAdapter) -> Iterator[Rows]:
    rows = Rows(adapter, continuous=True)
    yield rows
    rows.engine.stop()


def test_the_prompts_really_differ_in_length(continuous: Rows) -> None:
    lengths = [len(continuous.row(prompt, 1)[0].prompt_ids) for prompt, _ in JOBS]
    assert len(set(lengths)) == len(lengths) and max(lengths) > 4 * min(lengths)


def test_prompts_of_different_lengths_prefilled_together_match_generate(
    continuous: Rows, generated: list[str]
) -> None:
    jobs = [continuous.row(prompt, tokens) for prompt, tokens in JOBS]
    for row, _, _ in jobs:
        continuous.engine.submit(row)
    assert continuous.texts(jobs) == generated
    assert max(batch.size for batch in continuous.batches) == len(JOBS)


def test_rows_of_different_lengths_joining_a_running_batch_match_generate(
    continuous: Rows, generated: list[str]
) -> None:
    jobs: list[Any] = []
    joined_mid_batch = 0
    for prompt, tokens in JOBS:
        if jobs:  # wait until the latest row is decoding, so this one joins mid-batch
            latest = jobs[-1][0]
            while not latest.done and len(latest.output_ids) < 2:
                time.sleep(0.001)
            joined_mid_batch += any(not row.done for row, _, _ in jobs)
        jobs.append(continuous.row(prompt, tokens))
        continuous.engine.submit(jobs[-1][0])
    assert continuous.texts(jobs) == generated
    assert joined_mid_batch >= len(JOBS) - 2  # (a short row may end before the next one)
    assert max(batch.size for batch in continuous.batches) >= 3


def test_generate_itself_pads_prompts_of_different_lengths_without_changing_them(
    adapter: ChatTemplateAdapter, generated: list[str]
) -> None:
    rows = Rows(adapter, continuous=False)
    try:
        jobs = [rows.row(prompt, tokens) for prompt, tokens in JOBS]
        for row, _, _ in jobs:
            rows.engine.submit(row)
        assert rows.texts(jobs) == generated
        assert [batch.size for batch in rows.batches] == [len(JOBS)]  # one padded call
    finally:
        rows.engine.stop()
