"""Closed-loop load from a separate process, so the process that measures something else
(a probe's latency) does not share its event loop or its GIL with the load.

    python -m bench.load URL KIND [--model M] [--clients N] [--seconds S] [--tokens T] [--stream]

Prints one JSON line: requests finished, errors, tokens or text chunks received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import httpx

from bench import clients
from bench.common import ROOT, bench_env


async def generate_load(
    target: clients.Target, concurrency: int, seconds: float, tokens: int, stream: bool
) -> dict[str, Any]:
    end = time.perf_counter() + seconds
    summary = {"requests": 0, "errors": 0, "received": 0}
    async with clients.client(connections=concurrency + 4) as http:

        async def loop() -> None:
            while time.perf_counter() < end:
                try:
                    if stream:
                        received = await clients.stream_all(http, target, tokens)
                    else:
                        received = await clients.complete(http, target, tokens)
                except httpx.HTTPError:
                    summary["errors"] += 1
                    continue
                summary["requests"] += 1
                summary["received"] += received

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return summary


def start(
    target: clients.Target,
    concurrency: int,
    seconds: float,
    tokens: int,
    stream: bool = False,
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "bench.load", target.url, target.kind, "--model", target.model]
    argv += ["--clients", str(concurrency), "--seconds", str(seconds), "--tokens", str(tokens)]
    argv += ["--stream"] if stream else []
    return subprocess.Popen(argv, cwd=ROOT, env=bench_env(), stdout=subprocess.PIPE, text=True)


def result(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = process.communicate(timeout=timeout)
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("kind", choices=["openai", "seed"])
    parser.add_argument("--model", default="")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    target = clients.Target("load", args.url, args.kind, args.model)
    summary = asyncio.run(
        generate_load(target, args.clients, args.seconds, args.tokens, args.stream)
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
