"""Load test with faults: mixed traffic over several models while workers are being killed.

    python -m bench.chaos [--seconds 180] [--clients 12] [--kill-every 6]

Three models share a memory budget that fits two (so loads evict each other), one has a
small queue (so some requests are refused with 429), one unloads when idle (so it reloads
under traffic). Clients send seed, chat, streamed chat and completion requests in a closed
loop; a killer SIGKILLs a random worker every few seconds. Every request must end in an
answer: a reply, a refusal (429/503), or an error (502 when its worker was killed under it,
an error event in a stream). A request with no answer at all is *lost*; there must be none.
Exits 1 if any request was lost. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.common import WORK, Server, free_port, model_path, serving

MODELS = ("alpha", "beta", "gamma")


def chaos_server(model: Path) -> Server:
    weights = (model / "model.safetensors").stat().st_size
    port = free_port()
    WORK.mkdir(parents=True, exist_ok=True)
    config = WORK / f"chaos-{port}.yaml"
    config.write_text(
        f"""
gateway:
  default_model: alpha
  memory_budget: {{cpu: {int(weights * 2.5)}}}   # two of the three fit
  probe_interval_s: 1
  load_timeout_s: 60
models:
  alpha: {{source: {model}, batching: {{max_batch_size: 16}}}}
  beta: {{source: {model}, idle_unload_s: 5}}
  gamma: {{source: {model}, limits: {{max_concurrency: 2, max_queue: 2}}}}
"""
    )
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
    return Server("chaos-gateway", argv, port, "/health")


def request_for(rng: random.Random) -> tuple[str, dict[str, Any], bool]:
    model = rng.choice(MODELS)
    tokens = rng.randint(4, 48)
    kind = rng.choice(("seed", "chat", "chat-stream", "completion"))
    if kind == "seed":
        return f"/{model}", {"prompt": "hello", "max_length": tokens}, False
    if kind == "completion":
        return "/v1/completions", {"model": model, "prompt": "Once", "max_tokens": tokens}, False
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    stream = kind == "chat-stream"
    return "/v1/chat/completions", {**body, "stream": stream}, stream


async def one_request(http: httpx.AsyncClient, rng: random.Random) -> tuple[str, float]:
    path, body, stream = request_for(rng)
    started = time.perf_counter()
    try:
        if not stream:
            reply = await http.post(path, json=body)
            outcome = classify(reply.status_code, reply.content)
        else:
            async with http.stream("POST", path, json=body) as reply:
                if reply.status_code != 200:
                    outcome = classify(reply.status_code, await reply.aread())
                else:
                    outcome = await classify_stream(reply)
    except httpx.HTTPError as exc:
        outcome = f"lost ({type(exc).__name__})"
    return outcome, time.perf_counter() - started


def classify(status: int, content: bytes) -> str:
    if status == 200:
        return "succeeded"
    try:
        error = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return f"lost (HTTP {status} without the error envelope)"
    return f"HTTP {status} {error.get('code')}"


async def classify_stream(reply: httpx.Response) -> str:
    events = [line[6:] async for line in reply.aiter_lines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "lost (stream ended without [DONE])"
    errors = [e for e in events[:-1] if '"error"' in e]
    if errors:
        return f"stream error event {json.loads(errors[0])['error'].get('code')}"
    return "succeeded"


def gateway_workers(gateway_pid: int) -> list[int]:
    marker = f"LLMGW_PARENT_PID={gateway_pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def killer(gateway_pid: int, every: float, end: float, rng: random.Random) -> int:
    kills = 0
    while time.perf_counter() + every < end:
        await asyncio.sleep(every)
        workers = gateway_workers(gateway_pid)
        if workers:
            try:
                os.kill(rng.choice(workers), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    return kills


async def run(server: Server, seconds: float, clients: int, kill_every: float) -> dict[str, Any]:
    assert server.process is not None
    rng = random.Random(1234)
    end = time.perf_counter() + seconds
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients + 4)
    timeout = httpx.Timeout(180.0)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as http:

        async def client(seed: int) -> None:
            local = random.Random(seed)
            while time.perf_counter() < end:
                outcome, seconds_taken = await one_request(http, local)
                outcomes[outcome] += 1
                if outcome == "succeeded":
                    latencies.append(seconds_taken)

        kills = asyncio.create_task(killer(server.process.pid, kill_every, end, rng))
        await asyncio.gather(*(client(seed) for seed in range(clients)))
        healthy = (await http.get("/health")).status_code == 200
    return {"outcomes": outcomes, "latencies": latencies, "kills": await kills, "healthy": healthy}


def report(result: dict[str, Any], seconds: float, clients: int, kill_every: float) -> str:
    outcomes: Counter[str] = result["outcomes"]
    sent = sum(outcomes.values())
    lost = sum(n for k, n in outcomes.items() if k.startswith("lost"))
    latencies = sorted(result["latencies"])
    rows = [("requests sent", sent), ("workers killed", result["kills"])]
    rows += sorted(outcomes.items(), key=lambda kv: (-kv[1], kv[0]))
    rows += [("lost (must be 0)", lost)]
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        rows += [("success p50 / p99 (s)", f"{statistics.median(latencies):.2f} / {p99:.2f}")]
    rows += [("gateway healthy afterwards", result["healthy"])]
    width = max(len(str(k)) for k, _ in rows)
    head = f"chaos: {seconds:g}s, {clients} clients, a worker killed every {kill_every:g}s"
    return "\n".join([head, *(f"  {str(k).ljust(width)}  {v}" for k, v in rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--kill-every", type=float, default=6.0)
    args = parser.parse_args()
    with serving(chaos_server(model_path())) as server:
        result = asyncio.run(run(server, args.seconds, args.clients, args.kill_every))
    print(report(result, args.seconds, args.clients, args.kill_every))
    lost = sum(n for k, n in result["outcomes"].items() if k.startswith("lost"))
    return 1 if lost or not result["healthy"] else 0


if __name__ == "__main__":
    sys.exit(main())
