"""The playground's page and assets: served open, with a strict policy, switchable live."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.api.routes.playground import CSP
from gateway.app import create_app
from gateway.backends.launcher import Backend, Progress
from gateway.registry.config import RESERVED_NAMES
from gateway.registry.load import ConfigError, load_registry, parse_registry

KEY = "playground-test-key"
ASSETS = {
    "/playground": "text/html",
    "/playground/app.js": "text/javascript",
    "/playground/markdown.js": "text/javascript",
    "/playground/style.css": "text/css",
}


class NoLauncher:
    async def launch(self, name: str, entry: object, on_progress: Progress) -> Backend:
        raise AssertionError("no model is loaded in this test")


def config_text(directory: Path, playground: bool | None = None, auth: bool = False) -> str:
    lines = ["gateway:", "  watch_config: false"]
    if playground is not None:
        lines.append(f"  playground: {str(playground).lower()}")
    if auth:
        lines.append("  auth: {api_keys_env: PLAYGROUND_TEST_KEYS}")
    return "\n".join([*lines, "models:", f"  m: {{source: {directory}}}", ""])


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("PLAYGROUND_TEST_KEYS", KEY)
    config = tmp_path / "models.yaml"
    config.write_text(config_text(tmp_path, auth=True))
    app = create_app(load_registry(config), launcher=NoLauncher())
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(("path", "kind"), ASSETS.items())
def test_the_page_and_its_assets_load_without_a_key_under_a_strict_policy(
    client: TestClient, path: str, kind: str
) -> None:
    reply = client.get(path)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith(kind)
    assert reply.headers["content-security-policy"] == CSP
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert "'unsafe-inline'" not in CSP and "default-src 'none'" in CSP


def test_the_page_has_no_inline_script_or_style(client: TestClient) -> None:
    html = client.get("/playground").text
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    assert not re.search(r"<[^>]*\son\w+\s*=", html)  # no onclick= and the like
    assert '<script src="/playground/app.js" defer></script>' in html


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/playground/secret.txt"),
        ("GET", "/playground/../v1/models"),
        ("GET", "/playground/index.html/x"),
        ("POST", "/playground"),
        ("POST", "/health"),
        ("POST", "/ready"),
        ("GET", "/admin/events"),
    ],
)
def test_everything_but_the_page_and_its_assets_still_needs_a_key(
    client: TestClient, method: str, path: str
) -> None:
    assert client.request(method, path).status_code == 401


def test_an_unknown_playground_file_is_a_404_with_a_key(client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/playground/index.html", headers=headers).status_code == 404
    assert client.get("/playground/nope.js", headers=headers).status_code == 404


def test_playground_is_a_reserved_model_name() -> None:
    assert "playground" in RESERVED_NAMES
    with pytest.raises(ConfigError, match="playground"):
        parse_registry("models:\n  playground: {source: ./m}\n")


def test_the_playground_can_be_turned_off(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(config_text(tmp_path, playground=False))
    app = create_app(load_registry(config), launcher=NoLauncher())
    with TestClient(app) as client:
        for path in ASSETS:
            assert client.get(path).status_code == 404


def test_a_reload_that_turns_the_playground_off_and_on_takes_effect(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(config_text(tmp_path))
    app = create_app(load_registry(config), launcher=NoLauncher())
    with TestClient(app) as client:
        assert client.get("/playground").status_code == 200
        config.write_text(config_text(tmp_path, playground=False))
        assert client.post("/admin/reload").json()["applied"] is True
        assert client.get("/playground").status_code == 404
        assert client.get("/playground/app.js").status_code == 404
        config.write_text(config_text(tmp_path, playground=True))
        assert client.post("/admin/reload").json()["applied"] is True
        assert client.get("/playground").status_code == 200
