"""Headless Chromium for tests that need a real browser.

Debian's ``chromium`` driven through its ``chromedriver`` (package chromium-driver,
built from the same source, so the two always agree) with Selenium; nothing is
downloaded. ``make browser`` installs both. Without them these tests skip with one
line naming what is missing, unless ``TOKENGATE_REQUIRE_BROWSER`` or ``CI`` is set
(``.ci/run`` sets the first): then they fail.

- ``browser``: a fresh headless Chromium per test (its own profile, so no cookies),
  with a desktop viewport of :data:`DESKTOP`; quit at the end.
- ``signin(browser, username, password)``: fills the hosted sign-in form and submits
  it, waiting for the next page (``replaced(browser, element)`` waits likewise).
- ``set_viewport(browser, width, height, mobile=...)``: resizes the page's viewport
  exactly (a phone: ``set_viewport(browser, *PHONE, mobile=True)``).
- ``screenshot(name)``: saves the viewport as a PNG. Into ``docs/images/`` when
  ``TOKENGATE_SCREENSHOTS=1`` (the README's pictures), otherwise into the test's
  temporary directory, so an ordinary run rewrites no tracked file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
DOCS_IMAGES = ROOT / "docs" / "images"
REQUIRE_BROWSER = "TOKENGATE_REQUIRE_BROWSER"
SCREENSHOTS = "TOKENGATE_SCREENSHOTS"
DESKTOP = (1280, 900)
PHONE = (390, 844)
WAIT = 10  # seconds a page may take to arrive


def _set(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """The paths of chromium and chromedriver."""
    found = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        reason = (
            f"no {' or '.join(missing)} on PATH "
            "(`make browser` installs Debian's chromium and chromium-driver)"
        )
        if _set(REQUIRE_BROWSER) or _set("CI"):
            pytest.fail(f"{reason}, and {REQUIRE_BROWSER} or CI requires them", pytrace=False)
        pytest.skip(reason)
    return found["chromium"] or "", found["chromedriver"] or ""


@pytest.fixture
def browser(chromium: tuple[str, str]) -> Iterator[WebDriver]:
    binary, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        "--disable-dev-shm-usage",  # containers have a small /dev/shm
        "--no-first-run",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    # Chromedriver's log holds what was typed (passwords): it goes nowhere.
    service = Service(driver, log_output=subprocess.DEVNULL)
    session = webdriver.Chrome(options=options, service=service)
    try:
        set_viewport(session, *DESKTOP)
        yield session
    finally:
        session.quit()


def set_viewport(browser: WebDriver, width: int, height: int, *, mobile: bool = False) -> None:
    """Exactly ``width`` x ``height`` CSS pixels at scale 1; ``mobile`` as a phone shows
    a page (the viewport meta tag applies)."""
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )


def signin(browser: WebDriver, username: str, password: str) -> None:
    """Fill the hosted sign-in page's form (the browser is on it) and submit it; returns
    once the next page has replaced it."""
    form = browser.find_element(By.XPATH, "//form[@method='post'][.//input[@name='password']]")
    field = form.find_element(By.NAME, "username")
    field.clear()
    field.send_keys(username)
    form.find_element(By.NAME, "password").send_keys(password)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    replaced(browser, form)


def replaced(browser: WebDriver, element: WebElement) -> None:
    """Wait until the page that held ``element`` has been replaced by the next one."""
    WebDriverWait(browser, WAIT).until(lambda _: _gone(element))


def _gone(element: WebElement) -> bool:
    try:
        element.is_enabled()
    except WebDriverException:  # stale, or (mid-navigation) of another document
        return True
    return False


@pytest.fixture
def screenshot(browser: WebDriver, tmp_path: Path) -> Callable[[str], Path]:
    folder = DOCS_IMAGES if _set(SCREENSHOTS) else tmp_path

    def save(name: str) -> Path:
        path = folder / f"{name}.png"
        assert browser.save_screenshot(str(path)), path
        return path

    return save
