"""The playground page at `/`, driven in a real browser (Debian's Chromium, via Playwright).

Every test also checks that the page asked nothing of any other server: no
CDN, no fonts, no telemetry.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect

from tests.conftest import ARTIFACTS, Stack
from tests.support import start_api, wait_for

pytestmark = pytest.mark.integration

PNG_SRC = re.compile(r"^data:image/png;base64,")
# Test-side instrumentation: note the name of every server-sent event the page hears.
RECORD_EVENTS = """
window.heardEvents = [];
window.EventSource = class extends window.EventSource {
  addEventListener(name, listener, options) {
    const heard = (event) => { window.heardEvents.push(name); listener(event); };
    super.addEventListener(name, heard, options);
  }
};
"""


@contextmanager
def open_playground(browser: Browser, url: str) -> Iterator[Page]:
    """The page at ``url``, loaded; on leaving, check it requested nothing elsewhere."""
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    requests: list[str] = []
    try:
        page = context.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.add_init_script(RECORD_EVENTS)
        page.goto(f"{url}/")
        yield page
    finally:
        context.close()
    assert requests, "the page made no request at all"
    outside = [r for r in requests if not r.startswith((f"{url}/", "data:"))]
    assert not outside, f"the page reached outside {url}: {outside}"


def choose_image_options(page: Page, prompt: str, steps: int) -> None:
    expect(page.locator("#model option[value='demo-dit']")).to_have_count(1)
    page.select_option("#model", "demo-dit")
    page.fill("#prompt", prompt)
    page.select_option("#size", "64x64")
    page.fill("#steps", str(steps))
    page.fill("#seed", "7")


def shown_png(page: Page) -> Image.Image:
    expect(page.locator("#image")).to_have_attribute("src", PNG_SRC, timeout=60_000)
    src = page.get_attribute("#image", "src")
    assert src is not None
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def progress(page: Page) -> tuple[float, float]:
    value, total = page.eval_on_selector("#progress", "bar => [bar.value, bar.max]")
    return value, total


def test_the_page_generates_an_image_following_its_events(browser: Browser, stack: Stack) -> None:
    with open_playground(browser, stack.url) as page:
        expect(page).to_have_title("Hearth playground")
        # Only image models in the image panel, only embedding models in the other.
        assert "all-minilm-l6-v2" not in page.eval_on_selector_all(
            "#model option", "options => options.map(o => o.value)"
        )
        expect(page.locator("#embed-model option")).to_have_count(1)
        # 40 steps of 64x64 take the demo model a few hundred ms: the page's event
        # stream (open within ~50 ms of the job) hears its progress live.
        choose_image_options(page, "a lighthouse at dusk", steps=40)
        page.click("#generate")

        image = shown_png(page)
        assert image.size == (64, 64)
        assert progress(page) == (40, 40)
        heard = page.evaluate("window.heardEvents")
        assert "progress" in heard, heard
        assert heard[-1] == "succeeded", heard
        expect(page.locator("#error")).to_have_text("")
        expect(page.locator("#generate")).to_be_enabled()
        expect(page.locator("#cancel")).to_be_disabled()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "playground.png", full_page=True)


def test_the_cancel_button_stops_a_running_job(browser: Browser, stack: Stack) -> None:
    with open_playground(browser, stack.url) as page:
        choose_image_options(page, "a slow one", steps=150)
        page.select_option("#size", "256x256")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("step", timeout=30_000)
        page.click("#cancel")
        expect(page.locator("#status")).to_have_text("cancelled", timeout=30_000)
        expect(page.locator("#error")).not_to_be_empty()
        expect(page.locator("#image")).to_be_hidden()
        expect(page.locator("#generate")).to_be_enabled()
        value, total = progress(page)
        assert 0 < value < total == 150
        assert page.evaluate("window.heardEvents")[-1] == "cancelled"


def test_the_page_compares_two_texts(browser: Browser, stack: Stack) -> None:
    with open_playground(browser, stack.url) as page:
        expect(page.locator("#embed-model option")).to_have_count(1)
        page.fill("#text-a", "The cat sat on the mat.")
        page.fill("#text-b", "A kitten rested on the rug.")
        page.click("#compare")
        similarity = page.locator("#similarity")
        expect(similarity).to_have_text(re.compile(r"^-?\d\.\d{3}$"))
        assert -1.0 <= float(similarity.inner_text()) <= 1.0

        page.fill("#text-b", "The cat sat on the mat.")
        page.click("#compare")
        expect(similarity).to_have_text("1.000")
        expect(page.locator("#embed-error")).to_have_text("")


def test_with_api_keys_the_page_asks_for_one_and_polls(
    browser: Browser, stack: Stack, tmp_path: Path
) -> None:
    """EventSource sends no headers: with a key, the page polls the job instead."""
    api, url = start_api({**stack.env, "HEARTH_API_KEYS": "playground-key"}, tmp_path)
    try:
        wait_for(f"{url}/readyz", [api, stack.worker])
        with open_playground(browser, url) as page:
            expect(page.locator("#auth")).to_be_visible()
            expect(page.locator("#error")).to_contain_text("API key")
            page.fill("#api-key", "playground-key")
            page.click("#use-key")
            choose_image_options(page, "a fox in the snow", steps=4)
            page.click("#generate")
            assert shown_png(page).size == (64, 64)
            assert progress(page) == (4, 4)
            expect(page.locator("#error")).to_have_text("")
            assert page.evaluate("window.heardEvents") == []
    finally:
        api.stop()
