"""Benchmark 5, cold start: from launching a server to its answering, and the first
request's latency including the model's (lazy) load. `python -m bench.coldstart`

Each server is started afresh `--repeats` times, in turns. The gateway and `transformers
serve` load models lazily, on the first request; the seed-style server loads before it
serves, so its load is in its start-up time and its first request is warm.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import httpx

from bench import clients
from bench.common import MODEL_NAME, Server, gateway_server, hf_server, model_path, seed_server
from bench.report import Section, finish, median

TOKENS = 16


def once(
    make: Callable[[], Server], target: Callable[[Server], clients.Target]
) -> tuple[float, float]:
    server = make()
    server.start()
    try:
        ready = server.wait_ready(timeout=180)
        path, body = target(server).request(TOKENS)
        started = time.perf_counter()
        httpx.post(server.url + path, json=body, timeout=180).raise_for_status()
        return ready, time.perf_counter() - started
    finally:
        server.stop()


def run(repeats: int = 3) -> Section:
    model = model_path()
    contenders: dict[str, tuple[Callable[[], Server], Callable[[Server], clients.Target]]] = {
        "gateway": (
            lambda: gateway_server(model),
            lambda s: clients.Target("gw", s.url, "openai", MODEL_NAME),
        ),
        "transformers serve": (
            hf_server,
            lambda s: clients.Target("hf", s.url, "openai", str(model)),
        ),
        "seed-style server": (
            lambda: seed_server(model),
            lambda s: clients.Target("seed", s.url, "seed"),
        ),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (make, target) in contenders.items():
            results[name].append(once(make, target))
            print(
                f"  {name}: ready {results[name][-1][0]:.2f} s, first {results[name][-1][1]:.2f} s"
            )
    rows = []
    for name, values in results.items():
        ready = median([v[0] for v in values])
        first = median([v[1] for v in values])
        total = median([v[0] + v[1] for v in values])
        rows.append([name, f"{ready:.2f} s", f"{first:.2f} s", f"{total:.2f} s"])
    gw_total = median([sum(v) for v in results["gateway"]])
    hf_total = median([sum(v) for v in results["transformers serve"]])
    return Section(
        key="coldstart",
        title="5. Cold start: launch to ready, and the first request (includes the lazy load)",
        command=f"python -m bench.coldstart --repeats {repeats}",
        columns=[
            "server",
            "launch to ready",
            f"first {TOKENS}-token request",
            "launch to first reply",
        ],
        rows=rows,
        notes=[
            f"Medians of {repeats} fresh starts each. Launch to first reply: gateway "
            f"{gw_total / hf_total:.2f}x transformers serve.",
            "Ready means the health route answers 200 (the gateway and transformers serve) or "
            "any HTTP answer (the seed-style server, which has no health route and loads first).",
        ],
        data={name: [list(v) for v in values] for name, values in results.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    finish(run(parser.parse_args().repeats))


if __name__ == "__main__":
    main()
