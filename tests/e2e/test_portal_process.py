"""The demo portal in a real ``tokengate run``, beside the authorization server, the
gateway and the echo, as config/tokengate.yaml ships them (on free ports): a browser,
played by httpx with its redirects followed by hand, signs the demo user in through
the hosted page, sees who signed in, calls the orders API through the gateway, has
its access token refreshed, and signs out through the issuer."""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import yaml

from tests.asgi.test_signin_flow import Form
from tests.e2e.conftest import ROOT, free_port

DEMO_PORTS = {"authserver": 9000, "gateway": 8080, "echo": 7000, "admin": 9100, "portal": 7100}


def demo_config(tmp_path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """config/tokengate.yaml with every port moved to a free one, its data and audit
    log in ``tmp_path``."""
    text = (ROOT / "config" / "tokengate.yaml").read_text()
    ports = {name: free_port() for name in DEMO_PORTS}
    for name, port in DEMO_PORTS.items():
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{ports[name]}")
    config = yaml.safe_load(text)
    config["authserver"]["data_dir"] = str(tmp_path / "data")
    config["audit"] = {"path": str(tmp_path / "audit.log")}
    return config, ports


class Browser:
    """Cookies kept per host like a browser's; every redirect followed by hand; a new
    connection for every request, so that each may reach another worker."""

    def __init__(self) -> None:
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        self.client = httpx.Client(follow_redirects=False, timeout=30, limits=no_reuse)

    def go(self, method: str, url: str, *, hops: list[int], **kwargs: Any) -> httpx.Response:
        """``method url``, then GET each Location; ``hops``: the statuses expected."""
        response = self.client.request(method, url, **kwargs)
        seen = [response.status_code]
        while response.status_code in (302, 303) and len(seen) < 10:
            url = urljoin(url, response.headers["location"])
            response = self.client.get(url)
            seen.append(response.status_code)
        assert seen == hops, (seen, response.text[:2000])
        return response


def pre(page: str) -> Any:
    """The API's answer as the portal shows it: the JSON in its <pre>."""
    found = re.search(r'<pre class="answer">(.*?)</pre>', page, re.S)
    assert found, page
    return json.loads(html.unescape(found.group(1)))


def field(page: str, label: str) -> str:
    found = re.search(rf"<dt>{label}</dt><dd>(?:<code>)?(.*?)(?:</code>)?</dd>", page)
    assert found, page
    return html.unescape(found.group(1))


def csrf(page: str) -> str:
    tokens = set(re.findall(r'name="csrf_token" value="([^"]+)"', page))
    assert len(tokens) == 1, page
    return tokens.pop()


def sign_in(browser: Browser, config: dict[str, Any], portal: str) -> httpx.Response:
    """Press "Sign in", sign in as the demo user on the hosted page: the portal's page."""
    issuer = config["portal"]["issuer"]
    login = browser.client.get(f"{portal}/login")
    assert login.status_code == 303
    assert re.fullmatch(
        r"portal_login=[\w-]+; Path=/; HttpOnly; SameSite=Lax; Max-Age=600",
        login.headers["set-cookie"],
    )
    authorize = urlsplit(login.headers["location"])
    assert f"{authorize.scheme}://{authorize.netloc}{authorize.path}" == f"{issuer}/v1/authorize"
    request = {k: v[0] for k, v in parse_qs(authorize.query).items()}
    assert request["response_type"] == "code"
    assert request["client_id"] == "portal"
    assert request["redirect_uri"] == f"{portal}/callback"
    assert request["scope"] == "openid profile email offline_access orders:read"
    assert request["code_challenge_method"] == "S256"
    assert len(request["code_challenge"]) == 43 and request["state"] and request["nonce"]
    page = browser.go("GET", login.headers["location"], hops=[303, 200])
    form = Form(page.text)
    assert set(form.fields) >= {"username", "password", "csrf_token"}

    # the demo user's password (README) -> the callback -> signed in
    callback = browser.client.post(
        urljoin(str(page.url), form.action),
        data={**form.fields, "username": "alice", "password": "alice-demo-password"},
    )
    assert callback.status_code == 303
    assert callback.headers["location"].startswith(f"{portal}/callback?code=")
    landed = browser.client.get(callback.headers["location"])
    assert (landed.status_code, landed.headers["location"]) == (303, "/")
    cookies = landed.headers.get_list("set-cookie")
    assert cookies[0] == "portal_login=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
    assert re.fullmatch(r"portal_session=[\w-]+; Path=/; HttpOnly; SameSite=Lax", cookies[1])
    assert len(cookies[1].split(";")[0]) < 3500  # well within a browser's 4 KB
    home = browser.go("GET", f"{portal}/", hops=[200])
    assert "Signed in as Alice Doe" in home.text
    assert field(home.text, "Email") == "alice@example.com"
    assert field(home.text, "Username") == "alice"
    assert field(home.text, "Groups") == "engineering"
    return home


def call_api(browser: Browser, portal: str, home: str, sub: str) -> httpx.Response:
    """Press "Call the orders API": the echo's answer, through the gateway."""
    answered = browser.go("POST", f"{portal}/api", data={"csrf_token": csrf(home)}, hops=[200])
    assert '<strong class="status">200</strong>' in answered.text
    echo = pre(answered.text)
    assert (echo["method"], echo["path"]) == ("GET", "/orders/42")
    assert echo["headers"]["x-auth-subject"] == sub
    assert echo["headers"]["x-auth-client-id"] == "portal"
    assert "orders:read" in echo["headers"]["x-auth-scopes"].split()
    assert "authorization" not in echo["headers"]  # the gateway kept the token
    return answered


def test_the_demo_user_signs_in_calls_the_api_is_refreshed_and_signs_out(
    tokengate: Any, tmp_path: Path
) -> None:
    """The default config as it ships, with access tokens of 5 s and two workers: sign-in
    with userinfo, the API through the gateway, a refresh once the token has expired,
    and sign-out through the issuer's logout. The portal keeps nothing in a worker, so
    which one a request reaches does not matter."""
    config, ports = demo_config(tmp_path)
    config["authserver"]["servers"][0]["access_token_ttl"] = "5s"
    portal = f"http://127.0.0.1:{ports['portal']}"
    issuer = config["portal"]["issuer"]
    process = tokengate(config, "--workers", "2")  # a browser's requests reach either
    process.start(f"{portal}/")
    browser = Browser()

    home = browser.go("GET", f"{portal}/", hops=[200])
    assert '<a class="button" href="/login">Sign in</a>' in home.text
    assert home.headers["content-security-policy"] == (
        "default-src 'none'; style-src 'self'; img-src 'self'; "
        f"form-action 'self' http://127.0.0.1:{ports['authserver']}; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    assert home.headers["cache-control"] == "no-store"
    assert home.headers["x-frame-options"] == "DENY"

    home = sign_in(browser, config, portal)
    signed_in = time.monotonic()
    assert "From the ID token and userinfo." in home.text
    assert re.search(r"The access token expires in [345] s; a refresh token renews it\.", home.text)
    sub = field(home.text, "Subject")
    assert re.fullmatch(r"[\w-]{10,}", sub) and sub != "alice"
    first = call_api(browser, portal, home.text, sub)
    assert "refreshed it first" not in first.text and "set-cookie" not in first.headers

    # a form without this session's CSRF token is refused, and changes nothing
    stale = browser.client.post(f"{portal}/api", data={"csrf_token": "forged"})
    assert stale.status_code == 403 and "This form has expired" in stale.text

    time.sleep(max(0.0, signed_in + 4.2 - time.monotonic()))  # 1 s before exp: refresh
    second = call_api(browser, portal, home.text, sub)
    assert "The access token had expired: the portal refreshed it first." in second.text
    assert re.fullmatch(
        r"portal_session=[\w-]+; Path=/; HttpOnly; SameSite=Lax", second.headers["set-cookie"]
    )

    # "Sign out": the issuer's logout, then back on the portal, signed out of both
    out = browser.client.post(f"{portal}/logout", data={"csrf_token": csrf(home.text)})
    assert out.status_code == 303
    assert out.headers.get_list("set-cookie")[0] == (
        "portal_session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
    )
    logout = urlsplit(out.headers["location"])
    assert f"{logout.scheme}://{logout.netloc}{logout.path}" == f"{issuer}/v1/logout"
    params = {k: v[0] for k, v in parse_qs(logout.query).items()}
    assert params["post_logout_redirect_uri"] == f"{portal}/"
    assert params["client_id"] == "portal" and params["id_token_hint"].count(".") == 2
    back = browser.go("GET", out.headers["location"], hops=[303, 200])
    assert str(back.url) == f"{portal}/?state={params['state']}"
    assert "You have signed out." in back.text and "Signed in as" not in back.text
    again = browser.client.post(f"{portal}/api", data={"csrf_token": csrf(home.text)})
    assert again.status_code == 401 and "You are not signed in." in again.text
    page = browser.go("GET", f"{portal}/login", hops=[303, 303, 200])  # no SSO left
    assert set(Form(page.text).fields) >= {"username", "password"}

    assert process.stop() == 0  # the audit log is whole once it has stopped
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    issued = [e["grant_type"] for e in audit if e["event"] == "token.issued"]
    assert issued == ["authorization_code", "refresh_token"]
    ended = [e for e in audit if e["event"] in ("token.revoked", "user.signout")]
    # the refresh token and the session; two workers' lines may come in either order
    assert sorted((e["event"], e["client_id"]) for e in ended) == [
        ("token.revoked", "portal"),
        ("user.signout", "portal"),
    ]
