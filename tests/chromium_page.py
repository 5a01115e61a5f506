"""Headless Chromium for the web page tests, and helpers to read what the page shows.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``); .ci/run installs them. Without them the tests skip, except
under CI, where they fail. With ``QKD_SCREENSHOTS=1`` the screenshots go to
docs/images for the README instead of a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path(os.environ.get("QKD_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("QKD_CHROMEDRIVER", "/usr/bin/chromedriver"))
REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "browser-test-token-0123456789"
WAIT_S = 30


def browser_missing_reason() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} not found; install Debian's {package} (apt-get install -y chromium chromium-driver)"
    return None


@pytest.fixture
def browser():
    reason = browser_missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {reason}")
        pytest.skip(reason)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1300"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    if os.environ.get("QKD_SCREENSHOTS") == "1":
        target = REPO_ROOT / "docs" / "images"
        target.mkdir(parents=True, exist_ok=True)
        return target
    return tmp_path


def wait_for(driver, condition, message: str, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message=message)


def text_of(driver, element_id: str) -> str:
    elements = driver.find_elements(By.ID, element_id)
    return elements[0].text if elements else ""


def graph_points(driver, graph_id: str, trace: int = 0) -> list:
    script = (
        "const g = document.querySelector(arguments[0] + ' .js-plotly-plot');"
        "return g && g.data && g.data[arguments[1]] ? Array.from(g.data[arguments[1]].y) : [];"
    )
    return driver.execute_script(script, f"#{graph_id}", trace)


def click(driver, element_id: str) -> None:
    """Click an element once Dash has rendered it."""
    wait_for(driver, lambda d: d.find_elements(By.ID, element_id), f"element {element_id} not rendered")
    driver.find_element(By.ID, element_id).click()


def log_in(driver, base_url: str) -> None:
    driver.get(f"{base_url}/login")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login-button").click()
    wait_for(driver, lambda d: d.current_url.endswith("/apps/QKD_status"), "login did not return to the status page")


def setting_input(driver, key: str):
    return driver.find_element(By.CSS_SELECTOR, f"input[name='{key}']")
