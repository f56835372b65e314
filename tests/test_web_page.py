"""The web page in a real browser (Debian's chromium, headless, driven by Playwright) against a real server:
generate on tiny weights with the progress bar reaching 100 %, then watch a second job's live preview and
cancel it."""

import base64
import io
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_server import AUTH, KEY, start_server

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(["--models", "SD1.5,SDXL-turbo", "--workers", "1"])
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_generate_watch_progress_and_cancel_in_a_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium package (.ci/run does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server)
        assert page.title() == "sdaot"
        page.fill("#api-key", KEY)
        page.click("#save-key")
        expect(page.locator("#model option")).to_have_count(2)
        page.select_option("#model", "SD1.5")
        assert page.input_value("#size") == "512x512" and "native" in page.inner_text("#size")
        page.select_option("#size", "64x64")
        page.select_option("#sampler", "Euler")
        page.fill("#steps", "8")
        page.fill("#seed", "7")
        page.evaluate("window.seen = []; setInterval(() => seen.push(document.getElementById('progress').value), 5)")
        page.click("#generate")
        page.wait_for_selector("#results figure img", timeout=180_000)
        assert page.eval_on_selector("#progress", "p => p.value") == 100
        assert max(page.evaluate("window.seen")) == 100
        assert page.inner_text("#progress-text").startswith("succeeded: step 8/8")
        assert "seed 7" in page.inner_text("#results figcaption")
        assert page.locator("#preview").is_hidden(), "the finished image replaces the live preview"
        src = page.get_attribute("#results figure img", "src")
        assert page.get_attribute("#results figure a", "href") == src
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.size == (64, 64) and image.format == "PNG"
        page.screenshot(path=os.environ.get("SDAOT_SCREENSHOT", str(tmp_path / "web-page.png")))

        page.select_option("#size", "256x256")
        page.fill("#steps", "150")
        page.fill("#preview-every", "1")
        page.click("#generate")
        expect(page.locator("#progress-text")).to_contain_text(re.compile("step [1-9]"), timeout=120_000)
        expect(page.locator("#preview")).to_be_visible(timeout=120_000)
        preview = page.get_attribute("#preview", "src")
        assert preview.startswith("data:image/webp;base64,")
        shown = Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1])))
        assert shown.format == "WEBP" and shown.size == (256, 256)
        assert len(set(shown.convert("RGB").getdata())) > 16, "a preview is a picture, not a flat colour"
        page.click("#cancel")
        expect(page.locator("#message")).to_have_text("cancelled", timeout=120_000)
        job_id = page.get_attribute("#progress-area", "data-job")
        job = httpx.get(f"{server}/v1/jobs/{job_id}", headers=AUTH, timeout=60).json()
        assert job["status"] == "cancelled" and 1 <= job["step"] < 150, job
        assert page.locator("#results figure").count() == 1
        browser.close()
