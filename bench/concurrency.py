"""Benchmark 2, concurrency: N clients, each sending 32-token requests back to back, against
the gateway, the seed-style server and `transformers serve`. `python -m bench.concurrency`

Throughput is the tokens of requests that finished inside the measuring window, divided by
the window; the first second of each run is a warm-up and does not count. The three servers
run side by side in one run, one at a time per level, in a rotating order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import httpx

from bench import clients
from bench.common import MODEL_NAME, gateway_server, hf_server, model_path, seed_server, serving
from bench.direct import Direct
from bench.report import Goal, Section, finish, median

TOKENS = 32
LEVELS = (1, 4, 16, 32)
WARMUP_S = 1.0
# The gateway's lead at 16 clients, on its defaults, over each peer.
GOALS = {"seed-style server": 4.0, "transformers serve": 3.0}
CB = "transformers serve --continuous-batching"  # not a target: the peer's own batching
RATIOS = [*GOALS, CB]


@dataclass
class Point:
    tokens_per_s: float
    requests: int
    errors: int
    p50_latency_s: float


@dataclass
class Slice:
    """One measuring window of one server at one level."""

    seconds: float
    tokens: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    @staticmethod
    def together(parts: list[Slice]) -> Slice:
        """Windows measured at the same time (several targets loaded at once) as one:
        their tokens add up over the same seconds."""
        return Slice(
            max((p.seconds for p in parts), default=0.0),
            sum(p.tokens for p in parts),
            sum(p.errors for p in parts),
            [x for p in parts for x in p.latencies],
        )


async def measure(target: clients.Target, concurrency: int, seconds: float) -> Slice:
    async with clients.client(connections=concurrency + 4, timeout=120.0) as http:
        await clients.complete(http, target, TOKENS)  # warm: loads, connections
        start = time.perf_counter()
        counted_from = start + WARMUP_S
        end = counted_from + seconds
        window = Slice(seconds)

        async def client_loop() -> None:
            while time.perf_counter() < end:
                sent = time.perf_counter()
                try:
                    tokens = await clients.complete(http, target, TOKENS)
                except httpx.HTTPError:
                    window.errors += 1
                    continue
                now = time.perf_counter()
                if counted_from <= now <= end:
                    window.tokens += tokens
                    window.latencies.append(now - sent)

        # Requests still running at the end are awaited (bounded) but not counted.
        await asyncio.wait_for(
            asyncio.gather(*(client_loop() for _ in range(concurrency))), seconds + 120
        )
    return window


def merge(slices: list[Slice]) -> Point:
    latencies = [x for s in slices for x in s.latencies]
    return Point(
        tokens_per_s=sum(s.tokens for s in slices) / sum(s.seconds for s in slices),
        requests=len(latencies),
        errors=sum(s.errors for s in slices),
        p50_latency_s=median(latencies) if latencies else float("nan"),
    )


def run(seconds: float = 9.0, levels: tuple[int, ...] = LEVELS, slices: int = 3) -> Section:
    """Each point is `slices` windows of seconds/slices, the servers taking turns, so a
    noisy minute on the shared machine lands on all of them rather than on one."""
    model = model_path()
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(serving(gateway_server(model)))
        hf = stack.enter_context(serving(hf_server()))
        hf_cb = stack.enter_context(serving(hf_server(continuous_batching=True)))
        seed = stack.enter_context(serving(seed_server(model)))
        targets = {
            "gateway": clients.Target("gateway", gateway.url, "openai", MODEL_NAME),
            "seed-style server": clients.Target("seed", seed.url, "seed"),
            "transformers serve": clients.Target("hf", hf.url, "openai", str(model)),
            CB: clients.Target("hf-cb", hf_cb.url, "openai", str(model)),
        }
        names = list(targets)
        points: dict[str, dict[int, Point]] = {name: {} for name in names}
        for level in levels:
            windows: dict[str, list[Slice]] = {name: [] for name in names}
            for turn in range(slices):
                for name in names[turn % len(names) :] + names[: turn % len(names)]:
                    windows[name].append(
                        asyncio.run(measure(targets[name], level, seconds / slices))
                    )
            for name in names:
                points[name][level] = merge(windows[name])
                print(f"  {name:38s} {level:3d} clients: {points[name][level]}", flush=True)
    # The servers are stopped: the ceiling is measured on a quiet machine (of this run).
    direct = Direct(model)
    ceiling = {level: direct.batch_rate(level, TOKENS) for level in levels}
    return _section(points, levels, seconds, ceiling)


def _section(
    points: dict[str, dict[int, Point]],
    levels: tuple[int, ...],
    seconds: float,
    ceiling: dict[int, float],
) -> Section:
    rows = []
    for level in levels:
        gw = points["gateway"][level].tokens_per_s
        row = [str(level), f"{ceiling[level]:.0f}"]
        for name in points:
            point = points[name][level]
            errors = f", {point.errors} errors" if point.errors else ""
            row.append(f"{point.tokens_per_s:.0f} ({point.p50_latency_s * 1000:.0f} ms{errors})")
        row += [f"{gw / max(points[n][level].tokens_per_s, 1e-9):.2f}x" for n in RATIOS]
        rows.append(row)
    goals = []
    if 16 in levels:
        for name, want in GOALS.items():
            ratio = points["gateway"][16].tokens_per_s / max(points[name][16].tokens_per_s, 1e-9)
            goals.append(
                Goal(f"at 16 clients, at least {want:g}x {name}", f"{ratio:.2f}x", ratio >= want)
            )
    return Section(
        key="concurrency",
        title="2. Concurrency: total tokens/s, 32 new tokens per request",
        command=f"python -m bench.concurrency --seconds {seconds:g}",
        columns=[
            "clients",
            "ceiling: one in-process generate of that many rows, tok/s",
            *(f"{n} tok/s (p50 latency)" for n in points),
            *(f"gateway / {n}" for n in RATIOS),
        ],
        rows=rows,
        goals=goals,
        notes=[
            f"Each point: {seconds:g} s measured in 3 windows, the servers taking turns, each "
            f"window after a {WARMUP_S:g} s warm-up; closed loop (a client sends its next "
            "request when the last one is answered); p50 latency in brackets.",
            f"{CB} is `transformers serve` with its documented option for many concurrent "
            "requests; the targets are set against its default (one request at a time), so "
            "the gateway's lead over this row is shown without one.",
            "The ceiling is `generate` on a batch of N identical prompts, 32 tokens each, in "
            "the benchmark's own process after the servers stopped (best of 3): no server "
            "can beat it, and a server that batches N requests perfectly would reach it.",
        ],
        data={
            "servers": {
                name: {str(level): vars(p) for level, p in by_level.items()}
                for name, by_level in points.items()
            },
            "ceiling": {str(level): rate for level, rate in ceiling.items()},
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=9.0)
    parser.add_argument("--levels", type=int, nargs="*", default=list(LEVELS))
    args = parser.parse_args()
    finish(run(args.seconds, tuple(args.levels)))


if __name__ == "__main__":
    main()
