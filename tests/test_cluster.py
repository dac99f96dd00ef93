"""`serve --cluster`: the tiny models on a local Ray cluster of simulated nodes, through the
gateway's real HTTP front door.

Three Ray nodes on this machine (`ray.cluster_utils.Cluster`): a head and nodes `a` and `b`,
each with a custom resource standing in for a GPU (`sim_gpu`) and one naming it. Models ask
for those resources in models.yaml; Ray Serve places, replicates, scales and restarts them.
Run by `make test-cluster` (the `cluster` extra); the last test kills node `b`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Gateway, alive, wait_until, worker_pids, write_config

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(600),
    # Ray Serve's own models use pydantic's deprecated Field keywords.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`"),
]
ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="needs the `cluster` extra")

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class Nodes:
    """The simulated cluster: its address and the two nodes that stand in for GPU hosts."""

    cluster: Any
    a: Any
    b: Any

    @property
    def address(self) -> str:
        return str(self.cluster.address)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Nodes]:
    import ray

    temp = Path("/tmp") / f"llmgw-test-ray-{os.getpid()}"  # Ray's socket paths must stay short
    # Cluster() records the head's address in Ray's default temp dir whatever the head's own
    # is, and fails where that dir does not exist yet (a fresh machine).
    Path(ray._common.utils.get_default_ray_temp_dir()).mkdir(parents=True, exist_ok=True)
    nodes = ray_cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head": 1},
            "temp_dir": str(temp),
            "include_dashboard": False,
        },
    )
    a = nodes.add_node(num_cpus=2, resources={"node_a": 1, "sim_gpu": 1})
    b = nodes.add_node(num_cpus=2, resources={"node_b": 1, "sim_gpu": 1})
    nodes.wait_for_nodes()
    # The tests join too, to read what Serve runs (the gateway is a driver of its own).
    ray.init(address=nodes.address, namespace="llmgw-tests", log_to_driver=False)
    try:
        yield Nodes(nodes, a, b)
    finally:
        ray.shutdown()
        nodes.shutdown()


def config_text(tiny_model: Path, extra: str = "") -> str:
    return f"""
    gateway:
      load_timeout_s: 120
    models:
      on-a:
        source: {tiny_model}
        generation: {{max_new_tokens: 4}}
        resources: {{node_a: 1}}
      nowhere:
        source: {tiny_model}
        resources: {{tpu: 1}}
      pair:
        source: {tiny_model}
        generation: {{max_new_tokens: 8}}
        replicas: {{min: 2, max: 2}}
        resources: {{sim_gpu: 1}}
      zero:
        source: {tiny_model}
        generation: {{max_new_tokens: 4}}
        idle_unload_s: 2
        replicas: {{min: 0, max: 1}}
    {extra}
    """


@pytest.fixture(scope="module")
def front(
    cluster: Nodes, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    config = write_config(tmp_path_factory.mktemp("cluster"), config_text(tiny_model))
    with Gateway(config, args=["--cluster", f"ray:{cluster.address}"], healthy_within_s=90) as gw:
        gw.client.timeout = httpx.Timeout(180.0)
        yield gw


def chat(gateway: Gateway, model: str, **fields: Any) -> httpx.Response:
    return gateway.post("/v1/chat/completions", {"model": model, **CHAT, **fields})


def replicas(gateway: Gateway, model: str) -> list[dict[str, Any]]:
    runtime = gateway.models()[model]["runtime"] or {}
    found: list[dict[str, Any]] = runtime.get("cluster", {}).get("replicas", [])
    return found


def test_a_model_runs_on_the_node_whose_resource_it_asks_for(
    front: Gateway, cluster: Nodes
) -> None:
    reply = chat(front, "on-a")
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "on-a"
    assert wait_until(lambda: len(replicas(front, "on-a")) == 1, timeout=10)
    (replica,) = replicas(front, "on-a")
    assert replica["node"] == cluster.a.node_id
    assert replica["state"] == "ALIVE"
    card = front.models()["on-a"]
    assert card["state"] == "ready"


def test_a_model_that_fits_no_node_is_a_503_naming_the_resource(front: Gateway) -> None:
    reply = chat(front, "nowhere")
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "no_room"
    assert "tpu" in error["message"] and "no node" in error["message"]
    assert front.models()["nowhere"]["state"] == "unloaded"  # the cluster may grow: retried


def test_two_replicas_share_sixteen_concurrent_clients(front: Gateway, cluster: Nodes) -> None:
    assert chat(front, "pair").status_code == 200
    assert wait_until(lambda: len(replicas(front, "pair")) == 2, timeout=60)
    nodes = {r["node"] for r in replicas(front, "pair")}
    assert nodes == {cluster.a.node_id, cluster.b.node_id}  # one sim_gpu each
    statuses: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=front.url, timeout=180.0) as session:
            for _ in range(3):
                body = {"model": "pair", **CHAT}
                statuses.append(session.post("/v1/chat/completions", json=body).status_code)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 48

    def served() -> list[int]:
        return [r["served"] for r in replicas(front, "pair")]

    assert wait_until(lambda: sum(served()) >= 49, timeout=10), served()  # the table lags 1 s
    assert min(served()) >= 5, served()  # both replicas took a share


def test_streams_relay_every_chunk_and_the_seed_route_works(front: Gateway) -> None:
    with front.client.stream(
        "POST", "/v1/chat/completions", json={"model": "pair", **CHAT, "stream": True}
    ) as stream:
        assert stream.status_code == 200
        lines = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert len(lines) >= 3
    seed = front.post("/pair", {"prompt": "hi", "max_length": 3})
    assert seed.status_code == 200, seed.text
    assert seed.json()["usage"]["completion_tokens"] == 3


def test_keep_alive_is_refused_on_a_cluster(front: Gateway) -> None:
    reply = chat(front, "pair", keep_alive=5)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "keep_alive"


def test_a_model_with_min_zero_scales_to_zero_when_idle_and_back_on_a_request(
    front: Gateway,
) -> None:
    assert chat(front, "zero").status_code == 200
    assert wait_until(lambda: len(replicas(front, "zero")) == 1, timeout=10)
    assert wait_until(lambda: replicas(front, "zero") == [], timeout=120, interval=1.0)
    assert front.models()["zero"]["state"] == "ready"  # deployed, at zero replicas
    reply = chat(front, "zero")
    assert reply.status_code == 200, reply.text
    assert wait_until(lambda: len(replicas(front, "zero")) == 1, timeout=10)


def test_metrics_count_the_replicas(front: Gateway) -> None:
    text = front.client.get("/metrics").text
    assert 'llmgw_model_replicas{model="pair",state="ALIVE"} 2.0' in text


def test_a_replica_whose_worker_dies_is_replaced_at_once_not_after_its_health_check(
    front: Gateway,
) -> None:
    """The worker gone, its replica can serve nothing: it ends itself, so Serve routes the
    next requests to a fresh replica instead of failing them until a health check."""
    assert chat(front, "on-a").status_code == 200
    assert wait_until(lambda: len(replicas(front, "on-a")) == 1, timeout=10)
    (replica,) = replicas(front, "on-a")
    (worker,) = worker_pids(replica["pid"])
    os.kill(worker, signal.SIGKILL)
    time.sleep(2.0)
    reply = chat(front, "on-a")
    assert reply.status_code == 200, reply.text
    assert wait_until(lambda: [r["pid"] for r in replicas(front, "on-a")] != [replica["pid"]])
    assert front.models()["on-a"]["state"] == "ready"


def test_hot_reload_adds_and_removes_deployments_and_leaves_the_others(
    front: Gateway, tiny_model: Path
) -> None:
    assert chat(front, "on-a").status_code == 200
    assert chat(front, "pair").status_code == 200
    assert wait_until(lambda: len(replicas(front, "pair")) == 2, timeout=60)
    before = {r["replica"] for r in replicas(front, "pair")}
    text = config_text(tiny_model).replace("  zero:", "  dropped:")
    text = text.replace("  on-a:", "  added:").replace("{node_a: 1}", "{node_b: 1}")
    front.config.write_text(textwrap.dedent(text))
    report = front.client.post("/admin/reload").json()
    assert sorted(report["added"]) == ["added", "dropped"]
    assert sorted(report["removed"]) == ["on-a", "zero"]
    assert "pair" in report["unchanged"]
    reply = chat(front, "added")
    assert reply.status_code == 200, reply.text
    assert chat(front, "on-a").status_code == 404
    assert {r["replica"] for r in replicas(front, "pair")} == before  # untouched

    def apps() -> set[str]:
        return set(_applications())

    assert wait_until(lambda: "llmgw-on-a" not in apps() and "llmgw-zero" not in apps(), 60)
    assert "llmgw-added" in apps() and "llmgw-pair" in apps()


def _applications() -> dict[str, Any]:
    """The Serve applications on the cluster, read through the gateway's own driver state."""
    from ray import serve

    return dict(serve.status().applications)


def test_a_changed_entry_rolls_its_replicas_over_while_they_serve(front: Gateway) -> None:
    """A reload that changes a running model redeploys it in place: Serve replaces its
    replicas a few at a time, and no request waits for a cold start or fails."""
    assert wait_until(lambda: len(replicas(front, "pair")) == 2, timeout=60)
    before = {r["replica"] for r in replicas(front, "pair")}
    results: list[tuple[int, int | None]] = []
    states: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        body = {"model": "pair", "messages": CHAT["messages"]}  # the entry's default length
        with httpx.Client(base_url=front.url, timeout=180.0) as session:
            while not stop.is_set():
                reply = session.post("/v1/chat/completions", json=body)
                tokens = reply.json()["usage"]["completion_tokens"] if reply.is_success else None
                results.append((reply.status_code, tokens))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    front.config.write_text(
        front.config.read_text().replace("max_new_tokens: 8", "max_new_tokens: 6")
    )
    report = front.client.post("/admin/reload").json()
    assert report["changed"] == ["pair"], report

    def rolled_over() -> bool:
        card = front.models()["pair"]
        states.add(card["state"])
        now = {r["replica"] for r in replicas(front, "pair") if r["state"] == "ALIVE"}
        return card["progress"] is None and len(now) == 2 and not now & before

    assert wait_until(rolled_over, timeout=180, interval=0.5), front.models()["pair"]
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join()
    assert states == {"ready"}  # never drained, unloaded or started again
    assert {status for status, _ in results} == {200}, results
    assert results[-1][1] == 6  # the new entry
    assert chat(front, "pair").status_code == 200


def test_new_replica_counts_queue_and_system_prompt_keep_the_running_replicas(
    front: Gateway,
) -> None:
    """Serve options alone (autoscaling, the queue) are applied to the running replicas,
    and the gateway's per-request fields need nothing of them: no replica restarts."""
    assert wait_until(lambda: len(replicas(front, "pair")) == 2, timeout=60)
    before = {r["replica"] for r in replicas(front, "pair")}
    first = chat(front, "pair")
    assert first.status_code == 200, first.text
    old = "    replicas: {min: 2, max: 2}\n"
    text = front.config.read_text()
    assert old in text
    front.config.write_text(
        text.replace(
            old,
            "    replicas: {min: 2, max: 2, target_ongoing_requests: 3}\n"
            "    limits: {max_queue: 50}\n"
            "    system_prompt: You are a careful assistant who answers in full sentences.\n",
        )
    )
    report = front.client.post("/admin/reload").json()
    assert report["changed"] == ["pair"] and report["retuned"] == [], report  # Serve's part
    assert wait_until(lambda: front.models()["pair"]["progress"] is None, timeout=60)
    options = _applications()["llmgw-pair"].deployments["model"]
    assert options.status == "HEALTHY", options
    second = chat(front, "pair")
    assert second.status_code == 200, second.text
    assert second.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"]
    assert {r["replica"] for r in replicas(front, "pair")} == before
    assert front.models()["pair"]["state"] == "ready"


def test_a_killed_node_fails_only_the_requests_it_held_and_the_model_comes_back(
    front: Gateway, cluster: Nodes
) -> None:
    assert wait_until(lambda: len(replicas(front, "pair")) == 2, timeout=60)
    results: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=front.url, timeout=180.0) as session:
            while not stop.is_set():
                body = {"model": "pair", **CHAT, "max_tokens": 8, "stream": True}
                try:
                    with session.stream("POST", "/v1/chat/completions", json=body) as reply:
                        lines = [x for x in reply.iter_lines() if x.startswith("data:")]
                    if reply.status_code != 200:
                        results.append(f"status {reply.status_code}")
                    elif any('"error"' in line for line in lines):
                        assert lines[-1] == "data: [DONE]"  # an error event, then the end
                        results.append("error event")
                    else:
                        results.append("ok")
                except httpx.HTTPError as exc:
                    results.append(f"broken {type(exc).__name__}")

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(4)
    cluster.cluster.remove_node(cluster.b, allow_graceful=False)
    killed_at = len(results)
    time.sleep(8)
    after_kill = len(results)
    stop.set()
    for thread in threads:
        thread.join()
    failures = [r for r in results if r != "ok"]
    # Only what node b held fails: at most one request per client, as a 502 or an error event.
    assert len(failures) <= 6, results
    assert all(r in ("status 502", "error event") for r in failures), failures
    assert results[after_kill:].count("ok") == len(results[after_kill:])
    assert results[killed_at:].count("ok") > 0  # the surviving replica kept serving
    assert chat(front, "pair").status_code == 200
    cluster.b = cluster.cluster.add_node(num_cpus=2, resources={"node_b": 1, "sim_gpu": 1})
    # Serve restarts the lost replica where there is room again: on the new node.
    assert wait_until(
        lambda: (
            {r["node"] for r in replicas(front, "pair") if r["state"] == "ALIVE"}
            == {cluster.a.node_id, cluster.b.node_id}
        ),
        timeout=180,
        interval=1.0,
    )
    assert chat(front, "pair").status_code == 200


def test_a_local_cluster_leaves_no_ray_process_when_serve_stops(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f"""
        models:
          tiny: {{source: {tiny_model}, generation: {{max_new_tokens: 2}}}}
        """,
    )
    gateway = Gateway(config, args=["--cluster", "ray"], healthy_within_s=90)
    try:
        reply = gateway.post("/tiny", {"prompt": "hi"}, timeout=180.0)
        assert reply.status_code == 200, reply.text
        started = _descendants(gateway.process.pid)
        assert len(started) >= 3, "the local Ray (GCS, raylet, workers) and the replica's worker"
        assert gateway.stop(signal.SIGTERM, timeout=60) == -signal.SIGTERM  # as on one machine
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()
    assert wait_until(lambda: not alive(started), timeout=30), alive(started)


def _descendants(root: int) -> set[int]:
    """Every live process under `root`: the local Ray's GCS and raylet are the gateway's
    children, and its workers the raylet's."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return alive(found)


class _Full:
    """A Serve handle whose every replica queue is full."""

    def options(self, **_: Any) -> _Full:
        return self

    def remote(self, *_: Any) -> _Full:
        return self

    async def __anext__(self) -> Any:
        from ray.serve.exceptions import BackPressureError

        raise BackPressureError(num_queued_requests=4, max_queued_requests=4)

    def cancel(self) -> None:
        pass


async def test_full_replica_queues_are_a_429_with_retry_after() -> None:
    from gateway.backends.cluster.transport import HandleTransport
    from gateway.backends.upstream import Upstream
    from gateway.errors import RateLimited

    upstream = Upstream("http://replica", transport=HandleTransport(_Full()))
    with pytest.raises(RateLimited) as caught:
        await upstream.post("/v1/chat/completions", {"model": "m"})
    assert caught.value.headers == {"Retry-After": "1"}
    assert "queue is full" in str(caught.value)
    await upstream.aclose()


class _Waiting:
    """A Serve handle whose requests wait for a replica that never comes; a cancel before
    assignment ends them with CancelledError, as Serve's do."""

    def __init__(self) -> None:
        self.cancelled = 0
        self._events: list[asyncio.Event] = []

    def options(self, **_: Any) -> _Waiting:
        return self

    def remote(self, *_: Any) -> _Waiting:
        return self

    async def __anext__(self) -> Any:
        event = asyncio.Event()
        self._events.append(event)
        await event.wait()
        raise asyncio.CancelledError

    def cancel(self) -> None:
        self.cancelled += 1
        for event in self._events:
            event.set()


async def test_requests_waiting_on_a_deleted_application_end_as_502_at_once() -> None:
    from gateway.backends.cluster.transport import HandleTransport
    from gateway.backends.upstream import Upstream
    from gateway.errors import UpstreamFailed

    handle = _Waiting()
    upstream = Upstream("http://replica", transport=HandleTransport(handle))
    waiting = asyncio.ensure_future(upstream.post("/v1/chat/completions", {"model": "m"}))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await upstream.aclose()  # what stopping the model's backend does after its delete
    with pytest.raises(UpstreamFailed, match="stopped answering"):
        await asyncio.wait_for(waiting, 1.0)
    assert handle.cancelled >= 1


async def test_a_client_leaving_a_waiting_request_is_still_a_cancellation() -> None:
    from gateway.backends.cluster.transport import HandleTransport
    from gateway.backends.upstream import Upstream

    handle = _Waiting()
    upstream = Upstream("http://replica", transport=HandleTransport(handle))
    waiting = asyncio.ensure_future(upstream.post("/v1/chat/completions", {"model": "m"}))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert handle.cancelled == 1  # the replica's relay is cancelled with it
    await upstream.aclose()


def test_sigterm_to_the_whole_process_group_stops_a_local_cluster_promptly(
    tiny_model: Path, tmp_path: Path
) -> None:
    """As systemd and `kill -- -PGID` do: Ray's own processes get the signal too, so the
    gateway must not wait on a Ray that is already gone."""
    config = write_config(
        tmp_path,
        f"""
        models:
          tiny: {{source: {tiny_model}, generation: {{max_new_tokens: 2}}}}
        """,
    )
    with Gateway(
        config, args=["--cluster", "ray"], healthy_within_s=90, preexec_fn=os.setsid
    ) as gateway:
        assert gateway.post("/tiny", {"prompt": "hi"}, timeout=180.0).status_code == 200
        started = _descendants(gateway.process.pid)
        began = time.monotonic()
        os.killpg(gateway.process.pid, signal.SIGTERM)
        try:
            gateway.process.wait(timeout=40)
        finally:
            if gateway.process.poll() is None:
                os.killpg(gateway.process.pid, signal.SIGKILL)
        assert time.monotonic() - began < 30, gateway.log.read_text()[-2000:]
    assert wait_until(lambda: not alive(started), timeout=30), alive(started)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_client_that_leaves_before_the_reply_stops_the_replicas_worker(
    cluster: Nodes, tmp_path: Path
) -> None:
    """A non-streamed reply begins only when generation ends: a client hanging up before
    then must cancel the replica's relay, so its worker stops generating."""
    from gateway.worker.tiny import build

    slow = build(tmp_path / "slow", seed=0, layers=8, hidden=384)  # greedy: never an early EOS
    config = write_config(
        tmp_path,
        f"""
        models:
          slow: {{source: {slow}, limits: {{max_new_tokens: 1000}}}}
        """,
    )
    with Gateway(config, args=["--cluster", f"ray:{cluster.address}"], healthy_within_s=90) as gw:
        gw.client.timeout = httpx.Timeout(180.0)
        assert chat(gw, "slow").status_code == 200
        assert wait_until(lambda: len(replicas(gw, "slow")) == 1, timeout=10)
        (worker,) = worker_pids(replicas(gw, "slow")[0]["pid"])
        with pytest.raises(httpx.ReadTimeout):
            gw.post(
                "/v1/chat/completions", {"model": "slow", **CHAT, "max_tokens": 1000}, timeout=1.5
            )
        time.sleep(1.0)
        spent = _cpu_seconds(worker)
        time.sleep(2.0)
        assert _cpu_seconds(worker) - spent < 0.3  # idle: the request was aborted


def test_a_replicas_worker_never_sees_the_gateways_keys(tiny_model: Path, tmp_path: Path) -> None:
    """The local Ray inherits the gateway's environment, key sources included; the worker
    a replica starts (which may run a model's own code) gets none of them."""
    secret = f"cluster-secret-{os.getpid()}"
    config = write_config(
        tmp_path,
        f"""
        gateway: {{auth: {{api_keys_env: LLMGW_TEST_TOKENS}}}}
        models:
          tiny: {{source: {tiny_model}, generation: {{max_new_tokens: 2}}}}
        """,
    )
    env = {"LLMGW_TEST_TOKENS": secret}  # an LLMGW_ name: passed to workers unless a key source
    with Gateway(config, env=env, args=["--cluster", "ray"], healthy_within_s=90) as gateway:
        reply = gateway.post(
            "/tiny", {"prompt": "hi"}, headers={"Authorization": f"Bearer {secret}"}
        )
        assert reply.status_code == 200, reply.text
        workers = [pid for pid in _descendants(gateway.process.pid) if _is_worker(pid)]
        assert workers, "the replica's worker runs under the local Ray"
        for pid in workers:
            assert secret.encode() not in Path(f"/proc/{pid}/environ").read_bytes()


def _is_worker(pid: int) -> bool:
    try:
        return b"gateway.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
