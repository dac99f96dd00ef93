"""Benchmark 4, `/health` latency while the server is saturated. `python -m bench.health`

A separate process keeps 32 clients busy (64-token requests, back to back); meanwhile this
process probes the health route every 10 ms over one keep-alive connection and records
each answer's latency. The same with the server idle gives the floor. The seed-style server
has no health route: its probe is GET /docs, which needs only its event loop, exactly like
a health route would.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import httpx

from bench import clients, load
from bench.common import MODEL_NAME, gateway_server, hf_server, model_path, seed_server, serving
from bench.report import Goal, Section, finish, median, ms, percentile

CLIENTS = 32
TOKENS = 64
TARGET_P99_S = 0.020


def probe(url: str, seconds: float) -> list[float]:
    with httpx.Client(timeout=120.0) as http:
        http.get(url).raise_for_status()  # open the connection before timing
        return probe_with(http, url, seconds)


def probe_with(http: httpx.Client, url: str, seconds: float, interval: float = 0.01) -> list[float]:
    """Probe every `interval` for `seconds`; a probe that blocks is one (long) sample."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        http.get(url).raise_for_status()
        latencies.append(time.perf_counter() - started)
        time.sleep(max(0.0, interval - (time.perf_counter() - started)))
    return latencies


def under_load(
    target: clients.Target, path: str, seconds: float, stream: bool = False
) -> tuple[list[float], dict[str, int]]:
    """Probe while the load runs: the load starts 2 s before the probes and is planned to
    last 5 s beyond them, so that no probe ever finds the server idle."""
    with httpx.Client(timeout=120.0) as http:
        http.get(target.url + path).raise_for_status()  # connected before the load starts
        loader = load.start(target, CLIENTS, seconds + 7, TOKENS, stream)
        time.sleep(2)
        latencies = probe_with(http, target.url + path, seconds)
    return latencies, load.result(loader, timeout=seconds + 180)


def run(seconds: float = 8.0) -> Section:
    model = model_path()
    rows: list[list[str]] = []
    data: dict[str, dict[str, float]] = {}
    gateway_p99 = float("inf")
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(serving(gateway_server(model)))
        hf = stack.enter_context(serving(hf_server()))
        seed = stack.enter_context(serving(seed_server(model)))
        cases = [
            ("gateway", clients.Target("gw", gateway.url, "openai", MODEL_NAME), "/health", False),
            (
                "gateway, streamed load",
                clients.Target("gw", gateway.url, "openai", MODEL_NAME),
                "/health",
                True,
            ),
            (
                "transformers serve",
                clients.Target("hf", hf.url, "openai", str(model)),
                "/health",
                False,
            ),
            ("seed-style server", clients.Target("seed", seed.url, "seed"), "/docs", False),
        ]
        for label, target, path, stream in cases:
            clients_sync_warm(target)
            idle = probe(target.url + path, 2.0)
            busy, summary = under_load(target, path, seconds, stream)
            p99 = percentile(busy, 99)
            if label == "gateway":
                gateway_p99 = p99
            data[label] = {"p50": median(busy), "p99": p99, "max": max(busy), "probes": len(busy)}
            rows.append(
                [
                    f"{label} (GET {path})",
                    ms(median(idle)),
                    ms(median(busy)),
                    ms(p99),
                    ms(max(busy)),
                    str(len(busy)),
                    f"{summary['requests']} ({summary['errors']} errors)",
                ]
            )
            print("  ", rows[-1], flush=True)
    return Section(
        key="health",
        title=f"4. Health latency while saturated ({CLIENTS} clients, {TOKENS}-token requests)",
        command=f"python -m bench.health --seconds {seconds:g}",
        columns=[
            "server (probe)",
            "idle p50",
            "saturated p50",
            "saturated p99",
            "max",
            "probes",
            "load requests done",
        ],
        rows=rows,
        goals=[
            Goal(
                f"gateway p99 under {TARGET_P99_S * 1000:g} ms",
                ms(gateway_p99),
                gateway_p99 < TARGET_P99_S,
            )
        ],
        notes=[
            f"Probes every 10 ms for {seconds:g} s from this process, over one keep-alive "
            "connection opened before the load; the load runs in another process, from 2 s "
            "before the first probe to 5 s after the last. A probe that waits delays the "
            "next, so a server that blocks gets few (long) samples.",
        ],
        data=data,
    )


def clients_sync_warm(target: clients.Target) -> None:
    """One request first, so a lazy load is not part of the measurement."""
    path, body = target.request(4)
    httpx.post(target.url + path, json=body, timeout=120).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    finish(run(parser.parse_args().seconds))


if __name__ == "__main__":
    main()
