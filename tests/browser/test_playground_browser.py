"""The playground in a real browser against the real gateway and a tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.api.routes.playground import CSP
from tests.browser.conftest import Console
from tests.support import Gateway, wait_until, write_config

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.browser  # run by `make test-browser`, not `make test`

ROUTE = "/v1/chat/completions"


@pytest.fixture(scope="module")
def gateway(
    tiny_model: Path, tiny_model_b: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    config = write_config(
        tmp_path_factory.mktemp("playground"),
        f"""
        gateway:
          default_model: tiny
        models:
          tiny:
            description: the first tiny model
            source: {tiny_model}
          other:
            source: {tiny_model_b}
        """,
    )
    with Gateway(config) as gw:
        yield gw


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def open_page(page: Page, gateway: Gateway) -> None:
    response = page.goto(f"{gateway.url}/playground")
    assert response is not None and response.status == 200
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"


def state_of(page: Page, model: str) -> Any:
    return page.locator(f'[data-model="{model}"] [data-field="state"]')


def send(page: Page, prompt: str, *, temperature: str, max_tokens: str) -> Any:
    page.get_by_label("Temperature").fill(temperature)
    page.get_by_label("Max tokens").fill(max_tokens)
    page.get_by_label("Message").fill(prompt)
    page.get_by_role("button", name="Send").click()
    return page.locator(".turn.assistant").last


def rendered(page: Page, markdown: str) -> str:
    """The text the page's own renderer makes of `markdown`."""
    text: str = page.evaluate(
        "t => { const d = document.createElement('div'); d.append(renderMarkdown(t));"
        " return d.textContent }",
        markdown,
    )
    return text


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    """Into tmp_path, or LLMGW_SCREENSHOTS (the README's come from tests/browser/screenshots.py)."""
    page.screenshot(path=str(Path(os.environ.get("LLMGW_SCREENSHOTS", tmp_path)) / name))


def scrape(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = gateway.client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_page_lists_the_models_with_their_state(
    page: Page, gateway: Gateway, console: Console
) -> None:
    open_page(page, gateway)
    expect(page.locator("[data-model]")).to_have_count(2)
    for name in ("tiny", "other"):
        item = page.locator(f'[data-model="{name}"]')
        expect(item.locator("h3")).to_contain_text(name)
        expect(item.locator('[data-field="state"]')).to_have_text(gateway.models()[name]["state"])
        expect(item.locator('[data-field="device"]')).to_have_text("cpu")
    expect(page.get_by_label("Model", exact=True)).to_have_value("tiny")  # the default model
    expect(page.locator("#live")).to_contain_text("Live")
    assert console.errors == []


def test_every_control_has_a_label_and_text_meets_contrast(page: Page, gateway: Gateway) -> None:
    open_page(page, gateway)
    expect(page.locator("[data-model]")).to_have_count(2)
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !el.textContent.trim())
            .map(el => el.id || el.outerHTML)"""
    )
    assert unlabelled == []
    expect(page.locator("#log")).to_have_attribute("aria-live", "polite")
    ratios = page.evaluate(CONTRAST)
    low = {selector: ratio for selector, ratio in ratios.items() if ratio < 4.5}
    assert low == {}
    assert len(ratios) >= 8


# The WCAG contrast ratio of each selector's text against its nearest opaque background.
CONTRAST = """() => {
  const rgb = s => s.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => {
    const f = c => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = el => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255];
  };
  const out = {};
  for (const sel of ['body', 'h1', '.muted', 'label', 'button', 'button.secondary',
                     'button.danger', 'button:disabled', '.state', 'dt', 'input', 'code']) {
    const el = document.querySelector(sel);
    if (!el) continue;
    const a = lum(rgb(getComputedStyle(el).color)), b = lum(background(el));
    out[sel] = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  }
  return out;
}"""


def test_a_chat_streams_the_api_greedy_reply_and_the_curl_for_it_works(
    page: Page, gateway: Gateway, console: Console, tmp_path: Path
) -> None:
    prompt = 'Don\'t say "$HOME" or `ls`'  # quotes and shell syntax the curl must keep
    api = gateway.post(
        ROUTE,
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 24,
        },
    ).json()
    expected = api["choices"][0]["message"]["content"]
    usage = api["usage"]
    open_page(page, gateway)
    reply = send(page, prompt, temperature="0", max_tokens="24")
    expect(reply).to_have_attribute("data-outcome", "done", timeout=60_000)
    assert reply.locator(".body").text_content() == rendered(page, expected)
    stats = reply.locator(".stats").inner_text()
    assert re.search(r"first token \d+ ms", stats)
    assert f"{usage['prompt_tokens']} + {usage['completion_tokens']} = " in stats
    if usage["completion_tokens"] > 1:
        assert re.search(r"[\d.]+ tokens/s", stats)

    curl = page.locator("#curl").inner_text()
    assert curl.startswith(f"curl '{gateway.url}/tiny'")
    assert "Authorization" not in curl  # no key given, none shown
    seed = subprocess.run(
        ["bash", "-c", curl.replace("curl ", "curl -sS ", 1)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(seed.stdout)["response"] == expected
    assert console.errors == []
    screenshot(page, "playground.png", tmp_path)


def test_stop_cancels_the_reply_mid_stream_and_the_gateway_counts_it(
    page: Page, gateway: Gateway, console: Console
) -> None:
    gateway.post("/admin/models/tiny/load")
    open_page(page, gateway)
    stop = page.get_by_role("button", name="Stop")
    for _ in range(5):  # the random tiny model may reach its end before Stop is pressed
        before = scrape(gateway)
        reply = send(page, "Tell me a long story", temperature="1", max_tokens="900")
        expect(reply.locator(".body")).not_to_be_empty(timeout=60_000)
        if stop.is_enabled():
            stop.click()
        expect(reply).to_have_attribute("data-outcome", re.compile(".+"))
        if reply.get_attribute("data-outcome") == "stopped":
            break
    expect(reply).to_have_attribute("data-outcome", "stopped")
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return scrape(gateway).get(key, 0.0) - before.get(key, 0.0)

    assert wait_until(lambda: delta("llmgw_cancelled_requests_total", model="tiny") == 1)
    closed = {"model": "tiny", "route": ROUTE}
    assert wait_until(lambda: delta("llmgw_requests_total", **closed, status="499") == 1)
    assert delta("llmgw_requests_total", **closed, status="200") == 0
    assert console.errors == []


def test_load_and_unload_change_the_state_shown_without_a_reload(
    page: Page, gateway: Gateway, console: Console
) -> None:
    gateway.post("/admin/models/other/unload")
    open_page(page, gateway)
    expect(state_of(page, "other")).to_have_text("unloaded")
    page.evaluate("window.notReloaded = true")
    page.get_by_role("button", name="Load other", exact=True).click()
    expect(state_of(page, "other")).to_have_text("ready", timeout=60_000)
    expect(page.locator('[data-model="other"] [data-field="memory"]')).not_to_have_text("—")
    page.get_by_role("button", name="Unload other", exact=True).click()
    expect(state_of(page, "other")).to_have_text("unloaded", timeout=30_000)
    # A change made elsewhere arrives over the event stream.
    assert gateway.post("/admin/models/other/load").status_code == 200
    expect(state_of(page, "other")).to_have_text("ready", timeout=30_000)
    assert page.evaluate("window.notReloaded") is True
    gateway.post("/admin/models/other/unload")
    assert console.errors == []


MARKDOWN_REPLY = (
    "Here is **bold**, *italic* and `a <b>tag</b>`.\n\n"
    "- one\n- two\n\n1. first\n2. second\n\n"
    "```python\nprint('<script>window.pwned = 1</script>')\n```\n"
    '<img src=x onerror="window.pwned = 1"> and <script>window.pwned = 1</script>'
)


def test_a_reply_is_rendered_as_markdown_and_never_as_html(
    page: Page, gateway: Gateway, console: Console
) -> None:
    def chunk(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body)}\n\n"

    words = re.findall(r"\S+|\s+", MARKDOWN_REPLY)
    stream = "".join(chunk({"choices": [{"delta": {"content": w}}]}) for w in words)
    stream += chunk(
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}
    )
    stream += "data: [DONE]\n\n"
    # A fake upstream at the HTTP seam: the page's own fetch, parser and renderer run.
    page.route(
        f"**{ROUTE}",
        lambda route: route.fulfill(
            status=200, headers={"content-type": "text/event-stream"}, body=stream
        ),
    )
    open_page(page, gateway)
    reply = send(page, "markdown please", temperature="0", max_tokens="50")
    expect(reply).to_have_attribute("data-outcome", "done")
    body = reply.locator(".body")
    expect(body.locator("strong")).to_have_text("bold")
    expect(body.locator("em")).to_have_text("italic")
    expect(body.locator("p code")).to_have_text("a <b>tag</b>")
    expect(body.locator("ul > li")).to_have_count(2)
    expect(body.locator("ol > li")).to_have_text(["first", "second"])
    expect(body.locator("pre code")).to_have_text("print('<script>window.pwned = 1</script>')")
    expect(body).to_contain_text('<img src=x onerror="window.pwned = 1">')
    assert body.locator("img, script, b").count() == 0
    assert page.evaluate("window.pwned") is None
    expect(reply.locator(".stats")).to_contain_text("3 + 9 = 12 tokens")
    assert console.errors == []


def test_the_chat_works_from_the_keyboard(page: Page, gateway: Gateway) -> None:
    open_page(page, gateway)
    expect(page.locator("[data-model]")).to_have_count(2)
    for _ in range(40):
        if page.evaluate("document.activeElement.id") == "prompt":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.type("hello")
    page.keyboard.press("Enter")
    expect(page.locator(".turn.assistant").last).to_have_attribute(
        "data-outcome", "done", timeout=60_000
    )
    assert page.evaluate("document.activeElement.id") == "prompt"


def test_the_page_fits_a_phone_screen(browser: Browser, gateway: Gateway, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 812}, is_mobile=True)
    try:
        page = context.new_page()
        open_page(page, gateway)
        expect(page.locator("[data-model]")).to_have_count(2)
        reply = send(page, "hello", temperature="0", max_tokens="16")
        expect(reply).to_have_attribute("data-outcome", "done", timeout=60_000)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        for name in ("Message", "Temperature", "Max tokens", "Model"):
            box = page.get_by_label(name, exact=True).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375
        screenshot(page, "playground-phone.png", tmp_path)
    finally:
        context.close()
