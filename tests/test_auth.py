"""API keys on every route, through the real gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.api.auth import Keys, KeySourceError, check, load_keys
from gateway.registry.config import Auth
from tests.support import Gateway, write_config

USER = "user-key-123"
ADMIN = "admin-key-456"


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config, env = auth_config(tiny_model, tmp_path_factory.mktemp("auth"))
    with Gateway(config, env=env) as gw:
        yield gw


def auth_config(tiny_model: Path, directory: Path) -> tuple[Path, dict[str, str]]:
    """The registry and environment of these tests (tests/test_cluster_front_door.py too)."""
    keys = directory / "admin-keys"
    keys.write_text(f"# admins\n{ADMIN}\n\n")
    config = write_config(
        directory,
        f"""
        gateway:
          default_model: tiny
          auth: {{api_keys_env: TEST_API_KEYS, admin_keys_file: {keys}}}
          cors_origins: ["https://app.example"]
        models:
          tiny: {{source: {tiny_model}}}
        """,
    )
    return config, {"TEST_API_KEYS": f"other-key, {USER}"}


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
Route = tuple[str, str, object]
ROUTES: list[Route] = [
    ("POST", "/tiny", {"prompt": "hi", "max_length": 1}),
    ("POST", "/", {"prompt": "hi", "max_length": 1}),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/v1/no-such-route", None),
]
ADMIN_ROUTES: list[Route] = [
    ("GET", "/admin/config", None),
    ("POST", "/admin/reload", None),
    ("POST", "/admin/models/tiny/load", None),
]


def call(gw: Gateway, method: str, path: str, body: object, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return gw.client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES + ADMIN_ROUTES)
def test_without_a_key_every_route_but_health_is_401(
    gateway: Gateway, method: str, path: str, body: object
) -> None:
    reply = call(gateway, method, path, body, None)
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert reply.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES + ADMIN_ROUTES)
def test_a_wrong_key_is_401(gateway: Gateway, method: str, path: str, body: object) -> None:
    assert call(gateway, method, path, body, "user-key-12").status_code == 401


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_an_api_key_opens_the_api(gateway: Gateway, method: str, path: str, body: object) -> None:
    reply = call(gateway, method, path, body, USER)
    assert reply.status_code == (404 if path == "/v1/no-such-route" else 200)


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_an_api_key_is_403_on_admin_routes_and_an_admin_key_opens_them(
    gateway: Gateway, method: str, path: str, body: object
) -> None:
    forbidden = call(gateway, method, path, body, USER)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["type"] == "permission_error"
    assert call(gateway, method, path, body, ADMIN).status_code == 200


def test_health_and_ready_stay_open(gateway: Gateway) -> None:
    assert gateway.client.get("/health").status_code == 200
    assert gateway.client.get("/ready").status_code == 200


def test_a_cors_preflight_needs_no_key_and_names_the_origin(gateway: Gateway) -> None:
    reply = gateway.client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == "https://app.example"
    other = gateway.client.options(
        "/v1/models",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_the_scheme_must_be_bearer() -> None:
    keys = Keys(api=(USER,))
    headers = {b"authorization": f"Basic {USER}".encode()}
    assert check(keys, "/v1/models", "GET", headers) is not None
    assert check(keys, "/v1/models", "GET", {b"authorization": f"bearer {USER}".encode()}) is None


def test_without_admin_keys_an_api_key_opens_admin_routes() -> None:
    headers = {b"authorization": f"Bearer {USER}".encode()}
    assert check(Keys(api=(USER,)), "/admin/config", "GET", headers) is None


def test_a_named_key_source_that_is_missing_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(KeySourceError, match="NOT_SET_ANYWHERE"):
        load_keys(Auth(api_keys_env="NOT_SET_ANYWHERE"))
    with pytest.raises(KeySourceError, match=r"key file .*absent: cannot read the file"):
        load_keys(Auth(api_keys_file=str(tmp_path / "absent")))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(KeySourceError, match="no keys"):
        load_keys(Auth(api_keys_file=str(empty)))


def test_serve_refuses_to_start_when_a_key_source_is_missing(
    tmp_path: Path, tiny_model: Path
) -> None:
    config = write_config(
        tmp_path,
        "gateway: {auth: {api_keys_env: SURELY_UNSET_VAR}}\n"
        f"models: {{m: {{source: {tiny_model}}}}}\n",
    )
    with pytest.raises(RuntimeError, match="SURELY_UNSET_VAR"):
        Gateway(config)
