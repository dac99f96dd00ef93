"""The lifecycle state machine, with a fake launcher at the process seam and a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import ModelNotFound, ModelUnavailable, RateLimited
from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.config import Registry
from gateway.registry.load import parse_registry
from tests.fakes import Clock, FakeLauncher, others_pending


def registry(text: str) -> Registry:
    return parse_registry(text)


TWO = """
gateway: {memory_budget: {cpu: 150}}
models:
  a: {source: /a, memory_bytes: 100}
  b: {source: /b, memory_bytes: 100}
"""


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def use(supervisor: Supervisor, name: str, keep_alive: float | None = None) -> None:
    async with supervisor.lease(name, keep_alive):
        pass


async def hold(supervisor: Supervisor, name: str) -> tuple[asyncio.Task[None], asyncio.Event]:
    """A long request on `name`, in flight until the returned event is set."""
    release = asyncio.Event()

    async def long_request() -> None:
        async with supervisor.lease(name):
            await release.wait()

    holder = asyncio.create_task(long_request())
    await asyncio.sleep(0.01)
    return holder, release


async def test_concurrent_first_requests_share_one_start(launcher: FakeLauncher) -> None:
    launcher.delay = 0.05
    supervisor = Supervisor(registry("models: {a: {source: /a}}"), launcher)
    await asyncio.gather(*(use(supervisor, "a") for _ in range(10)))
    assert launcher.launches == ["a"]
    assert supervisor.get("a").state == "ready"


async def test_an_unknown_model_is_404_listing_the_valid_names(launcher: FakeLauncher) -> None:
    supervisor = Supervisor(registry(TWO), launcher)
    with pytest.raises(ModelNotFound, match="valid models: a, b"):
        await use(supervisor, "c")


async def test_a_failed_load_backs_off_then_retries(launcher: FakeLauncher, clock: Clock) -> None:
    launcher.fail["a"] = "weights are corrupt"
    supervisor = Supervisor(registry("models: {a: {source: /a}}"), launcher, clock=clock)
    with pytest.raises(ModelUnavailable, match="weights are corrupt") as first:
        await use(supervisor, "a")
    assert first.value.headers["Retry-After"] == "2"
    with pytest.raises(ModelUnavailable):  # within the backoff: no new attempt
        await use(supervisor, "a")
    assert launcher.launches == ["a"]
    assert supervisor.status(supervisor.get("a"))["last_error"] == "weights are corrupt"
    del launcher.fail["a"]
    clock.now += 2
    await use(supervisor, "a")
    assert launcher.launches == ["a", "a"]
    assert supervisor.get("a").last_error is None


async def test_a_crashed_worker_is_replaced_by_the_next_request(launcher: FakeLauncher) -> None:
    supervisor = Supervisor(registry("models: {a: {source: /a}}"), launcher)
    await use(supervisor, "a")
    launcher.backends["a"].crash()
    await asyncio.sleep(0)
    runtime = supervisor.get("a")
    assert runtime.state == "unloaded" and "exited unexpectedly" in (runtime.last_error or "")
    await use(supervisor, "a")
    assert launcher.launches == ["a", "a"] and runtime.state == "ready"


async def test_repeated_crashes_leave_the_model_failed(launcher: FakeLauncher) -> None:
    supervisor = Supervisor(registry("models: {a: {source: /a}}"), launcher)
    for _ in range(3):
        await use(supervisor, "a")
        launcher.backends["a"].crash()
        await asyncio.sleep(0)
    runtime = supervisor.get("a")
    assert runtime.state == "failed" and "3 crashes" in (runtime.last_error or "")
    with pytest.raises(ModelUnavailable, match="3 crashes"):
        await use(supervisor, "a")


async def test_a_budget_for_one_model_swaps_them_lru(launcher: FakeLauncher) -> None:
    supervisor = Supervisor(registry(TWO), launcher)
    for name in ["a", "b", "a", "b"]:
        await use(supervisor, name)
        assert launcher.alive() == [name]
    assert launcher.launches == ["a", "b", "a", "b"]


async def test_a_busy_model_is_not_evicted_the_new_load_waits(launcher: FakeLauncher) -> None:
    supervisor = Supervisor(registry(TWO), launcher)
    holder, release = await hold(supervisor, "a")
    waiting = asyncio.create_task(use(supervisor, "b"))
    await asyncio.sleep(0.05)
    assert not waiting.done() and launcher.alive() == ["a"]
    release.set()
    await asyncio.gather(holder, waiting)
    assert launcher.alive() == ["b"]


async def test_waiting_for_a_busy_model_is_bounded(launcher: FakeLauncher) -> None:
    text = TWO.replace(
        "memory_budget: {cpu: 150}", "memory_budget: {cpu: 150}, load_timeout_s: 0.1"
    )
    supervisor = Supervisor(registry(text), launcher)
    holder, release = await hold(supervisor, "a")
    with pytest.raises(ModelUnavailable, match="waiting for a to finish") as refused:
        await use(supervisor, "b")
    assert refused.value.headers["Retry-After"]
    await asyncio.sleep(0.05)  # the placement gives up too
    runtime = supervisor.get("b")
    assert runtime.state == "unloaded"  # not marked failed: it may fit later
    assert "while a is busy" in (runtime.last_error or "")
    release.set()
    await holder
    await use(supervisor, "b")


async def test_a_model_bigger_than_the_budget_is_refused(launcher: FakeLauncher) -> None:
    text = "gateway: {memory_budget: {cpu: 50}}\nmodels: {a: {source: /a, memory_bytes: 100}}"
    supervisor = Supervisor(registry(text), launcher)
    with pytest.raises(
        ModelUnavailable, match="needs 100 B on device cpu, more than its budget of 50 B"
    ):
        await use(supervisor, "a")
    assert launcher.launches == []


async def test_pinned_models_are_never_evicted(launcher: FakeLauncher) -> None:
    text = TWO.replace(
        "a: {source: /a, memory_bytes: 100}", "a: {source: /a, memory_bytes: 100, pinned: true}"
    )
    supervisor = Supervisor(registry(text), launcher)
    await use(supervisor, "a")
    with pytest.raises(ModelUnavailable, match="pinned"):
        await use(supervisor, "b")
    assert launcher.alive() == ["a"]


async def test_idle_unload_and_keep_alive(launcher: FakeLauncher, clock: Clock) -> None:
    text = "gateway: {idle_unload_s: 60}\nmodels: {a: {source: /a}, b: {source: /b}}"
    supervisor = Supervisor(registry(text), launcher, clock=clock)
    await use(supervisor, "a")
    await use(supervisor, "b", keep_alive=-1)
    clock.now += 59
    await supervisor.reap_idle()
    assert launcher.alive() == ["a", "b"]
    clock.now += 1
    await supervisor.reap_idle()
    assert launcher.alive() == ["b"]  # keep_alive -1 outlives the global idle timeout
    await use(supervisor, "a", keep_alive=0)
    await asyncio.sleep(0.01)
    assert launcher.alive() == ["b"]  # keep_alive 0 unloads right after the request


async def test_a_model_is_not_unloaded_under_a_request(
    launcher: FakeLauncher, clock: Clock
) -> None:
    supervisor = Supervisor(
        registry("models: {a: {source: /a, idle_unload_s: 1}}"), launcher, clock=clock
    )
    async with supervisor.lease("a"):
        clock.now += 100
        await supervisor.reap_idle()
        assert launcher.alive() == ["a"]
    clock.now += 1
    await supervisor.reap_idle()
    assert launcher.alive() == []


async def test_apply_keeps_unchanged_restarts_changed_retires_removed(
    launcher: FakeLauncher,
) -> None:
    old = "models: {a: {source: /a}, b: {source: /b}, c: {source: /c}}"
    supervisor = Supervisor(registry(old), launcher)
    for name in "abc":
        await use(supervisor, name)
    first = dict(launcher.backends)
    new = (
        "gateway: {default_model: d}\nmodels: {a: {source: /a}, b: {source: /b2}, d: {source: /d}}"
    )
    report = supervisor.apply(registry(new))
    assert (report.added, report.removed, report.changed, report.unchanged) == (
        ["d"],
        ["c"],
        ["b"],
        ["a"],
    )
    await asyncio.sleep(0.01)
    assert not first["a"].stopped  # untouched
    assert first["b"].stopped and first["c"].stopped
    with pytest.raises(ModelNotFound):
        await use(supervisor, "c")
    await use(supervisor, "b")
    assert launcher.backends["b"] is not first["b"]
    assert supervisor.default_model() == "d"


async def test_a_removed_model_finishes_its_request_before_it_stops(launcher: FakeLauncher) -> None:
    supervisor = Supervisor(registry("models: {a: {source: /a}, b: {source: /b}}"), launcher)
    holder, release = await hold(supervisor, "a")
    supervisor.apply(registry("models: {b: {source: /b}}"))
    await asyncio.sleep(0.01)
    assert not launcher.backends["a"].stopped
    release.set()
    await holder
    await asyncio.sleep(0.01)
    assert launcher.backends["a"].stopped


async def test_lifecycle_events_are_published(launcher: FakeLauncher) -> None:
    supervisor = Supervisor(registry("models: {a: {source: /a}}"), launcher)
    with supervisor.events.subscribe() as queue:
        await use(supervisor, "a")
        await supervisor.unload("a")
        events = [queue.get_nowait() for _ in range(queue.qsize())]
    states = [e["state"] for e in events if e["type"] == "state"]
    assert states == ["starting", "ready", "draining", "unloaded"]
    assert any(e["type"] == "progress" and e["stage"] == "load" for e in events)


# -- a load counts as a use ------------------------------------------------------------------


async def test_a_model_loaded_by_the_admin_api_is_not_reaped_as_idle_since_boot(
    launcher: FakeLauncher, clock: Clock
) -> None:
    text = "gateway: {idle_unload_s: 60}\nmodels: {a: {source: /a}}"
    supervisor = Supervisor(registry(text), launcher, clock=clock)
    await supervisor.load("a")
    await supervisor.reap_idle()
    assert launcher.alive() == ["a"]
    clock.now += 60
    await supervisor.reap_idle()
    assert launcher.alive() == []


async def test_a_model_loaded_by_the_admin_api_is_not_the_first_to_be_evicted(
    launcher: FakeLauncher, clock: Clock
) -> None:
    text = """
gateway: {memory_budget: {cpu: 250}}
models:
  a: {source: /a, memory_bytes: 100}
  b: {source: /b, memory_bytes: 100}
  c: {source: /c, memory_bytes: 100}
"""
    supervisor = Supervisor(registry(text), launcher, clock=clock)
    await use(supervisor, "a")
    clock.now += 1
    await supervisor.load("b")  # used after a: a is the least recently used
    clock.now += 1
    await use(supervisor, "c")
    assert launcher.alive() == ["b", "c"]


# -- a cancelled load: what its waiters get --------------------------------------------------


def waiters(supervisor: Supervisor, name: str, count: int = 3) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(use(supervisor, name)) for _ in range(count)]
    return [*tasks, asyncio.create_task(supervisor.load(name))]


async def test_waiters_of_a_load_cancelled_by_unload_get_503_with_retry_after(
    launcher: FakeLauncher,
) -> None:
    launcher.delay = 1.0
    supervisor = Supervisor(registry("models: {a: {source: /a}}"), launcher)
    pending = waiters(supervisor, "a")
    await asyncio.sleep(0.05)
    await supervisor.unload("a")
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, ModelUnavailable) for r in results), results
    assert all(
        int(r.headers["Retry-After"]) >= 1 for r in results if isinstance(r, ModelUnavailable)
    )


async def test_waiters_of_a_load_cancelled_by_shutdown_get_503_with_retry_after(
    launcher: FakeLauncher,
) -> None:
    launcher.delay = 1.0
    supervisor = Supervisor(registry("models: {a: {source: /a}}"), launcher)
    pending = waiters(supervisor, "a")
    await asyncio.sleep(0.05)
    await supervisor.shutdown()
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, ModelUnavailable) for r in results), results
    assert all("shutting down" in str(r) for r in results)
    assert all(r.headers["Retry-After"] for r in results if isinstance(r, ModelUnavailable))


async def test_waiters_of_a_removed_model_get_404(launcher: FakeLauncher) -> None:
    launcher.delay = 1.0
    supervisor = Supervisor(registry("models: {a: {source: /a}, b: {source: /b}}"), launcher)
    pending = waiters(supervisor, "a")
    await asyncio.sleep(0.05)
    supervisor.apply(registry("models: {b: {source: /b}}"))
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, ModelNotFound) for r in results), results


async def test_waiters_of_a_load_replaced_by_reloads_wait_for_the_new_load(
    launcher: FakeLauncher,
) -> None:
    launcher.delay = 0.1
    supervisor = Supervisor(registry("models: {a: {source: /a}}"), launcher)
    pending = waiters(supervisor, "a", count=8)
    for i in range(5):  # each reload changes the entry while its load is under way
        await asyncio.sleep(0.03)
        supervisor.apply(registry(f"models: {{a: {{source: /a{i}}}}}"))
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert results == [None] * 9
    assert launcher.launches == ["a"] * 6 and launcher.alive() == ["a"]
    assert supervisor.get("a").entry.source == "/a4"


async def test_a_change_undone_while_its_model_loads_still_serves_the_waiters(
    launcher: FakeLauncher,
) -> None:
    """A to B and at once back to A (with a new system prompt): the load was cancelled by
    reloads, not by an unload."""
    launcher.delay = 0.1
    supervisor = Supervisor(registry("models: {a: {source: /a}}"), launcher)
    pending = waiters(supervisor, "a", count=4)
    await asyncio.sleep(0.03)
    supervisor.apply(registry("models: {a: {source: /a, threads: 1}}"))
    # At once, before the waiters have seen the first reload:
    report = supervisor.apply(registry("models: {a: {source: /a, system_prompt: Hi.}}"))
    assert report.retuned == []  # against B, the threads went back: a restart
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert results == [None] * 5
    assert supervisor.get("a").state == "ready" and launcher.alive() == ["a"]


# -- a reload keeps track of admitted requests -----------------------------------------------


LIMITED = "models: {a: {source: /a, limits: {max_concurrency: 1, max_queue: %d}}}"


async def test_a_drain_after_a_reload_that_changed_limits_waits_for_earlier_requests(
    launcher: FakeLauncher,
) -> None:
    supervisor = Supervisor(registry(LIMITED % 4), launcher)
    holder, release = await hold(supervisor, "a")
    supervisor.apply(registry(LIMITED % 5))
    drained = asyncio.create_task(supervisor.drain(5.0))
    await asyncio.sleep(0.05)
    assert not drained.done()  # the request admitted before the reload still runs
    release.set()
    await holder
    assert await drained is True


async def test_a_reload_that_changed_limits_does_not_admit_past_the_concurrency_limit(
    launcher: FakeLauncher,
) -> None:
    supervisor = Supervisor(registry(LIMITED % 0), launcher)
    holder, release = await hold(supervisor, "a")
    with pytest.raises(RateLimited):  # max_queue 0: refused at once
        await use(supervisor, "a")
    supervisor.apply(registry(LIMITED % 3))
    queued = asyncio.create_task(use(supervisor, "a"))
    await asyncio.sleep(0.01)
    runtime = supervisor.get("a")
    assert (runtime.admission.running, runtime.admission.waiting) == (1, 1)  # new max_queue
    release.set()
    await asyncio.gather(holder, queued)
    assert runtime.admission.running == 0


# -- background work is kept and awaited -----------------------------------------------------


async def test_shutdown_leaves_no_background_task_running(launcher: FakeLauncher) -> None:
    text = "models: {a: {source: /a}, b: {source: /b}, c: {source: /c}, d: {source: /d}}"
    supervisor = Supervisor(registry(text), launcher)
    for name in "abcd":
        await use(supervisor, name)
    launcher.backends["a"].stop_delay = 0.2
    launcher.backends["a"].crash()  # its exit stops what is left of it
    await use(supervisor, "b", keep_alive=0)  # unloaded right after the request
    supervisor.apply(registry("models: {a: {source: /a}, b: {source: /b}, c: {source: /c2}}"))
    await asyncio.sleep(0)
    await supervisor.shutdown()
    assert others_pending() == []
    assert all(b.stopped and b.exited.done() for b in launcher.backends.values())


async def test_a_request_queued_for_a_removed_model_gets_404_and_starts_no_worker(
    launcher: FakeLauncher,
) -> None:
    text = "models: {a: {source: /a, limits: {max_concurrency: 1}}, b: {source: /b}}"
    supervisor = Supervisor(registry(text), launcher)
    holder, release = await hold(supervisor, "a")
    queued = asyncio.create_task(use(supervisor, "a"))  # waits for the holder's slot
    await asyncio.sleep(0.01)
    supervisor.apply(registry("models: {b: {source: /b}}"))
    release.set()
    await holder
    with pytest.raises(ModelNotFound):
        await queued
    await asyncio.sleep(0.01)
    assert launcher.launches == ["a"] and launcher.alive() == []


async def test_a_load_whose_waiter_gave_up_is_not_reaped_as_idle_since_boot(
    launcher: FakeLauncher, clock: Clock
) -> None:
    launcher.delay = 0.2
    text = "gateway: {idle_unload_s: 60, load_timeout_s: 0.05}\nmodels: {a: {source: /a}}"
    supervisor = Supervisor(registry(text), launcher, clock=clock)
    with supervisor.events.subscribe() as queue:
        with pytest.raises(ModelUnavailable, match="still loading"):
            await use(supervisor, "a")
        while (await queue.get()).get("state") != "ready":  # it loads on without its waiter
            pass
    await supervisor.reap_idle()
    assert launcher.alive() == ["a"]
