"""Benchmark 1, overhead: warm 16-token requests, one at a time, through each server vs
`generate` called directly in this process. `python -m bench.overhead [--rounds N]`

Rounds interleave the contenders (in a rotating order), so a noisy neighbour on a shared
machine slows all of them alike; medians of the rounds are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import httpx

from bench import clients
from bench.common import (
    LARGE_SHAPE,
    MODEL_NAME,
    PER_GENERATE,
    gateway_server,
    hf_server,
    model_path,
    seed_server,
    serving,
    worker_socket,
)
from bench.direct import Direct
from bench.report import Goal, Section, finish, median, ms, percentile

TOKENS = 16
TARGET = 1.15


async def _measure(
    contenders: dict[str, Callable[[], Awaitable[int]]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, set[int]]]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    tokens: dict[str, set[int]] = {name: set() for name in contenders}
    names = list(contenders)
    for name in names:  # warm each: lazy loads, caches, connections
        for _ in range(3):
            await contenders[name]()
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            started = time.perf_counter()
            tokens[name].add(await contenders[name]())
            times[name].append(time.perf_counter() - started)
    return times, tokens


def run(rounds: int = 40, large: bool = False) -> Section:
    model = model_path(LARGE_SHAPE if large else None)
    direct = Direct(model)
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(serving(gateway_server(model)))
        per_generate = stack.enter_context(serving(gateway_server(model, PER_GENERATE)))
        hf = stack.enter_context(serving(hf_server()))
        seed = stack.enter_context(serving(seed_server(model)))
        targets = {
            "gateway (/v1/chat/completions)": clients.Target(
                "gateway", gateway.url, "openai", MODEL_NAME
            ),
            "gateway (seed route POST /)": clients.Target("gateway-seed", gateway.url, "seed"),
            "gateway, batching per generate call": clients.Target(
                "gateway-per-generate", per_generate.url, "openai", MODEL_NAME
            ),
            "transformers serve": clients.Target("hf", hf.url, "openai", str(model)),
            "seed-style server": clients.Target("seed", seed.url, "seed"),
        }

        async def main() -> tuple[dict[str, list[float]], dict[str, set[int]]]:
            # The worker's own socket, skipping the gateway: splits the overhead in two.
            path, body = targets["gateway (/v1/chat/completions)"].request(TOKENS)
            await asyncio.to_thread(httpx.post, gateway.url + path, json=body, timeout=120)
            uds = httpx.AsyncHTTPTransport(uds=worker_socket(gateway.url, MODEL_NAME))
            async with clients.client() as http, httpx.AsyncClient(transport=uds) as worker:

                async def run_direct() -> int:
                    return direct.complete(TOKENS)

                contenders: dict[str, Callable[[], Awaitable[int]]] = {
                    "direct generate": run_direct
                }
                for label, target in targets.items():
                    contenders[label] = _bind(http, target)
                contenders["worker alone (its socket, no gateway)"] = _bind(
                    worker, clients.Target("worker", "http://worker", "openai", MODEL_NAME)
                )

                async def http_floor() -> int:  # one loopback round trip, no model at all
                    (await http.get(gateway.url + "/health")).raise_for_status()
                    return 0

                contenders["HTTP floor: GET /health on the gateway"] = http_floor
                return await _measure(contenders, rounds)

        times, tokens = asyncio.run(main())
    base = median(times["direct generate"])
    rows = [
        [
            name,
            ms(median(values)),
            ms(percentile(values, 90)),
            f"{median(values) / base:.2f}x",
            ",".join(map(str, sorted(tokens[name]))),
        ]
        for name, values in times.items()
    ]
    ratio = median(times["gateway (/v1/chat/completions)"]) / base
    like_for_like = median(times["gateway, batching per generate call"]) / base
    if large:
        shape = LARGE_SHAPE
        return Section(
            key="overhead-large",
            title=f"1b. Overhead on a model that computes longer (hidden {shape['hidden']}, "
            f"{shape['layers']} layers, 19 M parameters)",
            command=f"python -m bench.overhead --rounds {rounds} --large",
            columns=["path", "median", "p90", "vs direct", "new tokens"],
            rows=rows,
            notes=[
                "Not one of the targets (they are all on the bench model above); it "
                "shows that the gateway's cost is a few milliseconds per request, not a "
                "share of the work."
            ],
            data={"times": times},
        )
    return Section(
        key="overhead",
        title="1. Overhead: warm 16-token requests, one at a time",
        command=f"python -m bench.overhead --rounds {rounds}",
        columns=["path", "median", "p90", "vs direct", "new tokens"],
        rows=rows,
        goals=[
            Goal(f"gateway at most {TARGET}x direct", f"{ratio:.2f}x", ratio <= TARGET),
            Goal(
                f"like for like, the gateway calling `generate` at most {TARGET}x direct",
                f"{like_for_like:.2f}x",
                like_for_like <= TARGET,
            ),
        ],
        notes=[
            f"{rounds} interleaved rounds after 3 warm-up requests each; greedy decoding.",
            "The gateway runs on its defaults, so it decodes in its own loop (continuous "
            'batching), which costs less per token than `generate`. The row "gateway, '
            'batching per generate call" (`batching: {continuous: false}`) calls `generate` '
            "as the direct baseline does: it is the serving cost over `generate`, like for "
            "like.",
        ],
        data={"times": times},
    )


def _bind(http: httpx.AsyncClient, target: clients.Target) -> Callable[[], Awaitable[int]]:
    async def call() -> int:
        return await clients.complete(http, target, TOKENS)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--large", action="store_true", help="the 8x larger model (1b)")
    args = parser.parse_args()
    finish(run(args.rounds, args.large))


if __name__ == "__main__":
    main()
