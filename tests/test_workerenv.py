"""A worker's environment: an allow-list, never a key source, whatever the names."""

from __future__ import annotations

import pytest

from gateway.backends.workerenv import worker_environment
from gateway.registry.config import Registry, key_sources
from gateway.registry.load import ConfigError, parse_registry

GATEWAY_ENV = {
    "PATH": "/usr/bin",
    "HOME": "/home/me",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HF_HOME": "/cache/hf",
    "HF_TOKEN": "hub-token",  # the hub's own credential: a worker may download
    "CUDA_HOME": "/usr/local/cuda",
    "OMP_NUM_THREADS": "4",
    "PYTHONPATH": "/src",
    "LLMGW_LOG_LEVEL": "DEBUG",
    "GW_API_KEYS": "user-key",
    "HF_ADMIN_KEYS": "admin-key",
    "TORCH_UPSTREAM_KEY": "upstream-key",
    "AWS_SECRET_ACCESS_KEY": "cloud",
    "DATABASE_URL": "postgres://user:pw@db",
    "LLMGW_API_KEYS": "left in the shell",  # not a key source of this registry: a key still
    "HF_SECRET": "likewise",
    "CUDA_DEVICE_ORDER": "FASTEST_FIRST",
}
SECRETS = frozenset({"GW_API_KEYS", "HF_ADMIN_KEYS", "TORCH_UPSTREAM_KEY"})


def build(entry_env: dict[str, str] | None = None) -> dict[str, str]:
    return worker_environment(GATEWAY_ENV, SECRETS, entry_env or {}, {"LLMGW_WORKER_SPEC": "{}"})


def test_only_allowed_variables_pass_and_key_sources_never_even_with_an_allowed_prefix() -> None:
    env = build()
    for name in ("PATH", "HOME", "LANG", "LC_ALL", "HF_HOME", "HF_TOKEN", "CUDA_HOME"):
        assert env[name] == GATEWAY_ENV[name]
    assert env["OMP_NUM_THREADS"] == "4" and env["LLMGW_LOG_LEVEL"] == "DEBUG"
    for name in (*SECRETS, "AWS_SECRET_ACCESS_KEY", "DATABASE_URL", "LLMGW_API_KEYS", "HF_SECRET"):
        assert name not in env
    assert env["LLMGW_WORKER_SPEC"] == "{}"


def test_devices_are_numbered_as_nvidia_smi_does_unless_the_registry_says_otherwise() -> None:
    assert build()["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert build({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_the_registry_env_is_applied_as_written_but_the_gateway_settings_win() -> None:
    env = build({"use_triton": "False", "CUSTOM": "1", "LLMGW_WORKER_SPEC": "forged"})
    assert env["use_triton"] == "False" and env["CUSTOM"] == "1"
    assert env["LLMGW_WORKER_SPEC"] == "{}"


def test_a_key_source_in_an_entry_env_never_reaches_the_worker() -> None:
    assert "GW_API_KEYS" not in build({"GW_API_KEYS": "smuggled"})


REGISTRY = """
gateway:
  auth: {api_keys_env: GW_API_KEYS, admin_keys_env: HF_ADMIN_KEYS}
models:
  local:
    source: /models/tiny
    env: {ENV_LINE}
  remote: {upstream: {url: "http://upstream", api_key_env: TORCH_UPSTREAM_KEY}}
"""


def registry(env: str) -> Registry:
    return parse_registry(REGISTRY.replace("{ENV_LINE}", env))


def test_the_key_sources_are_the_auth_and_every_upstream_variable() -> None:
    assert key_sources(registry("{}")) == SECRETS


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_a_model_env_that_names_a_key_source_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        registry(f"{{{name}: x}}")
    rendered = caught.value.render()
    assert f"models.local.env.{name}" in rendered and "holds API keys" in rendered
