"""Benchmark 2b, what the defaults do: the gateway on its defaults and on the defaults it had
before (a fixed batch of 8, torch's own thread count: every core), side by side.
`python -m bench.defaults [--seconds 9]`

Same clients as benchmark 2 (closed loop, 32 new tokens per request); the two gateways take
turns window by window, so a noisy neighbour slows both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

import httpx

from bench import clients
from bench.common import MODEL_NAME, gateway_server, model_path, serving
from bench.concurrency import Point, Slice, measure, merge
from bench.report import Section, finish
from gateway.backends.threads import available_cores

LEVELS = (1, 16)
DEFAULTS = "gateway on its defaults"
PREVIOUS = "previous defaults (max_batch_size: 8, threads: every core)"


def settings() -> dict[str, str]:
    return {
        DEFAULTS: "",
        PREVIOUS: f"batching: {{max_batch_size: 8}}\nthreads: {available_cores()}",
    }


def run(seconds: float = 9.0, windows: int = 3) -> Section:
    model = model_path()
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(serving(gateway_server(model, extra))).url
            for name, extra in settings().items()
        }
        targets = {n: clients.Target(n, url, "openai", MODEL_NAME) for n, url in urls.items()}
        points: dict[str, dict[int, Point]] = {name: {} for name in targets}
        for level in LEVELS:
            slices: dict[str, list[Slice]] = {name: [] for name in targets}
            names = list(targets)
            for turn in range(windows):
                for name in names[turn % 2 :] + names[: turn % 2]:
                    slices[name].append(
                        asyncio.run(measure(targets[name], level, seconds / windows))
                    )
            for name in names:
                points[name][level] = merge(slices[name])
                print(f"  {name:60s} {level:3d} clients: {points[name][level]}", flush=True)
        chosen = {name: _runtime(url) for name, url in urls.items()}
    return _section(points, chosen, seconds)


def _runtime(url: str) -> dict[str, Any]:
    card = httpx.get(f"{url}/v1/models/{MODEL_NAME}", timeout=10).json()
    runtime: dict[str, Any] = card.get("runtime") or {}
    return runtime


def _section(
    points: dict[str, dict[int, Point]], chosen: dict[str, dict[str, Any]], seconds: float
) -> Section:
    before = points[PREVIOUS]
    rows = []
    for name, by_level in points.items():
        runtime = chosen[name]
        row = [name, str(runtime.get("max_batch_size")), str(runtime.get("threads"))]
        row += [f"{by_level[level].tokens_per_s:.0f}" for level in LEVELS]
        previous = before[16].tokens_per_s
        ratio = by_level[16].tokens_per_s / previous if previous else None
        row += ["n/a: no request ended in a window" if ratio is None else f"{ratio:.2f}x"]
        rows.append(row)
    return Section(
        key="defaults",
        title="2b. What the defaults do: the gateway on its defaults and on its previous ones",
        command=f"python -m bench.defaults --seconds {seconds:g}",
        columns=[
            "gateway",
            "max_batch_size (as /v1/models shows it)",
            "threads",
            *(f"{level} client{'s' if level > 1 else ''} tok/s" for level in LEVELS),
            "16 clients vs previous defaults",
        ],
        rows=rows,
        notes=[
            f"Each point: {seconds:g} s in windows taken in turn, after a 1 s warm-up each; "
            "closed loop, 32 new tokens per request. The previous defaults are written out "
            "as settings (`batching: {max_batch_size: 8}`, `threads:` the machine's cores, "
            "which is what torch takes when nothing sets it)."
        ],
        data={
            "servers": {
                name: {str(level): vars(p) for level, p in by_level.items()}
                for name, by_level in points.items()
            },
            "runtime": chosen,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=9.0)
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()
    finish(run(args.seconds, args.windows))


if __name__ == "__main__":
    main()
