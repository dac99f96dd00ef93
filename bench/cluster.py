"""Benchmark 8, cluster: the gateway serving on a local Ray cluster (`serve --cluster ray`)
against the same gateway on one machine, same model, same box. `python -m bench.cluster`

Needs Ray Serve (the `cluster` extra, which `make bench` installs). Both gateways run
side by side on their defaults; the cluster's models differ only in `replicas:`.

- The extra hops: a 16-token request at 1 client (median, p90), requests interleaved one
  by one between the two gateways, 1 replica on the cluster.
- Throughput: tok/s at 16 closed-loop clients, 32 new tokens per request, the cluster with
  1 replica and then with 2, each in rotating turns with the single machine.
- Cold start: a model at `replicas: {min: 0}` with a short idle_unload_s is left until
  the cluster has scaled it to zero (GET /v1/models lists no replica), then timed on its
  next request; on one machine, the same model with the same idle_unload_s is left until
  the gateway has unloaded it, then timed the same way.

A local Ray gives each replica one of the box's CPUs, so the 1- and 2-replica models are
deployed in turn (the first is unloaded before the second deploys), never at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from bench import clients, engines, overhead
from bench.common import Server, model_path, serving
from bench.concurrency import TOKENS as RATE_TOKENS
from bench.concurrency import Point, Slice, measure, merge
from bench.report import Section, finish, median, ms, percentile

CLIENTS = 16
IDLE_S = 3.0  # idle_unload_s of the cold-start models, on both gateways
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
START_S = 180.0  # the cluster gateway starts Ray before it answers
STOP_S = 30.0  # it deletes its models and stops its Ray in ~5 s
WAIT_S = 180.0  # the most a model is given to unload (Serve averages load over 11 s or more)
POLL_S = 0.2
SINGLE = "single machine"
CLUSTER = "cluster"


def cluster_gateway(models: dict[str, str]) -> Server:
    """`llm-gateway serve --cluster ray`: the gateway starts a local Ray for itself (and
    stops it at shutdown) and deploys each model there on its first request."""
    server = engines.gateway(models)
    server.name = "gateway-cluster"
    server.argv += ["--cluster", "ray"]
    server.env.update(RAY_ENV)
    return server


def entry(model: Path, replicas: str = "", idle_s: float | None = None) -> str:
    body = engines.transformers_entry(model)
    if replicas:
        body += f"\nreplicas: {replicas}"
    if idle_s is not None:
        body += f"\nidle_unload_s: {idle_s:g}"
    return body


def card(url: str, name: str) -> dict[str, Any]:
    """The model's entry in GET /v1/models."""
    data = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return next(c for c in data if c["id"] == name)


def replicas(model: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The replicas a cluster model runs; None before it is deployed."""
    runtime = model.get("runtime") or {}
    cluster = runtime.get("cluster")
    return None if cluster is None else list(cluster["replicas"])


def scaled_to_zero(model: dict[str, Any]) -> bool:
    return replicas(model) == []


def unloaded(model: dict[str, Any]) -> bool:
    return bool(model["state"] == "unloaded")


def wait_for(target: clients.Target, done: Callable[[dict[str, Any]], bool]) -> float:
    """Poll GET /v1/models until `done` holds for the target's model; returns the time."""
    deadline = time.perf_counter() + WAIT_S
    while not done(card(target.url, target.model)):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{target.name}: not in the state waited for in {WAIT_S:g}s")
        time.sleep(POLL_S)
    return time.perf_counter()


def timed(target: clients.Target) -> tuple[float, float]:
    """One 16-token request: (seconds it took, when it ended)."""
    path, body = target.request(overhead.TOKENS)
    started = time.perf_counter()
    httpx.post(target.url + path, json=body, timeout=WAIT_S).raise_for_status()
    ended = time.perf_counter()
    return ended - started, ended


def latency(targets: dict[str, clients.Target], rounds: int) -> dict[str, list[float]]:
    """Seconds of each warm 16-token request, the targets in turns (bench.overhead's)."""

    async def go() -> dict[str, list[float]]:
        async with clients.client() as http:
            contenders = {name: overhead._bind(http, t) for name, t in targets.items()}
            times, _ = await overhead._measure(contenders, rounds)
        return times

    return asyncio.run(go())


def rates(targets: dict[str, clients.Target], seconds: float, slices: int = 2) -> dict[str, Point]:
    """tok/s at CLIENTS closed-loop clients, in `slices` windows per target, rotating."""
    names = list(targets)
    windows: dict[str, list[Slice]] = {name: [] for name in names}
    for turn in range(slices):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            windows[name].append(asyncio.run(measure(targets[name], CLIENTS, seconds / slices)))
    points = {name: merge(windows[name]) for name in names}
    for name, point in points.items():
        print(f"  {name:34s} {CLIENTS:3d} clients: {point}", flush=True)
    return points


def cold_starts(
    single: clients.Target, cluster: clients.Target, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """For each: the first request after start, and `repeats` times the idle seconds until
    it was unloaded (scaled to zero) and its next request. The single machine is timed
    inside the cluster's wait, which is the longer; nothing else runs meanwhile."""
    out: dict[str, dict[str, list[float]]] = {
        name: {"first_s": [], "idle_s": [], "cold_s": []} for name in (SINGLE, CLUSTER)
    }
    for repeat in range(repeats):
        # Loaded and just used, each: its idle clock starts at the end of this request,
        # and each is watched from then on (the cluster's wait is the longer).
        cluster_took, cluster_last = timed(cluster)
        single_took, single_last = timed(single)
        if repeat == 0:
            out[SINGLE]["first_s"].append(single_took)
            out[CLUSTER]["first_s"].append(cluster_took)
        out[SINGLE]["idle_s"].append(wait_for(single, unloaded) - single_last)
        out[SINGLE]["cold_s"].append(timed(single)[0])
        out[CLUSTER]["idle_s"].append(wait_for(cluster, scaled_to_zero) - cluster_last)
        out[CLUSTER]["cold_s"].append(timed(cluster)[0])
        for name, values in out.items():
            print(
                f"  {name}: unloaded after {values['idle_s'][-1]:.1f} s idle, "
                f"next request {values['cold_s'][-1]:.2f} s",
                flush=True,
            )
    return out


@contextlib.contextmanager
def cluster_serving(server: Server) -> Iterator[Server]:
    """`serving`, but stopped as a service manager stops the gateway: SIGTERM to the
    gateway alone, which stops its own Ray. (Server.stop signals the whole group, which
    kills the local Ray under the gateway while it deletes its models: it then hangs for
    60 s on the lost cluster.) What is left of the group after that is killed."""
    with serving(server, START_S):
        try:
            yield server
        finally:
            process = server.process
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(STOP_S)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def unload(target: clients.Target) -> None:
    httpx.post(f"{target.url}/admin/models/{target.model}/unload", timeout=120).raise_for_status()


def run(seconds: float = 6.0, rounds: int = 30, colds: int = 2) -> list[Section]:
    if importlib.util.find_spec("ray") is None:
        raise SystemExit("no Ray Serve: pip install -e '.[cluster]' (make test-cluster)")
    model = model_path()
    with contextlib.ExitStack() as stack:
        machine = stack.enter_context(
            serving(engines.gateway({"bench": entry(model), "cold": entry(model, idle_s=IDLE_S)}))
        )
        ray = stack.enter_context(
            cluster_serving(
                cluster_gateway(
                    {
                        "one": entry(model, "{min: 1, max: 1}"),
                        "two": entry(model, "{min: 2, max: 2}"),
                        "zero": entry(model, "{min: 0, max: 1}", IDLE_S),
                    }
                )
            )
        )
        single = clients.Target("gateway", machine.url, "openai", "bench")
        one_replica = clients.Target("cluster-1", ray.url, "openai", "one")
        two_replicas = clients.Target("cluster-2", ray.url, "openai", "two")
        asyncio.run(engines._warm([single, one_replica], START_S))
        print("== cluster: cold start at scale zero", flush=True)
        zero = clients.Target("cluster-zero", ray.url, "openai", "zero")
        cold = cold_starts(
            clients.Target("gateway-cold", machine.url, "openai", "cold"), zero, colds
        )
        unload(zero)  # its replica would hold a CPU the 2-replica model needs
        print("== cluster: 1 replica", flush=True)
        times = latency({SINGLE: single, CLUSTER: one_replica}, rounds)
        for name, values in times.items():
            print(f"  {name}: median {ms(median(values))}, p90 {ms(percentile(values, 90))}")
        first = rates({SINGLE: single, CLUSTER: one_replica}, seconds)
        unload(one_replica)
        print("== cluster: 2 replicas", flush=True)
        asyncio.run(engines._warm([two_replicas], START_S))
        wait_for(two_replicas, lambda m: len(replicas(m) or []) == 2)
        second = rates({SINGLE: single, CLUSTER: two_replicas}, seconds)
        served = [r.get("served", 0) for r in replicas(card(ray.url, "two")) or []]
    return [_section(times, first, second, cold, served, seconds, rounds, colds)]


def _section(
    times: dict[str, list[float]],
    first: dict[str, Point],
    second: dict[str, Point],
    cold: dict[str, dict[str, list[float]]],
    served: list[int],
    seconds: float,
    rounds: int,
    colds: int,
) -> Section:
    cores = os.cpu_count() or 1

    def ratio(a: float, b: float) -> str:
        return f"{a / max(b, 1e-9):.2f}x"

    rows = []
    for label, pick in (("median", median), ("p90", lambda v: percentile(v, 90))):
        s, c = pick(times[SINGLE]), pick(times[CLUSTER])
        rows.append(
            [f"{overhead.TOKENS}-token request, 1 client, {label}", ms(s), ms(c), ratio(c, s)]
        )
    for label, points in (("1 replica", first), ("2 replicas", second)):
        s, c = points[SINGLE].tokens_per_s, points[CLUSTER].tokens_per_s
        rows.append(
            [
                f"tok/s, {CLIENTS} clients, {RATE_TOKENS} tokens each, cluster {label}",
                f"{s:.0f}",
                f"{c:.0f}",
                ratio(c, s),
            ]
        )
    for label, key in (
        ("first request after start (cluster: deploys the model)", "first_s"),
        (f"idle until unloaded / scaled to zero (idle_unload_s {IDLE_S:g})", "idle_s"),
        ("next request, from unloaded / zero replicas", "cold_s"),
    ):
        s, c = median(cold[SINGLE][key]), median(cold[CLUSTER][key])
        rows.append([label, f"{s:.2f} s", f"{c:.2f} s", ratio(c, s)])
    return Section(
        key="cluster",
        title="8. Serving on a Ray cluster (`serve --cluster ray`) against one machine",
        command=f"python -m bench.cluster --seconds {seconds:g} --rounds {rounds} --colds {colds}",
        columns=["", "single machine", "cluster (local Ray)", "cluster / single"],
        rows=rows,
        notes=[
            "Both gateways on their defaults, on this one box: the cluster gateway starts a "
            "local Ray (`--cluster ray`) and runs each model as a Ray Serve deployment whose "
            "replica starts the same worker; a request goes gateway -> Serve handle -> "
            "replica -> worker. Cluster models: `replicas: {min: 1, max: 1}`, then "
            "`{min: 2, max: 2}`, each measured in turns with the single machine (Ray gives "
            f"each replica one of the box's {cores} CPUs, so the two are deployed one after "
            "the other).",
            f"Latency: {rounds} requests to each, interleaved, after 3 warm ones. Throughput: "
            f"{seconds:g} s per point in 2 windows, closed loop, as in 2. With 2 replicas "
            f"the requests served per replica were {' / '.join(map(str, served)) or '?'}.",
            f"Cold start: a model with idle_unload_s {IDLE_S:g} (on the cluster `replicas: "
            "{min: 0, max: 1}`), left idle until GET /v1/models shows it unloaded (on the "
            f"cluster: no replica), then timed on its next request; medians of {colds}. "
            "Ray Serve decides on requests averaged over its autoscaler's look-back window "
            "(30 s by default), which shows in the idle time to zero replicas and in the "
            "wait before a replica starts.",
            f"What this {cores}-core box cannot show: replicas on one box share its cores, so "
            "2 replicas cannot double throughput here; the cost of the extra hops is what is "
            "measurable. On real machines, 2 replicas on 2 GPU nodes should give about 2x "
            "the tok/s, and the hop cost (15-30 ms at low load) is small against GPU decode.",
        ],
        data={
            "latency_s": times,
            "rates": {
                "1 replica": {n: vars(p) for n, p in first.items()},
                "2 replicas": {n: vars(p) for n, p in second.items()},
            },
            "cold": cold,
            "served_per_replica": served,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--colds", type=int, default=2, help="cold starts timed on each")
    args = parser.parse_args()
    for section in run(args.seconds, args.rounds, args.colds):
        finish(section)


if __name__ == "__main__":
    main()
