"""The hosted sign-in pages in a real browser: headless Chromium against a real
``tokengate run`` (an authorization server with the demo user alice and two apps, and
the built-in echo upstream standing in for the apps' callbacks, so each test reads the
``code``, ``state`` and ``iss`` the app received from the page the browser lands on).
The apps' part (the code exchange with PKCE, the ID token) is Authlib and PyJWT, as
a relying party does it."""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import yaml
from authlib.integrations.httpx_client import OAuth2Client
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from authserver.signin import BAD_CREDENTIALS
from tests.asgi.test_signin_flow import ISSUED_SECRETS_FILE
from tests.browser.conftest import DESKTOP, PHONE, set_viewport, signin
from tests.e2e.conftest import ROOT, Tokengate, e2e_config, free_port

PASSWORD = "alice-demo-password"  # the demo user's, from config/tokengate.yaml
SECRETS = {
    "portal": "portal-secret-0123456789abcdefghijklmnop",
    "wiki": "wiki-secret-0123456789abcdefghijklmnopqr",
    "partner": "partner-secret-0123456789abcdefghijklmno",
}
ACCENT = "rgba(31, 111, 235, 1)"  # the brand colour, #1f6feb


@dataclass
class Stack:
    issuer: str
    callbacks: dict[str, str]  # client_id -> redirect URI on the echo
    metadata: dict[str, Any]
    issued: Path  # codes and session cookies seen, for tests/test_zz_no_secrets_in_logs.py

    def remember(self, *values: str) -> None:
        with self.issued.open("a") as f:
            f.writelines(value + "\n" for value in values)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, chromium: tuple[str, str]) -> Iterator[Stack]:
    """The authorization server and the echo in one process, for the module's tests
    (started only once Chromium is known to be there)."""
    workdir = tmp_path_factory.mktemp("browser")
    port, echo_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}/oauth2/default"
    demo = yaml.safe_load((ROOT / "config" / "tokengate.yaml").read_text())
    alice = next(u for u in demo["authserver"]["users"] if u["username"] == "alice")
    config = e2e_config(workdir / "data", port, users=[alice], sign_in={"brand": {"name": "Acme"}})
    callbacks = {
        "portal": f"http://127.0.0.1:{echo_port}/callback-a",
        "wiki": f"http://127.0.0.1:{echo_port}/callback-b",
        "partner": f"http://127.0.0.1:{echo_port}/callback-c",  # asks for consent
    }
    config["authserver"]["clients"] += [
        {
            "client_id": client_id,
            "secret": SECRETS[client_id],
            "grant_types": ["authorization_code"],
            "redirect_uris": [callback],
            "post_logout_redirect_uris": [callback.replace("callback", "signed-out")],
            "scopes": ["openid", "profile", "email", "orders:read"],
            **({"consent": "required"} if client_id == "partner" else {}),
        }
        for client_id, callback in callbacks.items()
    ]
    config["echo"] = {"listen": f"127.0.0.1:{echo_port}"}
    yield from serve(tmp_path_factory, workdir, config, issuer, callbacks)


def serve(
    tmp_path_factory: pytest.TempPathFactory,
    workdir: Path,
    config: dict[str, Any],
    issuer: str,
    callbacks: dict[str, str],
) -> Iterator[Stack]:
    """``config`` served by a real ``tokengate run`` (with its echo) while the caller
    holds the Stack; stopped cleanly after, killed if it will not stop."""
    config["audit"] = {"path": str(workdir / "audit.log")}
    process = Tokengate(workdir, config)
    try:
        process.start(f"{issuer}/v1/keys")
        echo = config["echo"]["listen"]
        assert httpx.get(f"http://{echo}/").status_code == 200
        metadata = httpx.get(f"{issuer}/.well-known/openid-configuration").json()
        issued = tmp_path_factory.getbasetemp() / ISSUED_SECRETS_FILE
        stack = Stack(issuer, callbacks, metadata, issued)
        stack.remember(*SECRETS.values())
        yield stack
        assert process.stop() == 0
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


class App:
    """One app's side of the flow: the authorization URL, the callback, the tokens."""

    def __init__(self, stack: Stack, client_id: str) -> None:
        self.stack = stack
        self.client_id = client_id
        self.redirect_uri = stack.callbacks[client_id]
        self.verifier = secrets.token_urlsafe(48)
        self.nonce = secrets.token_urlsafe(16)
        self.state = ""

    def _client(self) -> OAuth2Client:
        return OAuth2Client(
            self.client_id,
            SECRETS[self.client_id],
            scope="openid profile email orders:read",
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic",
        )

    def authorization_url(self, **extra: str) -> str:
        with self._client() as client:
            url, self.state = client.create_authorization_url(
                self.stack.metadata["authorization_endpoint"],
                code_verifier=self.verifier,
                nonce=self.nonce,
                **extra,
            )
        assert "code_challenge_method=S256" in url
        return str(url)

    def code(self, browser: WebDriver) -> str:
        """The code the app's callback received: the echo's page says what it got."""
        assert browser.current_url.startswith(self.redirect_uri + "?"), browser.current_url
        received = json.loads(browser.find_element(By.TAG_NAME, "pre").text)
        assert received["method"] == "GET" and received["path"] == urlsplit(self.redirect_uri).path
        query = parse_qs(received["query"])
        assert query["state"] == [self.state]
        assert query["iss"] == [self.stack.issuer]
        [code] = query["code"]
        self.stack.remember(code)
        return code

    def id_token(self, code: str) -> dict[str, Any]:
        """Redeems the code (with the PKCE verifier) and checks the ID token."""
        with self._client() as client:
            token = client.fetch_token(
                self.stack.metadata["token_endpoint"], code=code, code_verifier=self.verifier
            )
        id_token = token["id_token"]
        jwks = jwt.PyJWKClient(self.stack.metadata["jwks_uri"], cache_jwk_set=False)
        claims: dict[str, Any] = jwt.decode(
            id_token,
            jwks.get_signing_key_from_jwt(id_token).key,
            algorithms=self.stack.metadata["id_token_signing_alg_values_supported"],
            audience=self.client_id,
            issuer=self.stack.issuer,
        )
        assert claims["nonce"] == self.nonce
        assert claims["preferred_username"] == "alice" != claims["sub"]
        return claims


def on_sign_in_page(browser: WebDriver, stack: Stack) -> bool:
    login = urlsplit(stack.issuer)._replace(path="/signin/login").geturl()
    return browser.current_url == login and bool(browser.find_elements(By.NAME, "password"))


def session_cookie(browser: WebDriver) -> str:
    cookie = browser.get_cookie("tg_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    return str(cookie["value"])


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def accessibility_node(browser: WebDriver, element_id: str) -> dict[str, Any]:
    """What Chromium's accessibility tree says about an element: role, name, ..."""
    document = browser.execute_cdp_cmd("DOM.getDocument", {})
    found = browser.execute_cdp_cmd(
        "DOM.querySelector", {"nodeId": document["root"]["nodeId"], "selector": f"#{element_id}"}
    )
    tree = browser.execute_cdp_cmd(
        "Accessibility.getPartialAXTree", {"nodeId": found["nodeId"], "fetchRelatives": False}
    )
    node = tree["nodes"][0]
    return {key: node[key]["value"] for key in ("role", "name", "description") if key in node}


def test_a_user_signs_in_on_the_hosted_page(
    stack: Stack, browser: WebDriver, screenshot: Callable[[str], Path]
) -> None:
    app = App(stack, "portal")
    browser.get(app.authorization_url())
    assert on_sign_in_page(browser, stack)
    assert browser.title == "Sign in · Acme"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Sign in"
    assert browser.find_element(By.CLASS_NAME, "for").text == "to continue to portal"
    assert browser.find_elements(By.TAG_NAME, "script") == []
    username = browser.find_element(By.ID, "username")
    password = browser.find_element(By.ID, "password")
    assert username.accessible_name == "Username" and username.get_attribute("type") == "text"
    assert password.accessible_name == "Password" and password.get_attribute("type") == "password"
    assert password.get_attribute("autocomplete") == "current-password"
    assert browser.switch_to.active_element == username
    assert browser.find_elements(By.ID, "signin-error") == []
    # the stylesheets arrived despite the page's CSP: the brand colour is on the button
    button = browser.find_element(By.CSS_SELECTOR, "button[type=submit]")
    assert button.value_of_css_property("background-color") == ACCENT
    assert png_size(screenshot("sign-in")) == DESKTOP

    set_viewport(browser, *PHONE, mobile=True)
    assert username.size["width"] <= PHONE[0] - 32  # the form fits, with a margin
    assert png_size(screenshot("sign-in-phone")) == PHONE
    set_viewport(browser, *DESKTOP)

    signin(browser, "alice", PASSWORD)
    code = app.code(browser)
    session = session_cookie(browser)
    stack.remember(session)
    claims = app.id_token(code)
    assert claims["name"] == "Alice Doe" and claims["email"] == "alice@example.com"


def test_a_wrong_password_shows_the_page_again_with_one_message(
    stack: Stack, browser: WebDriver, screenshot: Callable[[str], Path]
) -> None:
    app = App(stack, "portal")
    browser.get(app.authorization_url())
    signin(browser, "alice", "not-" + PASSWORD)
    assert on_sign_in_page(browser, stack)
    error = browser.find_element(By.ID, "signin-error")
    assert error.text == BAD_CREDENTIALS and error.get_attribute("role") == "alert"
    username = browser.find_element(By.ID, "username")
    password = browser.find_element(By.ID, "password")
    for field in (username, password):
        assert field.get_attribute("aria-invalid") == "true"
        assert field.get_attribute("aria-describedby") == "signin-error"
    assert accessibility_node(browser, "password") == {
        "role": "textbox",
        "name": "Password",
        "description": BAD_CREDENTIALS,
    }
    assert username.get_attribute("value") == "alice"
    assert password.get_attribute("value") == ""
    assert browser.switch_to.active_element == password
    assert browser.get_cookie("tg_session") is None
    assert png_size(screenshot("sign-in-error")) == DESKTOP

    signin(browser, "alice", PASSWORD)  # the same page, now right
    assert app.id_token(app.code(browser))["nonce"] == app.nonce


def test_a_second_app_signs_in_without_the_form(stack: Stack, browser: WebDriver) -> None:
    portal, wiki = App(stack, "portal"), App(stack, "wiki")
    browser.get(portal.authorization_url())
    signin(browser, "alice", PASSWORD)
    first = portal.id_token(portal.code(browser))

    browser.get(wiki.authorization_url())  # the session answers: no form
    second = wiki.id_token(wiki.code(browser))
    assert second["sub"] == first["sub"] and second["sid"] == first["sid"]
    assert second["auth_time"] == first["auth_time"]
    assert second["aud"] == "wiki"


def test_prompt_login_asks_again_despite_the_session(stack: Stack, browser: WebDriver) -> None:
    portal, wiki = App(stack, "portal"), App(stack, "wiki")
    browser.get(portal.authorization_url())
    signin(browser, "alice", PASSWORD)
    first = portal.id_token(portal.code(browser))
    before = session_cookie(browser)

    browser.get(wiki.authorization_url(prompt="login"))
    assert on_sign_in_page(browser, stack)
    assert browser.find_element(By.CLASS_NAME, "for").text == "to continue to wiki"
    signin(browser, "alice", PASSWORD)
    second = wiki.id_token(wiki.code(browser))
    after = session_cookie(browser)
    stack.remember(before, after)
    assert second["sub"] == first["sub"]
    assert after != before  # a new session cookie: the old value no longer works...
    assert second["sid"] == first["sid"]  # ...for the same user's session, renewed
    assert second["auth_time"] >= first["auth_time"]


def test_consent_then_signing_out(
    stack: Stack, browser: WebDriver, screenshot: Callable[[str], Path]
) -> None:
    """A client that requires consent: the page after the password, Allow, the code
    (the page's CSP lets its form's answer redirect to the client); then logout with
    no id_token_hint asks first, and signing out ends the session."""
    partner = App(stack, "partner")
    browser.get(partner.authorization_url())
    signin(browser, "alice", PASSWORD)
    assert urlsplit(browser.current_url).path == "/signin/consent"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Allow access?"
    assert png_size(screenshot("consent")) == DESKTOP
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, ".scopes li span")]
    assert items[:2] == ["Know who you are (your user id)", "See your name and profile"]
    browser.find_element(By.CSS_SELECTOR, "button[value=allow]").click()
    WebDriverWait(browser, 10).until(lambda b: b.current_url.startswith(partner.redirect_uri))
    partner.id_token(partner.code(browser))
    stack.remember(session_cookie(browser))

    browser.get(stack.metadata["end_session_endpoint"])
    assert browser.find_element(By.TAG_NAME, "h1").text == "Sign out?"
    assert png_size(screenshot("sign-out")) == DESKTOP
    browser.find_element(By.CSS_SELECTOR, "button[value=yes]").click()
    WebDriverWait(browser, 10).until(
        lambda b: b.find_element(By.TAG_NAME, "h1").text == "You are signed out"
    )
    assert browser.get_cookie("tg_session") is None
    browser.get(App(stack, "wiki").authorization_url())  # no session: the form again
    assert on_sign_in_page(browser, stack)
