"""The benchmarks' own arithmetic: percentiles and pairing hang-ups with the worker's records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.cancel import Hangup, pair
from bench.report import percentile
from gateway.registry.config import ModelEntry
from gateway.worker.stats import TIMELINE


def test_percentiles_are_values_that_were_observed() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def record(noticed: float, tokens: int, times: list[float]) -> dict[str, Any]:
    timeline = [[t, n] for n, t in enumerate(times, start=1)][-TIMELINE:]
    return {
        "noticed_at": noticed,
        "finished_at": noticed + 0.002,
        "tokens_at_notice": tokens,
        "tokens": tokens,
        "tokens_after_cancel": 0,
        "timeline": timeline,
    }


def test_tokens_after_a_hang_up_count_only_tokens_made_after_it() -> None:
    # Tokens at t=1..5; the client left at 3.5 and the worker noticed at 5.5: 4 and 5 count.
    paired = pair([Hangup("streamed", 3.5)], [record(5.5, 5, [1, 2, 3, 4, 5])])
    assert paired[0]["after_client"] == 2
    assert paired[0]["notice_lag_s"] == 2.0


def test_each_hang_up_pairs_with_the_first_cancel_noticed_after_it() -> None:
    early = record(1.1, 3, [0.2, 0.5, 0.9])
    late = record(2.1, 1, [2.05])  # one token, after its hang-up at 2.0
    paired = pair([Hangup("streamed", 2.0), Hangup("non-streamed", 1.0)], [late, early])
    assert [(p["kind"], p["after_client"]) for p in paired] == [
        ("non-streamed", 0),
        ("streamed", 1),
    ]


def test_a_row_that_made_no_token_before_the_hang_up_counts_all_of_its_tokens() -> None:
    assert pair([Hangup("streamed", 1.0)], [record(1.5, 2, [1.1, 1.2])])[0]["after_client"] == 2


def test_a_forgotten_past_makes_the_count_unknown_not_small() -> None:
    times = [10.0 + i for i in range(40)]  # 40 tokens, all after the hang-up; 16 remembered
    assert pair([Hangup("streamed", 5.0)], [record(60.0, 40, times)])[0]["after_client"] is None


def test_the_gateway_under_benchmark_runs_on_its_defaults(tmp_path: Path) -> None:
    from bench.common import MODEL_NAME, PER_GENERATE, WORK, gateway_server
    from gateway.registry.config import ModelEntry
    from gateway.registry.load import parse_registry

    def entry(settings: str = "") -> ModelEntry:
        server = gateway_server(tmp_path, settings)
        config = WORK / f"models-{server.port}.yaml"
        try:
            return parse_registry(config.read_text()).models[MODEL_NAME]
        finally:
            config.unlink()

    assert entry() == ModelEntry(source=str(tmp_path))  # nothing but the source
    assert entry(PER_GENERATE).batching.continuous is False
    assert entry(PER_GENERATE).model_dump(exclude={"batching"}) == entry().model_dump(
        exclude={"batching"}
    )


def test_every_peer_computes_with_the_gateway_workers_thread_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import common
    from gateway.backends import threads

    monkeypatch.setenv("OMP_NUM_THREADS", "13")  # the caller's shell never leaks in
    assert "OMP_NUM_THREADS" not in common.bench_env()
    worker = threads.share(ModelEntry(source="/m"), 1, threads.available_cores())
    assert common.peer_threads() == worker
    model = Path("/m")
    for server in (
        common.seed_server(model),
        common.hf_server(),
        common.hf_server(continuous_batching=True),
    ):
        assert server.env["OMP_NUM_THREADS"] == server.env["MKL_NUM_THREADS"] == str(worker)
    assert "OMP_NUM_THREADS" not in common.gateway_server(model).env


def test_a_partial_run_never_writes_the_document(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from bench import run
    from bench.report import Section

    written: list[Path] = []
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: written.append(self))
    section = Section("ttft", "t", "c", ["a"], [["1"]])
    monkeypatch.setattr(run, "benchmarks", lambda quick: {"ttft": lambda: [section]})
    monkeypatch.setattr(sys, "argv", ["bench.run", "--only", "ttft"])
    run.main()
    assert not [p for p in written if p.name == "BENCHMARKS.md"]
