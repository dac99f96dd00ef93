"""The worker's batching engine, in process, on a real tiny model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.base import LoadSpec
from adapters.chat_template import ChatTemplateAdapter
from gateway.errors import OutOfMemory
from gateway.worker.decoding import RunningBatch, supports_continuous
from gateway.worker.engine import BatchRecord, Engine
from gateway.worker.rows import Delta, Event, Failed, Finished, Row, SamplingParams


@pytest.fixture(scope="module")
def adapter(tiny_model: Path) -> ChatTemplateAdapter:
    loaded = ChatTemplateAdapter(LoadSpec(path=tiny_model, dtype="float32"))
    loaded.load()
    return loaded


class Run:
    """An engine plus helpers to submit rows and collect their events."""

    def __init__(
        self,
        adapter: Any,
        max_batch_size: int = 8,
        wait_s: float = 0.05,
        continuous: bool = True,
    ) -> None:
        self.batches: list[BatchRecord] = []
        self.adapter = adapter
        self.engine = Engine(
            adapter, max_batch_size, wait_s, on_batch=self.batches.append, continuous=continuous
        )
        assert self.engine.continuous == continuous  # the tiny Llama can run either way
        self.engine.start()

    def row(self, prompt: str, **params: Any) -> tuple[Row, list[Event], threading.Event]:
        events: list[Event] = []
        done = threading.Event()

        def emit(event: Event) -> None:
            events.append(event)
            if not isinstance(event, Delta):
                done.set()

        ids = self.adapter.chat_prompt([{"role": "user", "content": prompt}]).ids
        sampling = SamplingParams(**{"max_new_tokens": 16, **params})
        stops = frozenset(self.adapter.stop_token_ids())
        row = Row(ids, sampling, stops, self.adapter.decode, emit)
        return row, events, done

    def run(self, *rows: tuple[Row, list[Event], threading.Event]) -> list[Finished]:
        for row, _, _ in rows:
            self.engine.submit(row)
        for _, _, done in rows:
            assert done.wait(60)
        while self.engine.busy_rows or self.engine.queued:  # the batch record comes last
            time.sleep(0.001)
        results = [events[-1] for _, events, _ in rows]
        assert all(isinstance(r, Finished) for r in results), results
        return results  # type: ignore[return-value]


MODES = {"continuous": True, "per-generate": False}


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> bool:
    """Each engine test runs with both batching modes."""
    return MODES[request.param]


@pytest.fixture
def run(adapter: ChatTemplateAdapter, mode: bool) -> Iterator[Run]:
    runner = Run(adapter, continuous=mode)
    yield runner
    runner.engine.stop()


PROMPTS = ["hello", "你好,你是谁？", "a much longer prompt with many more words in it", "谢谢"]


def test_batched_greedy_rows_equal_the_same_rows_run_alone(run: Run) -> None:
    alone = [run.run(run.row(p))[0].text for p in PROMPTS]
    run.batches.clear()
    together = [f.text for f in run.run(*(run.row(p) for p in PROMPTS))]
    assert together == alone
    assert max(b.size for b in run.batches) == len(PROMPTS)  # they really shared a batch


def test_each_row_keeps_its_own_token_limit(run: Run) -> None:
    results = run.run(run.row("a", max_new_tokens=3), run.row("b", max_new_tokens=11))
    assert [r.completion_tokens for r in results] == [3, 11]
    assert [r.reason for r in results] == ["length", "length"]


def test_a_stop_string_ends_only_its_own_row(run: Run) -> None:
    free = run.run(run.row("hello", max_new_tokens=12))[0].text
    stop = free[3:5]
    assert stop and stop in free
    cut, other = run.run(
        run.row("hello", max_new_tokens=12, stop=(stop,)), run.row("hello", max_new_tokens=12)
    )
    assert cut.reason == "stop"
    assert cut.text == free[: free.index(stop)]
    assert other.text == free


def test_streamed_deltas_add_up_to_the_final_text(run: Run) -> None:
    row = run.row("你好", max_new_tokens=20)
    done = run.run(row)[0]
    deltas = "".join(e.text for e in row[1] if isinstance(e, Delta))
    assert deltas == done.text


def test_a_seeded_sampled_row_is_reproducible_alone_and_in_a_batch(run: Run) -> None:
    params = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234}
    alone = run.run(run.row("hello", **params))[0].text
    again = run.run(run.row("hello", **params))[0].text
    in_batch = run.run(run.row("hello", **params), run.row("other prompt", temperature=1.5))[0]
    assert alone == again == in_batch.text
    other_seed = run.run(run.row("hello", **{**params, "seed": 99}))[0].text
    assert other_seed != alone


def test_repetition_penalty_changes_a_greedy_reply(run: Run) -> None:
    plain = run.run(run.row("hello", max_new_tokens=24))[0].text
    penalized = run.run(run.row("hello", max_new_tokens=24, repetition_penalty=5.0))[0].text
    assert plain != penalized


def test_a_cancelled_row_stops_within_two_steps_and_the_others_continue(run: Run) -> None:
    victim = run.row("hello", max_new_tokens=200)
    survivor = run.row("hello", max_new_tokens=200)
    row = victim[0]

    def cancel_after_five_tokens() -> None:
        while len(row.output_ids) < 5:
            time.sleep(0.001)
        row.cancelled.set()
        seen_at_cancel.append(len(row.output_ids))

    seen_at_cancel: list[int] = []
    canceller = threading.Thread(target=cancel_after_five_tokens)
    canceller.start()
    cancelled, finished = run.run(victim, survivor)
    canceller.join()
    assert cancelled.reason == "cancelled"
    assert cancelled.completion_tokens - seen_at_cancel[0] <= 2
    assert finished.reason == "length" and finished.completion_tokens == 200


def test_a_row_cancelled_while_queued_never_runs(run: Run) -> None:
    row = run.row("hello")
    row[0].cancelled.set()
    assert run.run(row)[0].reason == "cancelled"
    assert row[0].output_ids == []


def test_concurrent_submissions_are_gathered_into_one_batch(
    adapter: ChatTemplateAdapter, mode: bool
) -> None:
    runner = Run(adapter, max_batch_size=4, wait_s=0.2, continuous=mode)
    try:
        runner.run(*(runner.row(f"prompt {i}", max_new_tokens=4) for i in range(6)))
        sizes = [b.size for b in runner.batches]
        if mode:  # one record per decoding step: four rows, then the two that waited
            assert sizes == [4, 4, 4, 2, 2, 2]
        else:  # one record per generate call
            assert sorted(sizes) == [2, 4]
    finally:
        runner.engine.stop()


def test_an_adapter_that_forbids_batching_runs_rows_one_by_one(
    adapter: ChatTemplateAdapter, mode: bool
) -> None:
    class Unbatchable:
        max_batch_size = 1

        def __getattr__(self, name: str) -> Any:
            return getattr(adapter, name)

    runner = Run(Unbatchable(), max_batch_size=8, wait_s=0.1, continuous=mode)
    try:
        results = runner.run(*(runner.row(p, max_new_tokens=3) for p in PROMPTS))
        assert [r.completion_tokens for r in results] == [3, 3, 3, 3]
        assert {b.size for b in runner.batches} == {1}
    finally:
        runner.engine.stop()


def test_out_of_memory_fails_only_that_batch(adapter: ChatTemplateAdapter) -> None:
    import torch

    class OomOnce:
        max_batch_size = None

        def __init__(self) -> None:
            self.model = self._Model()

        class _Model:
            calls = 0

            def generate(self, **kwargs: Any) -> Any:
                type(self).calls += 1
                if type(self).calls == 1:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return adapter.model.generate(**kwargs)

            def __getattr__(self, name: str) -> Any:
                return getattr(adapter.model, name)

        def __getattr__(self, name: str) -> Any:
            return getattr(adapter, name)

    runner = Run(OomOnce(), continuous=False)
    try:
        row = runner.row("hello")
        runner.engine.submit(row[0])
        assert row[2].wait(30)
        failure = row[1][-1]
        assert isinstance(failure, Failed) and isinstance(failure.error, OutOfMemory)
        assert failure.error.status == 503
        assert runner.run(runner.row("hello", max_new_tokens=2))[0].completion_tokens == 2
    finally:
        runner.engine.stop()


def test_out_of_memory_in_a_decoding_step_fails_its_rows_and_the_engine_goes_on(
    adapter: ChatTemplateAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    real_step = RunningBatch.step
    steps = 0

    def step_then_fail_once(self: RunningBatch, model: Any) -> None:
        nonlocal steps
        steps += 1
        if steps == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_step(self, model)

    monkeypatch.setattr(RunningBatch, "step", step_then_fail_once)
    runner = Run(adapter)
    try:
        rows = [runner.row(p, max_new_tokens=8) for p in PROMPTS[:2]]
        for row in rows:
            runner.engine.submit(row[0])
        for row in rows:
            assert row[2].wait(30)
            failure = row[1][-1]
            assert isinstance(failure, Failed) and failure.error.status == 503
            assert sum(not isinstance(event, Delta) for event in row[1]) == 1  # one ending
        assert runner.run(runner.row("hello", max_new_tokens=2))[0].completion_tokens == 2
    finally:
        runner.engine.stop()


def test_a_row_joins_a_running_batch_and_leaves_it_when_done(adapter: ChatTemplateAdapter) -> None:
    runner = Run(adapter)
    try:
        for first, late in [(PROMPTS[0], PROMPTS[2]), (PROMPTS[2], PROMPTS[0])]:  # both widths
            expected = runner.run(runner.row(late, max_new_tokens=6))[0].text
            long_row = runner.row(first, max_new_tokens=120)
            runner.engine.submit(long_row[0])
            while len(long_row[0].output_ids) < 10:
                time.sleep(0.001)
            late_row = runner.row(late, max_new_tokens=6)
            runner.engine.submit(late_row[0])
            assert late_row[2].wait(30)
            # It finished while the long row was still generating: it did not wait for it.
            assert not long_row[2].is_set()
            assert late_row[1][-1] == Finished("length", len(late_row[0].prompt_ids), 6, expected)
            assert long_row[2].wait(30)
        sizes = [b.size for b in runner.batches]
        assert 2 in sizes and sizes[-1] == 1  # together for a while, then alone again
    finally:
        runner.engine.stop()


def test_staggered_rows_through_a_full_batch_each_get_their_alone_text(
    adapter: ChatTemplateAdapter,
) -> None:
    import random

    rng = random.Random(7)
    # The first four, long and sent at once, fill the batch; the rest come and go.
    limits = [20] * 4 + [rng.randint(1, 24) for _ in range(6)]
    jobs = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 3), n) for i, n in enumerate(limits)]
    runner = Run(adapter, max_batch_size=3)  # a full batch: later rows wait for room
    try:
        alone = [runner.run(runner.row(p, max_new_tokens=n))[0].text for p, n in jobs]
        runner.batches.clear()
        rows = []
        for prompt, limit in jobs:
            rows.append(runner.row(prompt, max_new_tokens=limit))
            runner.engine.submit(rows[-1][0])
            if len(rows) >= 4:
                time.sleep(rng.uniform(0, 0.02))
        assert all(done.wait(60) for _, _, done in rows)
        texts = [events[-1].text for _, events, _ in rows]  # type: ignore[union-attr]
        assert texts == alone
        sizes = [b.size for b in runner.batches]
        assert max(sizes) == 3  # rows shared steps, and never more than the batch allows
    finally:
        runner.engine.stop()


def test_cache_padding_is_trimmed_when_the_longest_row_leaves(
    adapter: ChatTemplateAdapter,
) -> None:
    run = Run(adapter, continuous=False)  # only for its row helper
    run.engine.stop()
    short, _, _ = run.row("hi", max_new_tokens=3)
    long, _, _ = run.row(PROMPTS[2] * 3, max_new_tokens=3)
    import torch

    model = adapter.model
    with torch.inference_mode():
        batch = RunningBatch.prefill(model, [short, long], adapter.pad_token_id(), "cpu")
        assert batch.mask.shape[1] == len(long.prompt_ids)
        long.cancelled.set()
        assert long.finish_if_cancelled()
        batch.drop_finished()
        # One row left: no column of padding, the cache as wide as its own tokens.
        assert batch.rows == [short]
        assert batch.mask.shape[1] == len(short.prompt_ids)
        assert bool(batch.mask.all())
        assert all(layer.keys.shape[2] == len(short.prompt_ids) for layer in batch.cache.layers)
        batch.step(model)
        assert batch.mask.shape[1] == len(short.prompt_ids) + 1
    assert len(short.output_ids) == 2


def test_models_that_bring_their_own_cache_code_are_batched_per_generate(
    adapter: ChatTemplateAdapter, faulty_model: Path
) -> None:
    from transformers import AutoModelForCausalLM

    assert supports_continuous(adapter.model)
    remote = AutoModelForCausalLM.from_pretrained(faulty_model, trust_remote_code=True)
    assert not supports_continuous(remote)


def test_the_cache_keyword_follows_the_forward_signature() -> None:
    from gateway.worker.decoding import _cache_keyword

    class Before524:  # transformers before 5.24 took the cache as `past_key_values`
        def forward(self, input_ids: Any, past_key_values: Any, logits_to_keep: int) -> None: ...

    class Current:
        def forward(self, input_ids: Any, cache: Any, logits_to_keep: int) -> None: ...

    class TooOld:  # no way to ask for the last position's logits only
        def forward(self, input_ids: Any, past_key_values: Any) -> None: ...

    assert _cache_keyword(Before524()) == "past_key_values"
    assert _cache_keyword(Current()) == "cache"
    assert _cache_keyword(TooOld()) is None


def test_an_adapter_with_a_before_generate_hook_is_batched_per_generate(
    adapter: ChatTemplateAdapter,
) -> None:
    class Hooked(ChatTemplateAdapter):
        def before_generate(self) -> None:
            self.calls = getattr(self, "calls", 0) + 1

    hooked = Hooked.__new__(Hooked)
    hooked.__dict__.update(adapter.__dict__)  # the loaded model, without a second load
    runner = Run(hooked, continuous=False)
    try:
        assert Engine(hooked, 8, 0.0, continuous=True).mode == "per-generate"
        runner.run(runner.row("hello", max_new_tokens=2))
        assert hooked.calls == 1  # the hook the continuous loop could not have called
    finally:
        runner.engine.stop()


def test_rows_report_events_on_the_event_loop(adapter: ChatTemplateAdapter) -> None:
    async def main() -> str:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        runner = Run(adapter)
        ids = adapter.chat_prompt([{"role": "user", "content": "hi"}]).ids
        row = Row(
            ids,
            SamplingParams(max_new_tokens=5),
            frozenset(adapter.stop_token_ids()),
            adapter.decode,
            emit,
        )
        runner.engine.submit(row)
        text = ""
        while not isinstance(event := await asyncio.wait_for(queue.get(), 30), Finished):
            assert isinstance(event, Delta)
            text += event.text
        runner.engine.stop()
        assert text == event.text
        return text

    assert asyncio.run(main())


def test_regression_a_vanishing_temperature_is_greedy_not_a_crash(run: Run) -> None:
    # Found by the schema fuzzer: logits divided by 1e-212 overflowed to inf/nan and the
    # sampler raised, failing the whole batch with a 500.
    greedy = run.run(run.row("hello", max_new_tokens=6))[0]
    tiny = run.run(run.row("hello", max_new_tokens=6, temperature=1.4568e-212))[0]
    small = run.run(run.row("hello", max_new_tokens=6, temperature=1e-4, seed=3))[0]
    assert tiny.text == greedy.text == small.text
