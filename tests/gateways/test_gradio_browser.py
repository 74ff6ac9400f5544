"""A real browser (Playwright driving Debian's chromium) logs in to the chat page and watches a reply stream in.

The worker is the synthetic engine (fake tokens, no model): the test checks the page, not a model.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.gateways.test_gradio import PASSWORD, USER, start_ui
from tests.support import ProcessGroup

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is missing: `make test` installs it with apt-get (apt-get install -y chromium)",
    ),
]


def test_page_logs_in_and_streams_a_reply(
    processes: ProcessGroup, broker_url: str, tmp_path: Path, artifacts_dir: Path
) -> None:
    from playwright.sync_api import sync_playwright

    url = start_ui(processes, broker_url, tmp_path)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url)
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()

            box = page.locator("#message textarea")
            box.wait_for(timeout=30_000)
            # The model list comes from the bus on page load.
            page.wait_for_function(
                "() => [...document.querySelectorAll('input')].some(i => i.value === 'syn')", timeout=30_000
            )
            box.fill("Hello from a real browser")
            box.press("Enter")

            reply = page.locator("#chatbot .message-row.bot-row, #chatbot [data-testid='bot']").last
            lengths: list[int] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                text = reply.inner_text() if reply.count() else ""
                if text and (not lengths or lengths[-1] != len(text)):
                    lengths.append(len(text))
                if "tokens/s" in text:
                    break
                time.sleep(0.05)
            page.screenshot(path=str(artifacts_dir / "gradio-chat.png"), full_page=True)
            assert "tokens/s" in text and "worker syn-1" in text, text
            assert len(lengths) >= 3, f"the reply did not stream in (text lengths seen: {lengths})"
            assert page.get_by_text("Hello from a real browser").count() >= 1
        finally:
            browser.close()
