"""Refresh docs/playground.png and docs/playground-phone.png from the demo model.

    make demo && .venv/bin/python -m tests.browser.screenshots [.cache/demo-model]

Not a test: it takes the README's pictures of a real chat with the demo model.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.browser.conftest import ARGS, CHROMIUM
from tests.support import ROOT, Gateway, write_config

VIEWS = {"playground.png": (1100, 940), "playground-phone.png": (375, 1400)}
CONFIG = """
gateway:
  default_model: demo
models:
  demo:
    description: Tiny local demo chat model
    source: {demo}
    dtype: float32
  deepseek-moe:
    description: DeepSeek-MoE-16B-chat
    source: {directory}/not-downloaded
    devices: [0, 1]
    max_memory: {{0: 22GiB, 1: 22GiB}}
    auto_pull: false
"""


def chat(page: Any, prompts: list[str]) -> None:
    from playwright.sync_api import expect

    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("64")
    for done, prompt in enumerate(prompts, start=1):
        page.get_by_label("Message", exact=True).fill(prompt)
        page.get_by_role("button", name="Send").click()
        replies = page.locator('.turn.assistant[data-outcome="done"]')
        expect(replies).to_have_count(done, timeout=60_000)


def main(demo: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    directory = Path(tempfile.mkdtemp(prefix="llmgw-shots-"))
    config = write_config(directory, CONFIG.format(demo=demo.resolve(), directory=directory))
    with Gateway(config) as gateway, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        for name, (width, height) in VIEWS.items():
            phone = width < 500
            context = browser.new_context(
                viewport={"width": width, "height": height}, is_mobile=phone
            )
            page = context.new_page()
            page.goto(f"{gateway.url}/playground")
            expect(page.locator("[data-model]")).to_have_count(2)
            chat(page, ["hello", "who are you?"])
            page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
            page.screenshot(path=str(ROOT / "docs" / name), full_page=not phone)
            context.close()
        browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".cache" / "demo-model"))
