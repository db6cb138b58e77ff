"""End to end in headless Chromium: upload, ask twice, and see the answer, verdict, domain notice, heatmap and boxes.

Playwright drives the system Chromium (`executable_path`), so nothing is downloaded; the browser's own
DNS is pinned to nowhere except 127.0.0.1 and the test fails if the page requests anything off the machine.
The screenshot lands in test-artifacts/app.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from assistant.domain import fit_domain
from assistant.engine import Conversation
from tests.helpers import ROOT, expected_answer, scene, texture

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
SCREENSHOT = ROOT / "test-artifacts" / "app.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    off_machine: list[str] = []
    page.on(
        "request",
        lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else off_machine.append(r.url),
    )
    page.goto(app_url, wait_until="load")  # never "networkidle": Gradio keeps an event stream open
    playwright.expect(page.locator("#chatbot")).to_be_visible(timeout=30_000)
    yield page
    context.close()
    assert off_machine == [], f"the page reached beyond this machine: {off_machine}"


def ask(page, question: str) -> str:
    """Type, send, and wait for the streamed answer to finish; returns its text."""
    answers, box = page.locator("#chatbot [data-testid=bot]"), page.locator("#question textarea")
    count = answers.count()
    box.fill(question)
    box.press("Enter")
    playwright.expect(answers).to_have_count(count + 1, timeout=60_000)  # streaming, the question box locked
    playwright.expect(box).to_be_enabled(timeout=60_000)  # unlocked once the turn has ended
    return answers.last.inner_text()


def image_shown(page, selector: str) -> None:
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0 }", arg=selector
    )


def words(text: str) -> list[str]:
    return text.split()


@pytest.fixture
def textile_domain(app_engine):
    """The engine's model told it knows grey textures only: a colourful scene is then out of its domain."""
    app_engine.domain = fit_domain(app_engine, [texture(seed) for seed in range(30)], source="grey textures")
    yield
    app_engine.domain = None


def test_upload_ask_twice_and_see_answer_verdict_heatmap_and_boxes(page, app_engine, textile_domain, tmp_path):
    expect = playwright.expect
    part, junk = tmp_path / "part.png", tmp_path / "junk.png"
    scene(3, size=160).save(part)  # anomalous all the same: the test engine's expert calls everything so
    junk.write_text("not an image")

    page.locator("#image input[type=file]").set_input_files(str(junk))
    expect(page.locator("[data-testid=toast-body]")).to_contain_text("not a recognised image format", timeout=10_000)
    page.locator("[data-testid=toast-close]").first.click()

    page.locator("#image input[type=file]").set_input_files(str(part))
    expect(page.locator("#image img")).to_be_visible()
    first = ask(page, "Is there a defect?")
    conversation = Conversation.start(part, "Is there a defect?")
    assert words(first) == words(expected_answer(app_engine, conversation))
    expect(page.locator("#chatbot [data-testid=user] img")).to_have_count(1)  # the photo opens the chat
    expect(page.locator("#verdict [data-testid=label-output-value]")).to_have_text("Anomalous")
    expect(page.locator("#verdict [data-testid=Anomalous-confidence-set]")).to_contain_text("%")
    assert app_engine.analyze(part).in_domain is False
    expect(page.locator("#domain")).to_contain_text("Out of domain")  # beside the verdict, in the screenshot
    image_shown(page, "#heatmap img")
    image_shown(page, "#rois img.base-image")
    expect(page.locator("#rois .legend-item").first).to_contain_text("region 1")

    second = ask(page, "Where is it?")
    expect(page.locator("#chatbot [data-testid=user]")).to_have_count(3)  # photo, question, question
    conversation.answer(expected_answer(app_engine, conversation)).ask("Where is it?")
    assert words(second) == words(expected_answer(app_engine, conversation))
    expect(page.locator("#verdict [data-testid=label-output-value]")).to_have_text("Anomalous")

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
