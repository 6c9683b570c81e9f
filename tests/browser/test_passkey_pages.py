"""Passkeys in a real browser: Chromium's virtual authenticator (the W3C WebAuthn
WebDriver extension, which chromedriver serves over the DevTools protocol's WebAuthn
domain) creates a passkey on the hosted pages and signs with it, passwordless and as a
second factor, against a real ``tokengate run`` whose public URL is
``http://localhost:PORT`` (a secure context with a host name: browsers allow no
passkeys on an IP address)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.virtual_authenticator import VirtualAuthenticatorOptions
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import DESKTOP, PHONE, WAIT, replaced, set_viewport, signin
from tests.browser.test_mfa_pages import MFA, path_of
from tests.browser.test_signin_pages import PASSWORD, SECRETS, App, Stack, png_size, serve
from tests.e2e.conftest import ROOT, e2e_config, free_port


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, chromium: tuple[str, str]) -> Iterator[Stack]:
    """The wiki signs in with a passkey alone (passwordless), the portal with a
    password and a second factor, the partner with a password."""
    workdir = tmp_path_factory.mktemp("browser-passkeys")
    port, echo_port = free_port(), free_port()
    public_url = f"http://localhost:{port}"
    issuer = f"{public_url}/oauth2/default"
    demo = yaml.safe_load((ROOT / "config" / "tokengate.yaml").read_text())
    alice = next(u for u in demo["authserver"]["users"] if u["username"] == "alice")
    config = e2e_config(
        workdir / "data",
        port,
        users=[alice],
        sign_in={"brand": {"name": "Acme"}},
        public_url=public_url,
    )
    policies = {"portal": "password+mfa", "wiki": "passwordless", "partner": "password"}
    callbacks = {
        client_id: f"http://127.0.0.1:{echo_port}/callback-{client_id}" for client_id in policies
    }
    config["authserver"]["clients"] += [
        {
            "client_id": client_id,
            "secret": SECRETS[client_id],
            "grant_types": ["authorization_code"],
            "redirect_uris": [callbacks[client_id]],
            "scopes": ["openid", "profile", "email", "orders:read"],
            "sign_on": {"policy": policy},
        }
        for client_id, policy in policies.items()
    ]
    config["echo"] = {"listen": f"127.0.0.1:{echo_port}"}
    yield from serve(tmp_path_factory, workdir, config, issuer, callbacks)


def authenticator(browser: WebDriver) -> None:
    """A platform authenticator that keeps discoverable credentials and verifies its
    user (as Touch ID or Windows Hello does), always consenting."""
    options = VirtualAuthenticatorOptions()
    options.protocol = VirtualAuthenticatorOptions.Protocol.CTAP2
    options.transport = VirtualAuthenticatorOptions.Transport.INTERNAL
    options.has_resident_key = True
    options.has_user_verification = True
    options.is_user_verified = True
    options.is_user_consenting = True
    browser.add_virtual_authenticator(options)


def forget_cookies(browser: WebDriver) -> None:
    """A new browser session: every site's cookies gone (Selenium's own call forgets
    only the current page's site, and that is the app's)."""
    browser.execute_cdp_cmd("Network.clearBrowserCookies", {})


def press(browser: WebDriver, label: str) -> None:
    """Click the page's passkey button (shown by the page's script) and wait for the
    form it submits to replace the page."""
    form = browser.find_element(By.CSS_SELECTOR, "form[data-passkey]")
    button = form.find_element(By.CSS_SELECTOR, "button.passkey-start")
    assert form.is_displayed() and button.text == label
    button.click()
    replaced(browser, form)


def back_at(browser: WebDriver, app: App) -> dict[str, object]:
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url.startswith(app.redirect_uri))
    return app.id_token(app.code(browser))


def test_a_passkey_created_after_the_password_then_signs_in_alone_and_as_a_second_factor(
    stack: Stack,
    browser: WebDriver,
    screenshot: Callable[[str], Path],
) -> None:
    authenticator(browser)

    # the passwordless app's sign-in page: a passkey first, the password to create one
    wiki = App(stack, "wiki")
    browser.get(wiki.authorization_url())
    assert path_of(browser) == "/signin/login"
    button = browser.find_element(By.CSS_SELECTOR, "button.passkey-start")
    assert button.is_displayed() and browser.switch_to.active_element == button
    logged = [e["message"] for e in browser.get_log("browser") if "favicon" not in e["message"]]
    assert logged == []  # the script ran under the page's CSP, and nothing failed
    assert png_size(screenshot("passkey-signin")) == DESKTOP
    set_viewport(browser, *PHONE, mobile=True)
    assert png_size(screenshot("passkey-signin-phone")) == PHONE
    set_viewport(browser, *DESKTOP)
    signin(browser, "alice", PASSWORD)

    # no passkey yet: create one (the authenticator verifies its user), save the codes
    assert path_of(browser) == "/signin/passkey/enroll", browser.current_url
    assert browser.title == "Create a passkey · Acme"
    assert png_size(screenshot("passkey-create")) == DESKTOP
    press(browser, "Create a passkey")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Save your recovery codes"
    assert "your passkey is ready" in browser.find_element(By.CSS_SELECTOR, ".for").text
    codes = [c.text for c in browser.find_elements(By.CSS_SELECTOR, ".codes code")]
    assert len(codes) == 10
    stack.remember(*codes)
    [credential] = browser.get_credentials()
    assert credential.is_resident_credential and credential.rp_id == "localhost"
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    claims = back_at(browser, wiki)
    assert (claims["acr"], claims["amr"]) == (MFA, ["pwd", "hwk", "mfa"])

    # a new browser session: the passkey alone, no username, no password
    forget_cookies(browser)
    wiki = App(stack, "wiki")
    browser.get(wiki.authorization_url())
    press(browser, "Sign in with a passkey")
    claims = back_at(browser, wiki)
    assert (claims["acr"], claims["amr"]) == (MFA, ["hwk", "mfa"])
    assert browser.get_credentials()[0].sign_count == 2  # created, then one signature

    # the portal needs a second factor: after the password, the passkey
    forget_cookies(browser)
    portal = App(stack, "portal")
    browser.get(portal.authorization_url())
    signin(browser, "alice", PASSWORD)
    assert path_of(browser) == "/signin/mfa"
    assert browser.find_element(By.ID, "code").accessible_name == "Recovery code"
    assert png_size(screenshot("passkey-mfa")) == DESKTOP
    press(browser, "Use your passkey")
    claims = back_at(browser, portal)
    assert (claims["acr"], claims["amr"]) == (MFA, ["pwd", "hwk", "mfa"])

    # a password-only session (the partner) steps up to the passkey for the wiki
    forget_cookies(browser)
    partner = App(stack, "partner")
    browser.get(partner.authorization_url())
    signin(browser, "alice", PASSWORD)
    assert back_at(browser, partner)["acr"] == "urn:tokengate:loa:1fa"
    wiki = App(stack, "wiki")
    browser.get(wiki.authorization_url())
    assert path_of(browser) == "/signin/mfa"  # no password asked again
    assert browser.find_elements(By.ID, "code") == []  # a passkey, not a code
    press(browser, "Use your passkey")
    assert back_at(browser, wiki)["amr"] == ["pwd", "hwk", "mfa"]


def test_a_refused_passkey_request_says_so_and_the_page_stays_usable(
    stack: Stack,
    browser: WebDriver,
    screenshot: Callable[[str], Path],
) -> None:
    """The browser has no passkey for the site (the request ends refused): the page's
    script shows why in its alert, the button works again, and the password form is
    still there."""
    authenticator(browser)  # a new one: it holds no passkey
    wiki = App(stack, "wiki")
    browser.get(wiki.authorization_url())
    button = browser.find_element(By.CSS_SELECTOR, "button.passkey-start")
    button.click()
    alert = browser.find_element(By.CSS_SELECTOR, "form[data-passkey] .passkey-error")
    WebDriverWait(browser, WAIT).until(lambda _: alert.is_displayed())
    assert alert.text == "The passkey request was cancelled or timed out. Try again."
    assert alert.get_attribute("role") == "alert" and button.is_enabled()
    assert path_of(browser) == "/signin/login" and browser.find_element(By.ID, "password")
    assert png_size(screenshot("passkey-cancelled")) == DESKTOP
