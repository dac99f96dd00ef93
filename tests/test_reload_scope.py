"""Which entry changes restart a model and which the gateway applies to the next request."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import RateLimited
from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.changes import (
    LOCAL_POLICY_FIELDS,
    LOCAL_POLICY_LIMITS,
    PER_REQUEST_FIELDS,
    PER_REQUEST_LIMITS,
    WORKER_GENERATION,
    restart_needed,
)
from gateway.registry.config import Generation, Limits, ModelEntry
from gateway.registry.load import parse_registry
from tests.fakes import FakeLauncher


def entry(**fields: object) -> ModelEntry:
    return ModelEntry.model_validate({"source": "/m", **fields})


def test_the_listed_fields_are_the_entry_s_own() -> None:
    # A renamed field left in these lists would silently restart, or keep, a model.
    assert set(PER_REQUEST_FIELDS + LOCAL_POLICY_FIELDS) <= set(ModelEntry.model_fields)
    assert set(PER_REQUEST_LIMITS + LOCAL_POLICY_LIMITS) <= set(Limits.model_fields)
    assert set(WORKER_GENERATION) <= set(Generation.model_fields)


def test_a_new_default_token_count_restarts_the_worker_but_not_a_relayed_engine() -> None:
    longer = {"generation": {"max_new_tokens": 64}}
    assert restart_needed(entry(), entry(**longer), cluster=False)  # the worker clamps it
    relayed = {"upstream": {"url": "http://127.0.0.1:9"}}  # the gateway sends it each time
    assert not restart_needed(
        ModelEntry.model_validate(relayed),
        ModelEntry.model_validate({**relayed, **longer}),
        cluster=False,
    )


@pytest.mark.parametrize(
    "change",
    [
        {"description": "the fast one"},
        {"system_prompt": "Answer in French."},
        {"generation": {"temperature": 0.2, "top_k": 5, "stop": ["\n\n"]}},
        # (above the default token count, which a lower limit would lower with it)
        {"limits": {"max_new_tokens": 1000, "max_messages": 8, "queue_timeout_s": 3}},
    ],
)
def test_what_the_gateway_applies_per_request_keeps_the_model(change: dict[str, object]) -> None:
    assert entry(**change) != entry()
    assert not restart_needed(entry(), entry(**change), cluster=False)
    assert not restart_needed(entry(), entry(**change), cluster=True)


@pytest.mark.parametrize(
    "change",
    [
        {"source": "/other"},
        {"dtype": "bfloat16"},
        {"chat_template": "{{ messages }}"},  # the worker renders it
        {"env": {"A": "1"}},
        {"threads": 2},
        {"limits": {"context_length": 256}},  # the engine's window
        {"limits": {"max_concurrency": 4}},  # the worker's batch
        {"limits": {"request_timeout_s": 30}},  # the worker's stall watch
        {"batching": {"max_batch_size": 2}},
        {"memory_bytes": 1000},  # what the budget reserved for it
        # A change beside a per-request one still restarts.
        {"system_prompt": "Be brief.", "dtype": "float16"},
    ],
)
def test_what_the_model_s_process_reads_at_its_start_restarts_it(
    change: dict[str, object],
) -> None:
    assert restart_needed(entry(), entry(**change), cluster=False)
    assert restart_needed(entry(), entry(**change), cluster=True)


@pytest.mark.parametrize(
    "change",
    [{"idle_unload_s": 5}, {"pinned": True}, {"limits": {"max_queue": 3}}],
)
def test_queue_and_idle_policy_are_the_gateway_s_alone_but_serve_options_on_a_cluster(
    change: dict[str, object],
) -> None:
    assert not restart_needed(entry(), entry(**change), cluster=False)
    assert restart_needed(entry(), entry(**change), cluster=True)


async def test_a_retuned_model_keeps_its_worker_and_the_next_request_reads_the_new_entry() -> None:
    launcher = FakeLauncher()
    old = "models: {a: {source: /a}, b: {source: /b}}"
    supervisor = Supervisor(parse_registry(old), launcher)
    async with supervisor.lease("a"):
        pass
    worker = launcher.backends["a"]
    new = (
        "models:\n  a: {source: /a, system_prompt: Be brief., limits: {max_queue: 0,"
        " max_concurrency: 32}}\n  b: {source: /b}"
    )
    report = supervisor.apply(parse_registry(new))
    assert report.changed == ["a"] and report.retuned == ["a"] and report.unchanged == ["b"]
    await asyncio.sleep(0.01)
    assert not worker.stopped and launcher.launches == ["a"]
    runtime = supervisor.get("a")
    assert runtime.state == "ready" and runtime.entry.system_prompt == "Be brief."

    # The new queue limit holds at once: one request at a time could run (32), none wait.
    release = asyncio.Event()
    held = []

    async def long_request() -> None:
        async with supervisor.lease("a"):
            held.append(1)
            await release.wait()

    holders = [asyncio.create_task(long_request()) for _ in range(32)]
    await asyncio.sleep(0.01)
    assert len(held) == 32
    with pytest.raises(RateLimited):
        async with supervisor.lease("a"):
            pass
    release.set()
    await asyncio.gather(*holders)
    assert launcher.backends["a"] is worker and launcher.launches == ["a"]


async def test_a_change_a_start_reads_restarts_even_beside_a_retune() -> None:
    launcher = FakeLauncher()
    supervisor = Supervisor(parse_registry("models: {a: {source: /a}}"), launcher)
    async with supervisor.lease("a"):
        pass
    worker = launcher.backends["a"]
    report = supervisor.apply(
        parse_registry("models: {a: {source: /a, system_prompt: Hi., dtype: float16}}")
    )
    assert report.changed == ["a"] and report.retuned == []
    async with supervisor.lease("a"):
        pass
    assert worker.stopped and launcher.launches == ["a", "a"]
