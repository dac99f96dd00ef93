"""Hot reload in process: every `gateway:` key either takes effect at the reload or is
reported (and logged) as needing a restart, and the reload's report says which."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic.fields import FieldInfo

from gateway.app import create_app
from gateway.backends.launcher import Backend, Progress
from gateway.lifecycle.supervisor import Supervisor
from gateway.registry.config import GatewaySettings, ModelEntry
from gateway.registry.load import load_registry
from gateway.reloader import ON_RELOAD, Reloader
from tests.support import wait_until

KEY = "sk-reload-test"
Response = Any  # what TestClient returns (its own httpx build)


class NoLauncher:
    async def launch(self, name: str, entry: ModelEntry, on_progress: Progress) -> Backend:
        raise RuntimeError("no worker is started in this test")


def registry_text(tmp_path: Path, gateway: dict[str, Any]) -> str:
    model = {"source": str(tmp_path), "memory_bytes": "1MiB"}
    models = {"a": model, "b": model}
    return json.dumps({"gateway": {"default_model": "a", **gateway}, "models": models})


class Served:
    """The app in process, with the file it was started from."""

    def __init__(self, tmp_path: Path, gateway: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.config = tmp_path / "models.yaml"
        self.config.write_text(registry_text(tmp_path, gateway))
        self.app = create_app(load_registry(self.config), launcher=NoLauncher())
        self.client = TestClient(self.app)

    @property
    def reloader(self) -> Reloader:
        reloader: Reloader = self.app.state.reloader
        return reloader

    @property
    def supervisor(self) -> Supervisor:
        supervisor: Supervisor = self.app.state.supervisor
        return supervisor

    def rewrite(self, gateway: dict[str, Any]) -> None:
        self.config.write_text(registry_text(self.tmp_path, gateway))

    def reload(self, key: str | None = KEY) -> Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.client.post("/admin/reload", headers=headers)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path, {"watch_config": False})
    with server.client:
        yield server


# -- every key has a decision, and a reload behaves as its report says --------------------

# A value other than the default for keys whose type gives no obvious one, or whose probe
# below needs a particular value; every other key gets one from its type.
CHANGED: dict[str, object] = {
    "host": "127.0.0.2",
    "default_model": "b",
    "memory_budget": {"cpu": 1000},
    "max_body_bytes": 1000,
    "cache_dir": "other-cache",
    "envs_dir": "other-envs",
    "cors_origins": ["https://new.example"],
    "auth": {"api_keys_env": "LLMGW_RELOAD_TEST_KEYS"},
    "cluster": "ray:auto",
}


def changed_value(key: str, field: FieldInfo) -> object:
    if key in CHANGED:
        return CHANGED[key]
    default = field.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if default is None:
        return 7.0
    raise AssertionError(f"gateway.{key}: add a changed value to CHANGED in {__file__}")


def chat(client: TestClient, model: str, size: int = 1) -> Response:
    body = {"model": model, "messages": [{"role": "user", "content": "x" * size}]}
    return client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": "Bearer " + KEY}
    )


def load(client: TestClient, model: str) -> Response:
    """An admin load: it retries at once a model whose last load failed."""
    return client.post(f"/admin/models/{model}/load", headers={"Authorization": "Bearer " + KEY})


def preflight(client: TestClient) -> Response:
    headers = {"Origin": "https://new.example", "Access-Control-Request-Method": "POST"}
    return client.options("/v1/chat/completions", headers=headers)


# What a live key changes, seen from outside: False with the defaults, True after the reload.
PROBES: dict[str, Callable[[Served], bool]] = {
    "auth": lambda s: s.client.get("/v1/models").status_code == 401,
    "max_body_bytes": lambda s: chat(s.client, "zzz", 5000).status_code == 413,
    "cors_origins": lambda s: "access-control-allow-origin" in preflight(s.client).headers,
    "default_model": lambda s: (
        s.client.post("/", json={"prompt": "x"}).status_code == 503
        and "'b'" in s.client.post("/", json={"prompt": "x"}).json()["error"]["message"]
    ),
    "memory_budget": lambda s: load(s.client, "a").json()["error"]["code"] == "too_big",
}


def test_every_gateway_key_has_a_reload_decision() -> None:
    undecided = set(GatewaySettings.model_fields) - set(ON_RELOAD)
    assert not undecided, f"decide in gateway/reloader.py ON_RELOAD: {sorted(undecided)}"
    assert set(ON_RELOAD) <= set(GatewaySettings.model_fields)  # no stale entries


@pytest.mark.parametrize("key", sorted(GatewaySettings.model_fields))
def test_a_reload_of_each_gateway_key_is_applied_or_reported_as_needing_a_restart(
    key: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMGW_RELOAD_TEST_KEYS", KEY)
    value = changed_value(key, GatewaySettings.model_fields[key])
    server = Served(tmp_path, {"watch_config": key == "watch_config"})
    with server.client, caplog.at_level(logging.INFO, logger="gateway.reloader"):
        probe = PROBES.get(key)
        assert probe is None or not probe(server)
        server.rewrite({"watch_config": key == "watch_config", key: value})
        report = server.reload().json()
        assert report["applied"] is True
        in_force = server.supervisor.registry.gateway
        if ON_RELOAD.get(key) == "live":
            assert report["restart_required"] == []
            assert probe is None or probe(server)
            # Every reader of the gateway settings reads the ones now in force.
            for reader in (server.supervisor.residency.settings, server.supervisor.prober.settings):
                assert reader() is in_force
        else:
            assert report["restart_required"] == [key]
            assert f"gateway.{key} changed: takes effect after a restart" in caplog.text
        assert getattr(in_force, key) != getattr(GatewaySettings(), key)


# -- API keys ------------------------------------------------------------------------------


def test_a_key_deleted_from_the_key_file_stops_working_at_the_reload(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-stays\nsk-goes\n")
    server = Served(tmp_path, {"watch_config": False, "auth": {"api_keys_file": str(keys)}})
    with server.client:
        get = server.client.get
        assert get("/v1/models", headers={"Authorization": "Bearer sk-goes"}).status_code == 200
        keys.write_text("sk-stays\n")
        report = server.reload("sk-stays").json()
        assert report["applied"] is True and report["keys_changed"] is True
        assert get("/v1/models", headers={"Authorization": "Bearer sk-goes"}).status_code == 401
        assert get("/v1/models", headers={"Authorization": "Bearer sk-stays"}).status_code == 200


@pytest.mark.parametrize("source", ["missing", "empty", "undecodable", "directory"])
def test_a_reload_whose_key_source_is_unusable_is_rejected_and_the_old_keys_stay(
    tmp_path: Path, source: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-old\n")
    server = Served(tmp_path, {"watch_config": False, "auth": {"api_keys_file": str(keys)}})
    with server.client:
        keys.unlink()
        if source == "empty":
            keys.write_text("# every key revoked\n")
        elif source == "undecodable":
            keys.write_bytes(b"sk-\xff\n")
        elif source == "directory":
            keys.mkdir()
        rejected = server.reload("sk-old")
        assert rejected.status_code == 400
        error = rejected.json()["error"]
        assert error["code"] == "invalid_config"
        assert "gateway.auth.api_keys_file" in error["message"]
        headers = {"Authorization": "Bearer sk-old"}
        assert server.client.get("/v1/models", headers=headers).status_code == 200
        assert server.client.get("/v1/models").status_code == 401
        described = server.client.get("/admin/config", headers=headers).json()
        assert "api_keys_file" in described["last_error"]


def test_a_key_file_given_relative_to_the_registry_is_read_from_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "keys").write_text("sk-relative\n")
    monkeypatch.chdir("/")
    server = Served(tmp_path, {"watch_config": False, "auth": {"api_keys_file": "keys"}})
    with server.client:
        headers = {"Authorization": "Bearer sk-relative"}
        assert server.client.get("/v1/models", headers=headers).status_code == 200


# -- the watcher ---------------------------------------------------------------------------


def test_the_watcher_reloads_when_only_the_key_file_changes(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-a\nsk-b\n")
    server = Served(tmp_path, {"auth": {"api_keys_file": str(keys)}})
    with server.client:
        keys.write_text("sk-a\n")
        assert wait_until(lambda: server.reloader.keys.api == ("sk-a",), timeout=10)
        headers = {"Authorization": "Bearer sk-b"}
        assert server.client.get("/v1/models", headers=headers).status_code == 401


def test_the_watcher_survives_an_unexpected_error_and_applies_the_next_edit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = Served(tmp_path, {})
    real_reload = server.reloader.reload
    calls = 0

    async def failing_once() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a fault nobody foresaw")
        return await real_reload()

    server.reloader.reload = failing_once  # type: ignore[method-assign]
    with server.client:
        server.rewrite({"default_model": "b"})
        assert wait_until(lambda: calls == 1, timeout=10)
        server.config.write_text(server.config.read_text() + "\n")  # a later edit
        assert wait_until(lambda: server.reloader.settings().default_model == "b", timeout=10)
    assert "reloading" in caplog.text and "a fault nobody foresaw" in caplog.text


@pytest.mark.parametrize("bad", [b"models: {a: {source: \xff}}\n", b"models: " + b"[" * 20000])
def test_the_watcher_rejects_an_unparsable_file_and_applies_the_next_good_one(
    tmp_path: Path, bad: bytes
) -> None:
    server = Served(tmp_path, {})
    with server.client:
        good = server.config.read_text()
        server.config.write_bytes(bad)
        assert wait_until(lambda: server.reloader.last_error is not None, timeout=10)
        rejected = server.reload()
        assert rejected.status_code == 400
        assert rejected.json()["error"]["code"] == "invalid_config"
        server.config.write_text(good.replace('"default_model": "a"', '"default_model": "b"'))
        assert wait_until(lambda: server.reloader.settings().default_model == "b", timeout=10)
        assert server.reloader.last_error is None


def test_watch_config_turned_on_by_a_reload_starts_watching(tmp_path: Path) -> None:
    server = Served(tmp_path, {"watch_config": False})
    with server.client:
        server.rewrite({"watch_config": True})
        assert server.reload().json()["restart_required"] == []
        server.rewrite({"watch_config": True, "default_model": "b"})  # no reload asked for
        assert wait_until(lambda: server.reloader.settings().default_model == "b", timeout=10)
