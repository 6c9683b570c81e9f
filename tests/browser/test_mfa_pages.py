"""The second factor's pages in a real browser: enrolling an authenticator app from
its QR code page, the recovery codes, signing in with a code, and a password-only
session stepping up with a recovery code, against a real ``tokengate run``. Codes are
computed from the secret the page shows, as an authenticator app does (RFC 6238)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import DESKTOP, PHONE, WAIT, replaced, set_viewport, signin
from tests.browser.test_signin_pages import (
    PASSWORD,
    SECRETS,
    App,
    Stack,
    accessibility_node,
    on_sign_in_page,
    png_size,
    serve,
)
from tests.e2e.conftest import ROOT, e2e_config, free_port

MFA = "urn:tokengate:loa:2fa"


def app_code(secret: str, at: float) -> str:
    """What an authenticator app shows at ``at`` for the secret it was given."""
    key = base64.b32decode(secret.replace(" ", "") + "=" * (-len(secret.replace(" ", "")) % 8))
    mac = hmac.new(key, struct.pack(">Q", int(at // 30)), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 1_000_000).zfill(6)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, chromium: tuple[str, str]) -> Iterator[Stack]:
    """An authorization server where the portal needs a second factor and the wiki a
    password only, with the echo standing in for both apps' callbacks."""
    workdir = tmp_path_factory.mktemp("browser-mfa")
    port, echo_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}/oauth2/default"
    demo = yaml.safe_load((ROOT / "config" / "tokengate.yaml").read_text())
    alice = next(u for u in demo["authserver"]["users"] if u["username"] == "alice")
    config = e2e_config(workdir / "data", port, users=[alice], sign_in={"brand": {"name": "Acme"}})
    callbacks = {
        "portal": f"http://127.0.0.1:{echo_port}/callback-a",
        "wiki": f"http://127.0.0.1:{echo_port}/callback-b",
    }
    for client_id, callback in callbacks.items():
        config["authserver"]["clients"].append(
            {
                "client_id": client_id,
                "secret": SECRETS[client_id],
                "grant_types": ["authorization_code"],
                "redirect_uris": [callback],
                "scopes": ["openid", "profile", "email", "orders:read"],
                **({"sign_on": {"policy": "password+mfa"}} if client_id == "portal" else {}),
            }
        )
    config["echo"] = {"listen": f"127.0.0.1:{echo_port}"}
    yield from serve(tmp_path_factory, workdir, config, issuer, callbacks)


def submit_code(browser: WebDriver, code: str) -> None:
    """Type a code into the page's form and submit it; returns once the next page has
    replaced this one."""
    form = browser.find_element(By.CSS_SELECTOR, "form[method=post]")
    form.find_element(By.ID, "code").send_keys(code)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    replaced(browser, form)


def path_of(browser: WebDriver) -> str:
    return urlsplit(browser.current_url).path


def test_enroll_then_sign_in_with_the_app_then_step_up_with_a_recovery_code(
    stack: Stack,
    browser: WebDriver,
    screenshot: Callable[[str], Path],
) -> None:
    portal = App(stack, "portal")
    browser.get(portal.authorization_url())
    assert on_sign_in_page(browser, stack)
    signin(browser, "alice", PASSWORD)

    # enrolling: the QR code drawn as SVG, the key as text, a first code to confirm
    assert path_of(browser) == "/signin/mfa/enroll", browser.current_url
    assert browser.title == "Set up an authenticator app · Acme"
    qr = browser.find_element(By.CSS_SELECTOR, "figure.qr-code svg")
    assert qr.size["width"] >= 145 and qr.size["width"] == qr.size["height"]
    assert browser.find_elements(By.TAG_NAME, "script") == []
    secret = browser.find_element(By.ID, "secret").text
    assert len(secret.replace(" ", "")) == 32  # 160 bits, base32
    stack.remember(secret.replace(" ", ""))
    code = browser.find_element(By.ID, "code")
    assert code.accessible_name == "Code from the app"
    assert code.get_attribute("autocomplete") == "one-time-code"
    assert png_size(screenshot("mfa-enroll")) == DESKTOP
    submit_code(browser, "000000")
    assert browser.find_element(By.ID, "code-error").text.startswith("That code is not right")
    assert accessibility_node(browser, "code")["description"].startswith("That code")
    submit_code(browser, app_code(browser.find_element(By.ID, "secret").text, time.time()))

    # ten recovery codes, shown once, then on to the app
    codes = [c.text for c in browser.find_elements(By.CSS_SELECTOR, ".codes code")]
    assert len(codes) == 10 and len(set(codes)) == 10
    stack.remember(*codes)
    assert png_size(screenshot("mfa-recovery-codes")) == DESKTOP
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url.startswith(portal.redirect_uri))
    claims = portal.id_token(portal.code(browser))
    assert (claims["acr"], claims["amr"]) == (MFA, ["pwd", "otp", "mfa"])

    # a new browser session: the password, then the code page
    browser.delete_all_cookies()
    portal = App(stack, "portal")
    browser.get(portal.authorization_url())
    signin(browser, "alice", PASSWORD)
    assert path_of(browser) == "/signin/mfa"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Verify it's you"
    field = browser.find_element(By.ID, "code")
    assert browser.switch_to.active_element == field
    assert accessibility_node(browser, "code")["description"] == (
        "Lost your device? Enter one of your recovery codes instead."
    )
    assert png_size(screenshot("mfa-code")) == DESKTOP
    set_viewport(browser, *PHONE, mobile=True)
    assert field.size["width"] <= PHONE[0] - 32
    assert png_size(screenshot("mfa-code-phone")) == PHONE
    set_viewport(browser, *DESKTOP)
    # the enrolment used this step's code: the app's next one (within the window)
    submit_code(browser, app_code(secret, time.time() + 30))
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url.startswith(portal.redirect_uri))
    assert portal.id_token(portal.code(browser))["acr"] == MFA

    # a password-only session (the wiki) steps up for the portal: no password asked
    browser.delete_all_cookies()
    wiki = App(stack, "wiki")
    browser.get(wiki.authorization_url())
    signin(browser, "alice", PASSWORD)
    assert wiki.id_token(wiki.code(browser))["acr"] == "urn:tokengate:loa:1fa"
    portal = App(stack, "portal")
    browser.get(portal.authorization_url())
    assert path_of(browser) == "/signin/mfa"
    submit_code(browser, codes[0])
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url.startswith(portal.redirect_uri))
    assert portal.id_token(portal.code(browser))["acr"] == MFA
