"""GET /metrics through the real gateway, real workers and a tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import Gateway, Samples, scrape, value, wait_until, write_config


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = write_config(
        tmp_path_factory.mktemp("metrics"),
        f"""
        gateway:
          default_model: tiny
        models:
          tiny:
            source: {tiny_model}
            limits: {{max_new_tokens: 512}}
          batchy:
            source: {tiny_model}
            batching: {{max_batch_size: 8, batch_wait_ms: 300}}
          narrow:
            source: {tiny_model}
            limits: {{max_concurrency: 1, max_new_tokens: 512}}
        """,
    )
    with Gateway(config) as gw:
        yield gw


def seed(gateway: Gateway, path: str, tokens: int = 4) -> httpx.Response:
    return gateway.post(path, {"prompt": "hello", "max_length": tokens})


def test_requests_are_counted_by_model_route_and_status(gateway: Gateway) -> None:
    seed(gateway, "/tiny")  # load first, so the counts below are only ours
    before = scrape(gateway)
    assert seed(gateway, "/tiny").status_code == 200
    assert seed(gateway, "/tiny").status_code == 200
    assert seed(gateway, "/").status_code == 200
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert gateway.post("/v1/chat/completions", chat).status_code == 200
    too_many = {**chat, "max_tokens": 100_000}
    assert gateway.post("/v1/chat/completions", too_many).status_code == 400
    assert seed(gateway, "/no-such-model").status_code == 404
    after = scrape(gateway)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    total = "llmgw_requests_total"
    assert delta(total, model="tiny", route="/{model}", status="200") == 2
    assert delta(total, model="tiny", route="/", status="200") == 1
    assert delta(total, model="tiny", route="/v1/chat/completions", status="200") == 1
    assert delta(total, model="tiny", route="/v1/chat/completions", status="400") == 1
    # An unknown name is not a registry model, so it never becomes a label value.
    assert delta(total, model="", route="/{model}", status="404") == 1
    assert not any(("model", "no-such-model") in labels for _, labels in after)
    count = "llmgw_request_duration_seconds_count"
    assert delta(count, model="tiny", route="/{model}") == 2
    assert delta("llmgw_request_duration_seconds_sum", model="tiny", route="/{model}") > 0


def test_model_state_and_load_time_follow_the_lifecycle(gateway: Gateway) -> None:
    before = scrape(gateway)
    assert value(before, "llmgw_model_state", model="batchy", state="unloaded") == 1
    assert value(before, "llmgw_model_state", model="batchy", state="ready") == 0
    assert ("llmgw_model_load_seconds", frozenset({("model", "batchy")})) not in before
    assert seed(gateway, "/batchy").status_code == 200
    after = scrape(gateway)
    assert value(after, "llmgw_model_state", model="batchy", state="ready") == 1
    assert value(after, "llmgw_model_state", model="batchy", state="unloaded") == 0
    assert value(after, "llmgw_model_load_seconds", model="batchy") > 0
    ready = sum(c["state"] == "ready" for c in gateway.models().values())
    assert value(after, "llmgw_models_loaded") == ready >= 1
    assert value(after, "llmgw_worker_stats_up", model="batchy") == 1


def test_concurrent_requests_are_observed_as_batches_larger_than_one(gateway: Gateway) -> None:
    seed(gateway, "/batchy")
    before = scrape(gateway)
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: seed(gateway, "/batchy", 6), range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    after = scrape(gateway)

    def delta(name: str) -> float:
        return value(after, name, model="batchy") - value(before, name, model="batchy")

    # Continuous batching observes every decoding pass: each request is a row in at most
    # one pass per token it got (6), and in at least one.
    passes = delta("llmgw_batch_size_count")
    row_passes = delta("llmgw_batch_size_sum")
    assert 6 <= row_passes <= 6 * 6
    assert passes == delta("llmgw_batches_total")
    assert 1 <= passes < row_passes  # so at least one pass held more than one request
    bigger = delta("llmgw_batch_size_count") - (
        value(after, "llmgw_batch_size_bucket", model="batchy", le="1.0")
        - value(before, "llmgw_batch_size_bucket", model="batchy", le="1.0")
    )
    assert bigger >= 1  # the same fact, as a dashboard reads it from the buckets


def test_tokens_and_time_to_first_token_are_observed_per_request(gateway: Gateway) -> None:
    seed(gateway, "/tiny")
    before = scrape(gateway)
    replies = [seed(gateway, "/tiny", 5).json(), seed(gateway, "/tiny", 7).json()]
    stream = gateway.post("/tiny", {"prompt": "hi", "max_length": 9, "stream": True})
    final = json.loads(stream.text.split("data: ")[-2])
    after = scrape(gateway)

    def delta(name: str) -> float:
        return value(after, name, model="tiny") - value(before, name, model="tiny")

    made = sum(r["usage"]["completion_tokens"] for r in [*replies, final])
    assert made > 0
    assert delta("llmgw_generated_tokens_total") == made
    assert delta("llmgw_time_to_first_token_seconds_count") == 3
    assert 0 < delta("llmgw_time_to_first_token_seconds_sum") < 30
    assert delta("llmgw_request_tokens_per_second_count") == 3
    assert delta("llmgw_generation_seconds_total") > 0
    assert delta("llmgw_prompt_tokens_total") >= 3


def test_a_client_that_leaves_a_stream_is_counted_as_cancelled(gateway: Gateway) -> None:
    seed(gateway, "/tiny")
    before = scrape(gateway)
    route = "/v1/completions"
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 500, "stream": True}
    with gateway.client.stream("POST", route, json=body) as reply:
        assert reply.status_code == 200
        events = 0
        for line in reply.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break  # leaving the block closes the connection mid-stream
    assert events == 2

    def delta(now: Samples, name: str, **labels: str) -> float:
        return value(now, name, **labels) - value(before, name, **labels)

    def settled() -> Samples | None:
        now = scrape(gateway)
        cancelled = delta(now, "llmgw_cancelled_requests_total", model="tiny")
        closed = delta(now, "llmgw_requests_total", model="tiny", route=route, status="499")
        return now if cancelled and closed else None

    assert wait_until(lambda: settled() is not None, timeout=20)
    after = settled()
    assert after is not None
    assert delta(after, "llmgw_cancelled_requests_total", model="tiny") == 1
    assert delta(after, "llmgw_tokens_after_cancel_total", model="tiny") <= 2
    finished = "llmgw_worker_requests_finished_total"
    assert delta(after, finished, model="tiny", reason="cancelled") == 1
    assert delta(after, finished, model="tiny", reason="length") == 0
    assert delta(after, "llmgw_requests_total", model="tiny", route=route, status="499") == 1
    assert delta(after, "llmgw_requests_total", model="tiny", route=route, status="200") == 0


def test_queue_depth_and_in_flight_show_requests_waiting_for_a_slot(gateway: Gateway) -> None:
    seed(gateway, "/narrow")
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(seed, gateway, "/narrow", 500) for _ in range(3)]

        def saturated() -> bool:
            now = scrape(gateway)
            return (
                value(now, "llmgw_in_flight_requests", model="narrow") == 1
                and value(now, "llmgw_queue_depth", model="narrow") == 2
            )

        assert wait_until(saturated, timeout=20)
        assert [f.result().status_code for f in busy] == [200] * 3
    idle = scrape(gateway)
    assert value(idle, "llmgw_queue_depth", model="narrow") == 0
    assert value(idle, "llmgw_in_flight_requests", model="narrow") == 0


def test_a_client_that_leaves_a_plain_request_cancels_only_its_row(gateway: Gateway) -> None:
    seed(gateway, "/tiny")
    before = scrape(gateway)
    body = {"prompt": "hello", "max_length": 500, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        # A neighbour in the same worker that must run to its own end.
        other = pool.submit(seed, gateway, "/tiny", 300)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
            httpx.post(f"{gateway.url}/tiny", json=body, timeout=httpx.Timeout(60, read=0.1))
        assert other.result().status_code == 200

    def cancelled() -> float:
        return value(scrape(gateway), "llmgw_cancelled_requests_total", model="tiny") - value(
            before, "llmgw_cancelled_requests_total", model="tiny"
        )

    assert wait_until(lambda: cancelled() == 1, timeout=20)
    after = scrape(gateway)
    late = value(after, "llmgw_tokens_after_cancel_total", model="tiny") - value(
        before, "llmgw_tokens_after_cancel_total", model="tiny"
    )
    assert late <= 2
    finished = "llmgw_worker_requests_finished_total"
    done = value(after, finished, model="tiny", reason="length") + value(
        after, finished, model="tiny", reason="stop"
    )
    done -= value(before, finished, model="tiny", reason="length") + value(
        before, finished, model="tiny", reason="stop"
    )
    assert done == 1  # the neighbour; the abandoned row never ran to its limit
