"""The browser view in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
send a prompt, watch canvas frames arrive, see the final answer, replay, take a screenshot.

Outside CI the test skips when no browser is installed; in CI (CI=true) a missing browser fails."""

import os
import shutil
import time
from pathlib import Path

import pytest

from server_utils import running_server

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
SHOTS = Path(os.environ.get("DIFFUSIONGEMMA_SCREENSHOTS", Path(__file__).parent.parent / "docs"))


def _need_browser():
    if CHROMIUM and DRIVER:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI=true but chromium/chromedriver are missing (apt-get install chromium chromium-driver)")
    pytest.skip("no chromium/chromedriver on this machine")


@pytest.fixture
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def test_page_shows_the_canvas_denoising_and_the_answer(browser, shipped_or_tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By

    with running_server(shipped_or_tiny_model_dir) as (url, _):
        browser.get(url + "/")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("48")
        browser.find_element(By.ID, "prompt").send_keys("Sort these numbers: 42 7 19 3")
        browser.find_element(By.ID, "send").click()
        deadline, seen_steps = time.time() + 120, set()
        while time.time() < deadline:
            steps = browser.find_element(By.ID, "s-step").text
            if steps not in ("", "–"):
                seen_steps.add(steps)
            if browser.find_element(By.ID, "send").is_enabled() and browser.find_elements(By.CSS_SELECTOR, ".msg .meta"):
                meta = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
                if "tokens/forward" in meta:
                    break
            time.sleep(0.05)
        assert seen_steps, "no canvas frame was shown"
        tokens = browser.find_elements(By.CSS_SELECTOR, "#canvas .tok")
        assert tokens and any("acc" in t.get_attribute("class") for t in tokens)
        answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
        assert "tokens/forward" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
        assert browser.find_element(By.ID, "play").is_enabled()  # the replay of the last answer's steps
        assert "<|" not in answer and "<turn|>" not in answer
        SHOTS.mkdir(parents=True, exist_ok=True)
        out = SHOTS / "browser-view.png" if os.environ.get("DIFFUSIONGEMMA_SCREENSHOTS") else tmp_path / "view.png"
        browser.save_screenshot(str(out))
        assert out.stat().st_size > 10_000


def test_page_works_with_an_api_key(browser, shipped_or_tiny_model_dir):
    """With `serve --api-key` the page asks for the key once and sends it with every /v1 call."""
    from selenium.webdriver.common.by import By

    with running_server(shipped_or_tiny_model_dir, api_key="s3cret") as (url, _):
        browser.get(url + "/")
        deadline = time.time() + 30
        while "API key" not in browser.find_element(By.ID, "model").text and time.time() < deadline:
            time.sleep(0.05)
        assert "API key" in browser.find_element(By.ID, "model").text  # the server said what is missing
        box = browser.find_element(By.ID, "api-key")
        box.send_keys("s3cret")
        browser.find_element(By.ID, "prompt").click()  # the key box loses focus: its change is saved
        browser.find_element(By.ID, "prompt").send_keys("Reverse the list: a b c")
        browser.find_element(By.ID, "send").click()
        deadline = time.time() + 120
        while time.time() < deadline:
            metas = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")
            if metas and "tokens/forward" in metas[-1].text:
                break
            time.sleep(0.05)
        assert "tokens/forward" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
        assert browser.execute_script("return localStorage.getItem('diffusiongemma-key')") == "s3cret"
