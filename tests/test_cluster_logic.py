"""The cluster mode's own logic, without Ray: what each model asks the scheduler for, how
its deployment scales, how a replica takes the node's GPUs, how the supervisor behaves
when the cluster places and scales models, and the registry's cluster-only settings.
(tests/test_cluster.py runs it all on a real local Ray cluster.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.backends.cluster.connect import ray_address
from gateway.backends.cluster.launcher import (
    _replica_failure,
    deployment_options,
    replica_version,
)
from gateway.backends.cluster.replica import ReplicaSettings, on_gpus
from gateway.backends.cluster.resources import actor_options, replica_resources, unfit
from gateway.backends.launcher import LoadFailed, Progress
from gateway.errors import BadRequest, ModelUnavailable
from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.config import GatewaySettings, ModelEntry
from gateway.registry.load import ConfigError, load_registry, parse_registry, require_cluster_for
from tests.fakes import Clock, FakeBackend, FakeLauncher


def entry(**fields: object) -> ModelEntry:
    return ModelEntry.model_validate({"source": "/m", **fields})


def test_a_replica_asks_for_its_gpus_threads_and_custom_resources() -> None:
    needs = replica_resources(entry(devices=[0, 1], resources={"a100": 1}))
    assert needs == {"CPU": 1.0, "GPU": 2.0, "a100": 1.0}
    assert replica_resources(entry(threads=4)) == {"CPU": 4.0}
    options = actor_options(entry(devices=[3], env={"X": "1"}, resources={"a100": 0.5}))
    assert options == {
        "num_cpus": 1.0,
        "num_gpus": 1.0,
        "resources": {"a100": 0.5},
        "runtime_env": {"env_vars": {"X": "1"}},
    }


def test_a_model_no_node_can_hold_is_named_with_the_resource_short() -> None:
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.0, "a100": 1.0}]
    assert unfit({"CPU": 1.0, "GPU": 1.0}, nodes) is None
    why = unfit({"CPU": 1.0, "GPU": 2.0}, nodes)
    assert why is not None and "GPU" in why and "the most any node has: GPU 1" in why
    why = unfit({"CPU": 1.0, "tpu": 1.0}, nodes)
    assert why is not None and "tpu 0" in why
    # Each resource exists somewhere, never together on one node.
    why = unfit({"CPU": 1.0, "GPU": 1.0, "a100": 1.0}, nodes)
    assert why is not None and "no single node" in why
    assert unfit({"CPU": 1.0}, []) == "the cluster has no live node"


def test_min_zero_scales_to_zero_on_the_models_idle_time() -> None:
    model = entry(replicas={"min": 0, "max": 3, "target_ongoing_requests": 4})
    options = deployment_options(model, idle_s=30.0)
    scaling = options["autoscaling_config"]
    assert scaling["min_replicas"] == 0 and scaling["max_replicas"] == 3
    assert scaling["initial_replicas"] == 1  # deployed for a request: it needs one now
    assert scaling["downscale_to_zero_delay_s"] == 30.0
    assert scaling["target_ongoing_requests"] == 4
    assert options["max_ongoing_requests"] == model.limits.max_concurrency
    assert options["max_queued_requests"] == model.limits.max_queue


def test_without_an_idle_time_or_when_pinned_a_model_keeps_one_replica() -> None:
    assert deployment_options(entry(), idle_s=None)["autoscaling_config"]["min_replicas"] == 1
    pinned = entry(pinned=True)
    assert deployment_options(pinned, idle_s=5.0)["autoscaling_config"]["min_replicas"] == 1
    two = entry(replicas={"min": 2, "max": 2})
    scaling = deployment_options(two, idle_s=5.0)["autoscaling_config"]
    assert scaling["min_replicas"] == scaling["initial_replicas"] == 2


SETTINGS = ReplicaSettings(cache_dir="/c", envs_dir="/e", auto_build_envs=True)


@pytest.mark.parametrize(
    "change",
    [
        {"replicas": {"min": 1, "max": 4, "target_ongoing_requests": 5}},
        {"idle_unload_s": 30},
        {"pinned": True},
        {"limits": {"max_queue": 7}},
        {"system_prompt": "Be brief.", "generation": {"temperature": 0.1}},
    ],
)
def test_serve_s_options_and_per_request_fields_keep_the_replicas_version(
    change: dict[str, object],
) -> None:
    assert replica_version(entry(**change), SETTINGS) == replica_version(entry(), SETTINGS)


@pytest.mark.parametrize(
    "change",
    [
        {"dtype": "bfloat16"},
        {"limits": {"max_concurrency": 4}},  # the worker's batch, too
        {"generation": {"max_new_tokens": 9}},  # the worker's default
        {"env": {"A": "1"}},
    ],
)
def test_what_a_replica_reads_at_its_start_changes_its_version(
    change: dict[str, object],
) -> None:
    assert replica_version(entry(**change), SETTINGS) != replica_version(entry(), SETTINGS)


def test_new_key_sources_to_hide_change_the_replicas_version() -> None:
    hidden = ReplicaSettings(cache_dir="/c", envs_dir="/e", auto_build_envs=True, secrets=("K",))
    assert replica_version(entry(), hidden) != replica_version(entry(), SETTINGS)


def test_a_replica_takes_the_gpus_ray_gave_it_with_their_memory_budgets() -> None:
    model = entry(devices=[0, 1], max_memory={"0": "20GiB", "1": "10GiB", "cpu": "8GiB"})
    moved = on_gpus(model, [5, 7])
    assert moved.devices == [5, 7]
    assert moved.max_memory == {"5": 20 * 2**30, "7": 10 * 2**30, "cpu": 8 * 2**30}
    with pytest.raises(ValueError):
        on_gpus(model, [5])  # Ray gave fewer GPUs than the entry asks for


def test_a_replica_failure_names_the_backends_own_reason() -> None:
    status = (
        "The deployment failed to start 3 times in a row.\nTraceback ...\n"
        "gateway.backends.launcher.LoadFailed: model 'm': the path /x does not exist\n"
    )
    assert _replica_failure("m", status) == "model 'm': the path /x does not exist"
    other = "Traceback ...\nRuntimeError: boom\n"
    assert _replica_failure("m", other) == "model 'm': its replicas failed to start: boom"
    assert _replica_failure("m", "pending") is None


@pytest.mark.parametrize(
    ("cluster", "address"),
    [("ray", None), ("ray:auto", "auto"), ("ray:10.0.0.1:6379", "10.0.0.1:6379"),
     ("ray://head:10001", "ray://head:10001")],
)  # fmt: skip
def test_cluster_addresses(cluster: str, address: str | None) -> None:
    GatewaySettings(cluster=cluster)
    assert ray_address(cluster) == address


@pytest.mark.parametrize("bad", ["rayx", "ray:", "ray:/x", "ray://", "k8s://x", "ray:a b"])
def test_a_bad_cluster_address_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        GatewaySettings(cluster=bad)


@pytest.mark.parametrize(
    "replicas",
    [{"min": 3, "max": 2}, {"max": 0}, {"min": -1}, {"min": "1"}, {"target_ongoing_requests": 0},
     {"max": 2, "burst": 1}],
)  # fmt: skip
def test_bad_replicas_are_refused(replicas: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        entry(replicas=replicas)


@pytest.mark.parametrize("resources", [{"a100": 0}, {"a100": -1}, {"bad name": 1}, {"": 1}])
def test_bad_resources_are_refused(resources: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        entry(resources=resources)


def test_off_a_cluster_the_cluster_settings_are_refused_by_line(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n  a:\n    source: /a\n    replicas: {max: 2}\n"
        "  b:\n    source: /b\n    resources: {a100: 1}\n  c: {source: /c}\n"
    )
    loaded = load_registry(path)
    require_cluster_for(loaded, cluster=True)
    with pytest.raises(ConfigError) as caught:
        require_cluster_for(loaded, cluster=False)
    issues = {(i.path, i.line) for i in caught.value.issues}
    assert issues == {("models.a.replicas", 4), ("models.b.resources", 7)}


async def test_on_a_cluster_keep_alive_is_refused_and_nothing_is_budgeted_or_reaped() -> None:
    text = """
    gateway: {idle_unload_s: 1, memory_budget: {cpu: 150}}
    models:
      a: {source: /a, memory_bytes: 100}
      b: {source: /b, memory_bytes: 100}
    """
    launcher = FakeLauncher()
    clock = Clock()
    supervisor = Supervisor(parse_registry(text), launcher, clock=clock, cluster=True)
    with pytest.raises(BadRequest) as caught:
        async with supervisor.lease("a", keep_alive=10):
            pass
    assert caught.value.param == "keep_alive"
    for name in ("a", "b"):  # both "fit": the cluster places them, not the local budget
        async with supervisor.lease(name):
            pass
    for backend in launcher.backends.values():
        backend.scales_itself = True
    clock.now += 100
    await supervisor.reap_idle()
    await asyncio.sleep(0.01)
    assert launcher.alive() == ["a", "b"]  # the cluster scales them to zero, not the reaper
    assert supervisor.models["a"].footprint == {}


async def test_off_a_cluster_the_same_registry_is_budgeted() -> None:
    text = """
    gateway: {memory_budget: {cpu: 150}}
    models:
      a: {source: /a, memory_bytes: 100}
      b: {source: /b, memory_bytes: 100}
    """
    launcher = FakeLauncher()
    supervisor = Supervisor(parse_registry(text), launcher)
    for name in ("a", "b"):
        async with supervisor.lease(name):
            pass
    assert launcher.alive() == ["b"]  # a was evicted to make room


def test_without_ray_installed_the_cluster_mode_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.backends.cluster.connect import ClusterUnavailable, connect

    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ClusterUnavailable, match=r"llm-gateway\[cluster\]"):
        connect("ray")


def test_serve_refuses_a_bad_cluster_address_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    path = tmp_path / "models.yaml"
    path.write_text("models:\n  a: {source: /a}\n")
    assert main(["serve", "--config", str(path), "--cluster", "k8s://x"]) == 2
    assert "--cluster k8s://x" in capsys.readouterr().err


def test_serve_without_a_cluster_refuses_the_cluster_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    path = tmp_path / "models.yaml"
    path.write_text("models:\n  a: {source: /a, replicas: {max: 2}}\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "models.a.replicas" in err and "only on a Ray cluster" in err


def test_the_clusters_token_is_never_taken_from_models_yaml() -> None:
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN"):
        entry(env={"RAY_AUTH_TOKEN": "secret"})


class RollingBackend(FakeBackend):
    """A cluster deployment's seam: `update` rolls its replicas over to a new entry."""

    def __init__(self, name: str, pid: int) -> None:
        super().__init__(name, pid, weights=100)
        self.scales_itself = True
        self.entries: list[ModelEntry] = []
        self.rolled = asyncio.Event()  # set to let an update finish
        self.refuse: LoadFailed | None = None

    async def update(self, entry: ModelEntry, on_progress: Progress) -> None:
        self.entries.append(entry)
        on_progress({"event": "progress", "message": "replicas: 1 running, 1 starting"})
        await self.rolled.wait()
        if self.refuse is not None:
            raise self.refuse


class RollingLauncher(FakeLauncher):
    async def launch(self, name: str, entry: ModelEntry, on_progress: Progress) -> FakeBackend:
        self.launches.append(name)
        backend = RollingBackend(name, 1000 + len(self.launches))
        self.backends[name] = backend
        return backend


CLUSTER_TEXT = """
models:
  m: {source: /m, generation: {max_new_tokens: 4}}
  other: {source: /o}
"""


async def _deployed(text: str = CLUSTER_TEXT) -> tuple[Supervisor, RollingLauncher]:
    launcher = RollingLauncher()
    supervisor = Supervisor(parse_registry(text), launcher, cluster=True)
    async with supervisor.lease("m"):
        pass
    return supervisor, launcher


async def test_on_a_cluster_a_changed_entry_rolls_its_replicas_while_they_serve() -> None:
    supervisor, launcher = await _deployed()
    backend = launcher.backends["m"]
    assert isinstance(backend, RollingBackend)
    report = supervisor.apply(parse_registry(CLUSTER_TEXT.replace("4}", "6}")))
    assert report.changed == ["m"] and report.unchanged == ["other"]
    await asyncio.sleep(0.01)
    runtime = supervisor.models["m"]
    assert backend.entries == [runtime.entry]  # the new entry, handed to the deployment
    assert runtime.entry.generation.max_new_tokens == 6
    assert runtime.state.value == "ready" and runtime.progress is not None
    async with supervisor.lease("m") as lease:  # served by the old replicas meanwhile
        assert lease.upstream is backend.upstream
    backend.rolled.set()
    await asyncio.sleep(0.01)
    assert runtime.progress is None and runtime.update_task is None
    assert launcher.launches == ["m"] and not backend.stopped  # never stopped or redeployed


async def test_on_a_cluster_a_failed_update_takes_the_model_out_with_its_reason() -> None:
    supervisor, launcher = await _deployed()
    backend = launcher.backends["m"]
    assert isinstance(backend, RollingBackend)
    backend.refuse = LoadFailed("launch", "model 'm': the path /n does not exist")
    supervisor.apply(parse_registry(CLUSTER_TEXT.replace("/m", "/n")))
    backend.rolled.set()
    await asyncio.sleep(0.01)
    runtime = supervisor.models["m"]
    assert runtime.state.value == "failed" and runtime.backend is None
    assert runtime.progress is None  # not the rollout's last line, about replicas now gone
    assert runtime.last_error == "model 'm': the path /n does not exist"
    assert backend.stopped and runtime.crashes == []  # taken out, not counted as a crash
    with pytest.raises(ModelUnavailable) as caught:
        async with supervisor.lease("m"):
            pass
    assert "/n does not exist" in caught.value.message


async def test_on_a_cluster_a_second_change_supersedes_an_update_and_an_unload_wins() -> None:
    supervisor, launcher = await _deployed()
    backend = launcher.backends["m"]
    assert isinstance(backend, RollingBackend)
    supervisor.apply(parse_registry(CLUSTER_TEXT.replace("4}", "5}")))
    await asyncio.sleep(0.01)
    first = supervisor.models["m"].update_task
    supervisor.apply(parse_registry(CLUSTER_TEXT.replace("4}", "6}")))
    await asyncio.sleep(0.01)
    assert first is not None and first.cancelled()
    assert [e.generation.max_new_tokens for e in backend.entries] == [5, 6]
    await supervisor.unload("m")
    backend.refuse = LoadFailed("launch", "its application is gone")  # deleted under it
    backend.rolled.set()
    await asyncio.sleep(0.01)
    runtime = supervisor.models["m"]
    assert runtime.state.value == "unloaded" and runtime.last_error is None
    assert backend.stopped


async def test_off_a_cluster_a_changed_entry_restarts_its_worker() -> None:
    launcher = FakeLauncher()
    supervisor = Supervisor(parse_registry(CLUSTER_TEXT), launcher)
    async with supervisor.lease("m"):
        pass
    supervisor.apply(parse_registry(CLUSTER_TEXT.replace("4}", "6}")))
    async with supervisor.lease("m"):
        pass
    assert launcher.launches == ["m", "m"]
    assert launcher.backends["m"].stopped is False  # the new one


async def test_on_a_cluster_a_new_system_prompt_neither_rolls_nor_supersedes_a_rollout() -> None:
    supervisor, launcher = await _deployed()
    backend = launcher.backends["m"]
    assert isinstance(backend, RollingBackend)
    prompt = CLUSTER_TEXT.replace("/m,", "/m, system_prompt: Be brief.,")
    report = supervisor.apply(parse_registry(prompt))
    assert report.retuned == ["m"]
    await asyncio.sleep(0.01)
    assert backend.entries == [] and supervisor.models["m"].update_task is None
    supervisor.apply(parse_registry(prompt.replace("4}", "5}")))  # the worker's default
    await asyncio.sleep(0.01)
    rollout = supervisor.models["m"].update_task
    supervisor.apply(parse_registry(prompt.replace("4}", "5}").replace("brief", "terse")))
    await asyncio.sleep(0.01)
    assert rollout is not None and not rollout.done()  # still the one rollout
    backend.rolled.set()
    await asyncio.sleep(0.01)
    runtime = supervisor.models["m"]
    assert runtime.state.value == "ready" and runtime.progress is None  # it completed
    assert runtime.entry.system_prompt == "Be terse." and len(backend.entries) == 1


async def test_on_a_cluster_a_new_gateway_idle_time_reaches_the_models_that_take_it() -> None:
    """The card shows the idle time in force; on a cluster Serve scales on it, so a model
    without its own gets the gateway's new one as an update of its deployment."""
    supervisor, launcher = await _deployed()
    backend = launcher.backends["m"]
    assert isinstance(backend, RollingBackend)
    report = supervisor.apply(parse_registry("gateway: {idle_unload_s: 7}\n" + CLUSTER_TEXT))
    assert report.changed == ["m", "other"] and report.unchanged == []
    await asyncio.sleep(0.01)
    assert len(backend.entries) == 1  # m's deployment resubmitted; `other` is not deployed
    assert supervisor.status(supervisor.models["m"])["idle_unload_s"] == 7
    backend.rolled.set()
    await asyncio.sleep(0.01)
    assert launcher.launches == ["m"] and supervisor.models["m"].state.value == "ready"


async def test_off_a_cluster_a_new_gateway_idle_time_changes_no_model() -> None:
    launcher = FakeLauncher()
    supervisor = Supervisor(parse_registry(CLUSTER_TEXT), launcher)
    async with supervisor.lease("m"):
        pass
    report = supervisor.apply(parse_registry("gateway: {idle_unload_s: 7}\n" + CLUSTER_TEXT))
    assert report.unchanged == ["m", "other"]  # the reaper reads it at each pass
    assert launcher.launches == ["m"] and not launcher.backends["m"].stopped
