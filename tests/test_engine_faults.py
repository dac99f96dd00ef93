"""How the batching engine fails: which rows a failure reaches, what it frees, and that
the generation thread outlives it. In process, on the real tiny model."""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.base import LoadSpec
from adapters.chat_template import ChatTemplateAdapter
from gateway.errors import GatewayError
from gateway.worker.decoding import RunningBatch
from gateway.worker.engine import Engine
from gateway.worker.rows import Delta, Event, Failed, Finished, Row
from tests.support import wait_until
from tests.test_engine import PROMPTS, Run

Job = tuple[Row, list[Event], Any]


@pytest.fixture(scope="module")
def adapter(tiny_model: Path) -> ChatTemplateAdapter:
    loaded = ChatTemplateAdapter(LoadSpec(path=tiny_model, dtype="float32"))
    loaded.load()
    return loaded


@pytest.fixture
def continuous(adapter: ChatTemplateAdapter) -> Iterator[Run]:
    runner = Run(adapter)
    yield runner
    runner.engine.stop()


class FakeOom(torch.OutOfMemoryError):  # type: ignore[misc]
    """As a GPU raises it; a Python subclass, so a weak reference can watch it."""


def failure_of(job: Job, timeout: float = 30) -> GatewayError:
    assert job[2].wait(timeout), "the row never ended"
    ending = job[1][-1]
    assert isinstance(ending, Failed), ending
    assert sum(not isinstance(event, Delta) for event in job[1]) == 1  # one ending
    return ending.error


def start_long_row(runner: Run, tokens: int = 60) -> Job:
    job = runner.row(PROMPTS[0], max_new_tokens=tokens)
    runner.engine.submit(job[0])
    while len(job[0].output_ids) < 5:  # it is decoding now
        time.sleep(0.001)
    return job


@pytest.mark.parametrize(
    "error",
    [FakeOom("CUDA out of memory. Tried to allocate 2.00 GiB"), RuntimeError("a bad prompt")],
    ids=["out-of-memory", "exception"],
)
def test_a_failed_prefill_fails_only_the_arriving_rows(
    continuous: Run, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    runner = continuous
    alone = runner.run(runner.row(PROMPTS[0], max_new_tokens=60))[0].text
    arrivals = [runner.row(p, max_new_tokens=4) for p in PROMPTS[1:3]]
    real_prefill = RunningBatch.prefill

    def prefill(cls: type[RunningBatch], model: Any, rows: list[Row], *args: Any) -> Any:
        if any(row is job[0] for job in arrivals for row in rows):
            raise error
        return real_prefill(model, rows, *args)

    monkeypatch.setattr(RunningBatch, "prefill", classmethod(prefill))
    running = start_long_row(runner)
    for job in arrivals:
        runner.engine.submit(job[0])
    for job in arrivals:
        assert failure_of(job).status == (503 if isinstance(error, FakeOom) else 500)
    assert running[2].wait(30)
    assert running[1][-1] == Finished("length", len(running[0].prompt_ids), 60, alone)
    assert runner.run(runner.row("hello", max_new_tokens=2))[0].completion_tokens == 2


class MemorySpy:
    """Fakes a GPU's `empty_cache` and notes, each time, which watched objects are gone."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.watched: list[weakref.ref[Any]] = []
        self.calls: list[list[bool]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", self.empty_cache)

    def watch(self, *objects: Any) -> None:
        self.watched.extend(weakref.ref(o) for o in objects)

    def watch_cache(self, batch: RunningBatch) -> None:
        self.watch(*(t for layer in batch.cache.layers for t in (layer.keys, layer.values)))

    def empty_cache(self) -> None:
        self.calls.append([ref() is None for ref in self.watched])

    def fail_here(self) -> None:
        """Raise an OOM from a frame that holds activations, as a failing forward does."""
        activations = torch.ones(64, 64)
        error = FakeOom("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.watch(activations, error)
        raise error


def test_out_of_memory_in_a_step_frees_the_batch_cache_and_the_exception_before_emptying(
    continuous: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = MemorySpy(monkeypatch)
    real_step = RunningBatch.step

    def step(self: RunningBatch, model: Any) -> None:
        if len(self.rows[0].output_ids) < 3:
            return real_step(self, model)
        spy.watch_cache(self)
        spy.fail_here()

    monkeypatch.setattr(RunningBatch, "step", step)
    jobs = [continuous.row(p, max_new_tokens=8) for p in PROMPTS[:2]]
    for job in jobs:
        continuous.engine.submit(job[0])
    assert all(failure_of(job).status == 503 for job in jobs)
    assert wait_until(lambda: spy.calls)  # memory is emptied after the rows are told
    assert spy.calls == [[True] * len(spy.watched)]


def test_out_of_memory_in_a_prefill_frees_its_cache_and_the_exception_before_emptying(
    continuous: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = MemorySpy(monkeypatch)
    real_prefill = RunningBatch.prefill

    def prefill(cls: type[RunningBatch], *args: Any) -> Any:
        spy.watch_cache(real_prefill(*args))
        spy.fail_here()

    monkeypatch.setattr(RunningBatch, "prefill", classmethod(prefill))
    job = continuous.row("hello")
    continuous.engine.submit(job[0])
    assert failure_of(job).status == 503
    assert wait_until(lambda: spy.calls)  # memory is emptied after the rows are told
    assert spy.calls == [[True] * len(spy.watched)]


def test_out_of_memory_in_generate_frees_the_exception_before_emptying(
    adapter: ChatTemplateAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = MemorySpy(monkeypatch)
    monkeypatch.setattr(adapter.model, "generate", lambda **kwargs: spy.fail_here())
    runner = Run(adapter, continuous=False)
    try:
        job = runner.row("hello")
        runner.engine.submit(job[0])
        assert failure_of(job).status == 503
        assert wait_until(lambda: spy.calls)  # memory is emptied after the rows are told
        assert spy.calls == [[True] * len(spy.watched)]
    finally:
        runner.engine.stop()


@pytest.mark.parametrize("mode", [True, False], ids=["continuous", "per-generate"])
def test_out_of_memory_on_a_torch_without_OutOfMemoryError_fails_the_batch_not_the_thread(
    adapter: ChatTemplateAdapter, monkeypatch: pytest.MonkeyPatch, mode: bool
) -> None:
    # torch before 2.5 has only torch.cuda.OutOfMemoryError (or a RuntimeError saying so).
    monkeypatch.delattr(torch, "OutOfMemoryError")
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    runner = Run(adapter, continuous=mode)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(adapter.model, "forward", _raising(oom, like=adapter.model.forward))
            job = runner.row("hello")
            runner.engine.submit(job[0])
            assert failure_of(job, timeout=10).code == "out_of_memory"
        assert runner.engine.alive
        assert runner.run(runner.row("hello", max_new_tokens=2))[0].completion_tokens == 2
    finally:
        runner.engine.stop()


@pytest.mark.parametrize("mode", [True, False], ids=["continuous", "per-generate"])
def test_an_error_while_reporting_a_failure_does_not_stop_the_generation_thread(
    adapter: ChatTemplateAdapter, mode: bool, caplog: pytest.LogCaptureFixture
) -> None:
    runner = Run(adapter, continuous=mode)
    try:
        row = runner.row("hello")[0]

        def broken_emit(event: Event) -> None:  # a reply channel that fails on every event
            raise RuntimeError("the reply channel broke")

        row.emit = broken_emit
        runner.engine.submit(row)
        assert wait_until(lambda: row.done)
        assert runner.run(runner.row("hello", max_new_tokens=2))[0].completion_tokens == 2
        assert runner.engine.alive and row.finish_reason == "error"
        assert "could not be told that it failed" in caplog.text
    finally:
        runner.engine.stop()


@pytest.mark.parametrize("mode", [True, False], ids=["continuous", "per-generate"])
def test_a_generation_thread_that_dies_fails_its_rows_and_refuses_new_ones(
    adapter: ChatTemplateAdapter,
    mode: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Not a model failure (those are handled per batch): a defect in the loop itself.
    where = "_advance" if mode else "_generate_or_fail"
    monkeypatch.setattr(Engine, where, _raising(AssertionError("a defect")))
    runner = Run(adapter, continuous=mode)
    try:
        job = runner.row("hello")
        runner.engine.submit(job[0])
        assert "generation thread stopped" in failure_of(job, timeout=10).message
        runner.engine._thread.join(10)
        assert not runner.engine.alive
        with pytest.raises(GatewayError, match="generation thread stopped"):
            runner.engine.submit(runner.row("hello")[0])
        assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    finally:
        runner.engine.stop()


def _raising(error: BaseException, like: Any = None) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail if like is None else functools.wraps(like)(fail)  # keeps its signature


@pytest.mark.parametrize("mode", [True, False], ids=["continuous", "per-generate"])
def test_rows_that_end_at_their_first_token_leave_no_failure_behind(
    adapter: ChatTemplateAdapter, mode: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Every row finishes in its prefill: the batch is empty before its first step.
    runner = Run(adapter, continuous=mode)
    try:
        for _ in range(3):
            results = runner.run(*(runner.row(p, max_new_tokens=1) for p in PROMPTS[:2]))
            assert [r.completion_tokens for r in results] == [1, 1]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        runner.engine.stop()
