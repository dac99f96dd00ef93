"""The playground with API keys on: it asks for them, and says so when one is wrong."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support import Gateway, write_config

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser  # run by `make test-browser`, not `make test`

USER = "user-key-ab'c"  # a quote, so the curl must quote it
ADMIN = "admin-key-456"


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = write_config(
        tmp_path_factory.mktemp("playground-auth"),
        f"""
        gateway:
          auth: {{api_keys_env: PLAYGROUND_KEYS, admin_keys_env: PLAYGROUND_ADMIN_KEYS}}
        models:
          tiny: {{source: {tiny_model}}}
        """,
    )
    env = {"PLAYGROUND_KEYS": USER, "PLAYGROUND_ADMIN_KEYS": ADMIN}
    with Gateway(config, env=env) as gw:
        yield gw


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def give_keys(page: Page, api: str, admin: str = "") -> None:
    page.get_by_label("API key").fill(api)
    page.get_by_label("Admin key").fill(admin)
    page.get_by_role("button", name="Save keys").click()


def test_the_page_asks_for_a_key_and_a_wrong_one_shows_an_error(
    page: Page, gateway: Gateway
) -> None:
    response = page.goto(f"{gateway.url}/playground")
    assert response is not None and response.status == 200
    expect(page.locator("#keys")).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text("This needs an API key")
    expect(page.get_by_label("API key")).to_be_focused()

    give_keys(page, "wrong-key")
    expect(page.get_by_role("alert")).to_contain_text("refused the API key")
    expect(page.locator("h1")).to_be_visible()  # an error, not a blank page
    expect(page.locator("[data-model]")).to_have_count(0)

    give_keys(page, USER)
    expect(page.locator('[data-model="tiny"]')).to_be_visible()
    expect(page.get_by_role("alert")).to_be_hidden()
    expect(page.locator("#keys")).to_be_hidden()
    # The key lasts for the tab: a reload keeps it, and it never went into localStorage.
    page.reload()
    expect(page.locator('[data-model="tiny"]')).to_be_visible()
    assert page.evaluate("localStorage.length") == 0


def test_admin_actions_ask_for_the_admin_key(page: Page, gateway: Gateway) -> None:
    page.goto(f"{gateway.url}/playground")
    give_keys(page, USER)
    expect(page.locator("#live")).to_contain_text("need the admin key")
    page.get_by_role("button", name="Load tiny", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("admin key")
    expect(page.get_by_label("Admin key")).to_be_focused()

    give_keys(page, USER, ADMIN)
    expect(page.locator("#live")).to_contain_text("Live")
    page.get_by_role("button", name="Load tiny", exact=True).click()
    state = page.locator('[data-model="tiny"] [data-field="state"]')
    expect(state).to_have_text("ready", timeout=60_000)
    page.get_by_role("button", name="Unload tiny", exact=True).click()
    expect(state).to_have_text("unloaded", timeout=30_000)


def test_a_chat_with_a_key_and_the_curl_carries_it(page: Page, gateway: Gateway) -> None:
    page.goto(f"{gateway.url}/playground")
    give_keys(page, USER)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_label("Message").fill("hi")
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".turn.assistant").last
    expect(reply).to_have_attribute("data-outcome", "done", timeout=60_000)
    curl = page.locator("#curl").inner_text()
    assert "-H 'Authorization: Bearer user-key-ab'\\''c'" in curl
    seed = subprocess.run(
        ["bash", "-c", curl.replace("curl ", "curl -sS --fail-with-body ", 1)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(seed.stdout)["usage"]["completion_tokens"] >= 1
