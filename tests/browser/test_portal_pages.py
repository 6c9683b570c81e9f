"""The demo portal in a real browser: the README's three steps in headless Chromium
against ``tokengate run`` with the default config (on free ports). Chromium enforces
what httpx does not: each page's Content-Security-Policy, ``form-action`` on the
redirects a form's answer starts included, and the cookies' attributes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from tests.browser.conftest import DESKTOP, PHONE, WAIT, set_viewport, signin
from tests.browser.test_mfa_pages import app_code
from tests.e2e.conftest import Tokengate
from tests.e2e.test_portal_process import demo_config


def click(browser: WebDriver, selector: str) -> None:
    """Press a button or link, and wait for the page it leads to."""
    old = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.CSS_SELECTOR, selector).click()
    WebDriverWait(browser, WAIT).until(lambda _: _stale(old))


def _stale(element: Any) -> bool:
    try:
        element.is_enabled()
    except Exception:  # stale, or of another document by now
        return True
    return False


def test_open_sign_in_click_and_sign_out(
    tmp_path: Path, browser: WebDriver, screenshot: Callable[[str], Path]
) -> None:
    config, ports = demo_config(tmp_path)
    portal = f"http://127.0.0.1:{ports['portal']}"
    process = Tokengate(tmp_path, config)
    try:
        process.start(f"{portal}/")
        steps(browser, screenshot, portal, ports["authserver"])
        assert process.stop() == 0
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def steps(
    browser: WebDriver, screenshot: Callable[[str], Path], portal: str, auth_port: int
) -> None:

    browser.get(f"{portal}/")  # 1. open the portal
    assert browser.find_element(By.TAG_NAME, "h1").text == "Welcome"
    click(browser, "a.button")  # "Sign in": on to the hosted sign-in page
    assert browser.current_url.startswith(f"http://127.0.0.1:{auth_port}/signin/")
    signin(browser, "alice", "alice-demo-password")  # 2. sign in as the demo user
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url == f"{portal}/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Signed in as Alice Doe"
    cookies = {c["name"]: c for c in browser.get_cookies()}
    assert cookies["portal_session"]["httpOnly"] is True
    assert cookies["portal_session"]["sameSite"] == "Lax"
    assert "portal_login" not in cookies

    click(browser, "form[action='/api'] button")  # 3. "Call the orders API"
    assert browser.find_element(By.CLASS_NAME, "status").text == "200"
    echo = json.loads(browser.find_element(By.CSS_SELECTOR, "pre.answer").text)
    assert echo["path"] == "/orders/42"
    assert echo["headers"]["x-auth-client-id"] == "portal"
    screenshot("portal")
    set_viewport(browser, *PHONE, mobile=True)
    screenshot("portal-phone")
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= PHONE[0]  # nothing wider than a phone
    set_viewport(browser, *DESKTOP)

    # the refunds API wants a second factor (RFC 9470 step-up): the portal signs alice
    # in again with the acr_values the gateway named; she has no app yet, so she
    # gives her password again and enrolls one, and the portal makes the call again
    click(browser, "form[action='/api']:has(input[value=sensitive]) button")
    assert browser.current_url == f"http://127.0.0.1:{auth_port}/signin/login"
    signin(browser, "alice", "alice-demo-password")
    assert browser.current_url == f"http://127.0.0.1:{auth_port}/signin/mfa/enroll"
    secret = browser.find_element(By.ID, "secret").text
    browser.find_element(By.ID, "code").send_keys(app_code(secret, time.time()))
    click(browser, "button[type=submit]")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".codes code")) == 10
    click(browser, "button[type=submit]")  # the recovery codes saved: continue
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url.startswith(f"{portal}/"))
    assert browser.find_element(By.CLASS_NAME, "status").text == "200"
    echo = json.loads(browser.find_element(By.CSS_SELECTOR, "pre.answer").text)
    assert echo["path"] == "/orders/42/refunds"
    screenshot("portal-step-up")

    click(browser, "form[action='/logout'] button")  # "Sign out": the issuer, and back
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url.startswith(f"{portal}/?state="))
    assert "You have signed out." in browser.find_element(By.TAG_NAME, "main").text
    assert "portal_session" not in {c["name"] for c in browser.get_cookies()}
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert [e for e in errors if "favicon.ico" not in e["message"]] == []  # no CSP refusal
