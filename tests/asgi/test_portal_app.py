"""The demo portal in process, against a fake issuer and API (httpx MockTransport):
the paths a real authorization server does not take on demand. Refreshes (when the
access token has expired, and once on a 401), rotation, a refused refresh, the
errors of the callback, an issuer that is down or signs wrongly, a rotated key,
sign-out's redirect, and cookies that do not open."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import FakeClock
from tokengate.portal.app import PortalApp
from tokengate.portal.config import PortalConfig
from tokengate.portal.idtoken import at_hash
from tokengate.yamlconf import Listen

pytestmark = pytest.mark.anyio

ISSUER = "http://auth.test/oauth2/default"
PORTAL = "http://127.0.0.1:7100"
API = "http://gateway.test/orders/42"
REFUNDS = "http://gateway.test/orders/42/refunds"
MFA = "urn:tokengate:loa:2fa"
STEP_UP = (
    'Bearer realm="tokengate", error="insufficient_user_authentication", '
    'error_description="a stronger sign-in is required (acr)", '
    f'acr_values="{MFA}", max_age="600"'
)
SECRET = "portal-secret-0123456789abcdefghijklmnop"
CONFIG = PortalConfig(
    listen=Listen("127.0.0.1", 7100),
    issuer=ISSUER,
    client_id="portal",
    client_secret=SECRET,
    api_url=API,
    public_url=PORTAL,
    sensitive_api_url=REFUNDS,
)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class FakeIssuer:
    """An OpenID Connect issuer and an API behind a gateway, as far as the portal sees."""

    key: rsa.RSAPrivateKey
    clock: FakeClock
    kid: str = "k1"
    access_ttl: int = 300
    nonce_override: str | None = None
    down: bool = False
    logout_endpoint: bool = True  # whether discovery names an end_session_endpoint
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # live token -> sub
    access_tokens: set[str] = field(default_factory=set)  # what the API accepts
    calls: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    strong: set[str] = field(default_factory=set)  # access tokens of a second factor
    honour_acr: bool = True  # whether a sign-in asked for acr_values gives that acr

    def jwk(self) -> dict[str, Any]:
        jwk = json.loads(jwt.get_algorithm_by_name("RS256").to_jwk(self.key.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def code_for(self, authorize_url: str) -> tuple[str, dict[str, str]]:
        """The user signed in: a code for the portal's authorization request."""
        params = {k: v[0] for k, v in parse_qs(urlsplit(authorize_url).query).items()}
        code = secrets.token_urlsafe(16)
        self.codes[code] = params
        return code, params

    def tokens(
        self, sub: str, nonce: str | None, *, refresh: bool = True, acr: str | None = None
    ) -> dict[str, Any]:
        now = int(self.clock())
        access = secrets.token_urlsafe(24)
        self.access_tokens.add(access)
        if acr == MFA:
            self.strong.add(access)
        id_claims = {
            "iss": ISSUER,
            "sub": sub,
            "aud": "portal",
            "exp": now + 3600,
            "iat": now,
            "name": "Alice <Doe>",
            "email": "alice@example.com",
            "at_hash": at_hash(access, "RS256"),
            "acr": acr or "urn:tokengate:loa:1fa",
        }
        if nonce is not None:
            id_claims["nonce"] = self.nonce_override or nonce
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_ttl,
            "id_token": jwt.encode(id_claims, self.key, "RS256", headers={"kid": self.kid}),
        }
        if refresh:
            token = secrets.token_urlsafe(32)
            self.refresh_tokens[token] = sub
            answer["refresh_token"] = token
        return answer

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append(f"{request.method} {request.url.host}{path}")
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "gateway.test":
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
            if bearer not in self.access_tokens:
                return httpx.Response(401, json={"error": "invalid_token"})
            if path.endswith("/refunds"):
                if bearer not in self.strong:
                    challenge = {"www-authenticate": STEP_UP}
                    return httpx.Response(401, json={"error": "step up"}, headers=challenge)
                return httpx.Response(200, json={"order": 42, "refunds": []})
            return httpx.Response(200, json={"order": 42, "note": "<b>bold</b>"})
        if path == "/oauth2/default/.well-known/openid-configuration":
            return httpx.Response(
                200,
                json={
                    "issuer": ISSUER,
                    "authorization_endpoint": f"{ISSUER}/v1/authorize",
                    "token_endpoint": f"{ISSUER}/v1/token",
                    "jwks_uri": f"{ISSUER}/v1/keys",
                    "userinfo_endpoint": f"{ISSUER}/v1/userinfo",
                    "end_session_endpoint": f"{ISSUER}/v1/logout" if self.logout_endpoint else None,
                    "revocation_endpoint": f"{ISSUER}/v1/revoke",
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "authorization_response_iss_parameter_supported": True,
                },
            )
        if path == "/oauth2/default/v1/keys":
            return httpx.Response(200, json={"keys": [self.jwk()]})
        if path == "/oauth2/default/v1/userinfo":
            return httpx.Response(200, json={"sub": "user-1", "groups": ["engineering"]})
        basic = base64.b64encode(f"portal:{SECRET}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {basic}":
            return httpx.Response(401, json={"error": "invalid_client"})
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        if path == "/oauth2/default/v1/revoke":
            self.revoked.append(form["token"])
            return httpx.Response(200)
        if form["grant_type"] == "authorization_code":
            params = self.codes.pop(form["code"], None)
            verifier = form["code_verifier"].encode()
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
            if params is None or params["code_challenge"] != challenge.decode():
                return httpx.Response(400, json={"error": "invalid_grant"})
            asked = params.get("acr_values", "").split()
            acr = MFA if MFA in asked and self.honour_acr else None
            return httpx.Response(200, json=self.tokens("user-1", params["nonce"], acr=acr))
        sub = self.refresh_tokens.pop(form["refresh_token"], None)  # rotation: used once
        if sub is None:
            return httpx.Response(400, json={"error": "invalid_grant"})
        return httpx.Response(200, json=self.tokens(sub, None))


Portal = tuple[httpx.AsyncClient, FakeIssuer, FakeClock]


@pytest.fixture
async def portal(signing_key: rsa.RSAPrivateKey) -> AsyncIterator[Portal]:
    clock = FakeClock()
    fake = FakeIssuer(signing_key, clock)
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
    app = PortalApp(CONFIG, http=http, clock=clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=PORTAL) as browser:
        yield browser, fake, clock
    await http.aclose()


async def sign_in(browser: httpx.AsyncClient, fake: FakeIssuer, **callback: str) -> httpx.Response:
    login = await browser.get("/login")
    assert login.status_code == 303
    code, params = fake.code_for(login.headers["location"])
    query = {"code": code, "state": params["state"], "iss": ISSUER, **callback}
    return await browser.get("/callback", params=query)


def csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def answer(page: str) -> Any:
    found = re.search(r'<pre class="answer">(.*?)</pre>', page, re.S)
    assert found, page
    return json.loads(html.unescape(found.group(1)))


async def test_signed_in_the_page_shows_the_id_token_and_userinfo(portal: Portal) -> None:
    browser, fake, _ = portal
    signed_in = await sign_in(browser, fake)
    assert (signed_in.status_code, signed_in.headers["location"]) == (303, "/")
    home = await browser.get("/")
    assert home.status_code == 200
    assert "Signed in as Alice &lt;Doe&gt;" in home.text  # escaped
    assert "<dt>Groups</dt><dd>engineering</dd>" in home.text  # from userinfo
    assert "From the ID token and userinfo." in home.text
    assert "The access token expires in 5 min; a refresh token renews it." in home.text


async def test_an_expired_access_token_is_refreshed_first(portal: Portal) -> None:
    browser, fake, clock = portal
    await sign_in(browser, fake)
    page = (await browser.get("/")).text
    first = await browser.post("/api", data={"csrf_token": csrf(page)})
    assert first.status_code == 200 and "set-cookie" not in first.headers
    assert answer(first.text) == {"order": 42, "note": "<b>bold</b>"}
    assert "refreshed it first" not in first.text

    clock.advance(300)  # the access token's end
    calls = len(fake.calls)
    second = await browser.post("/api", data={"csrf_token": csrf(page)})
    assert second.status_code == 200
    assert "The access token had expired: the portal refreshed it first." in second.text
    assert answer(second.text) == {"order": 42, "note": "<b>bold</b>"}
    assert [c for c in fake.calls[calls:] if "/v1/token" in c or "gateway" in c] == [
        "POST auth.test/oauth2/default/v1/token",
        "GET gateway.test/orders/42",
    ]
    assert re.match(
        r"portal_session=[\w-]+; Path=/; HttpOnly; SameSite=Lax$", second.headers["set-cookie"]
    )

    clock.advance(300)  # again: the rotated refresh token is the one the cookie holds
    third = await browser.post("/api", data={"csrf_token": csrf(page)})
    assert third.status_code == 200 and "refreshed it first" in third.text


async def test_a_401_from_the_api_refreshes_once_and_retries(portal: Portal) -> None:
    browser, fake, _ = portal
    await sign_in(browser, fake)
    page = (await browser.get("/")).text
    fake.access_tokens.clear()  # the API no longer takes the token (revoked, say)
    calls = len(fake.calls)
    retried = await browser.post("/api", data={"csrf_token": csrf(page)})
    assert retried.status_code == 200
    assert answer(retried.text) == {"order": 42, "note": "<b>bold</b>"}
    assert fake.calls[calls:] == [
        "GET gateway.test/orders/42",
        "POST auth.test/oauth2/default/v1/token",
        "GET gateway.test/orders/42",
    ]
    fake.access_tokens.clear()
    fake.refresh_tokens.clear()  # and now no refresh either: sign in again
    ended = await browser.post("/api", data={"csrf_token": csrf(page)})
    assert ended.status_code == 401
    assert "The authorization server ended your session (invalid_grant): sign in again." in (
        ended.text
    )
    assert ended.headers["set-cookie"].startswith("portal_session=; ")
    assert (await browser.get("/")).text.count("Signed in as") == 0


async def test_without_a_refresh_token_an_expired_session_signs_in_again(
    portal: Portal, monkeypatch: pytest.MonkeyPatch
) -> None:
    browser, fake, clock = portal
    original = fake.tokens
    monkeypatch.setattr(
        fake, "tokens", lambda sub, nonce, acr=None: original(sub, nonce, refresh=False, acr=acr)
    )
    await sign_in(browser, fake)
    page = (await browser.get("/")).text
    assert "without a refresh token, you will sign in again then." in page
    clock.advance(400)
    ended = await browser.post("/api", data={"csrf_token": csrf(page)})
    assert ended.status_code == 401
    assert "the portal has no refresh token: sign in again." in ended.text


async def test_sign_out_goes_to_the_issuers_logout_and_back(portal: Portal) -> None:
    browser, fake, _ = portal
    await sign_in(browser, fake)
    page = (await browser.get("/")).text
    out = await browser.post("/logout", data={"csrf_token": csrf(page)})
    assert out.status_code == 303
    location = urlsplit(out.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{ISSUER}/v1/logout"
    params = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert params["post_logout_redirect_uri"] == f"{PORTAL}/"
    assert params["client_id"] == "portal"
    assert (
        jwt.decode(params["id_token_hint"], options={"verify_signature": False})["sub"] == "user-1"
    )
    assert len(fake.revoked) == 1 and fake.revoked[0] not in fake.refresh_tokens.values()
    back = await browser.get("/", params={"state": params["state"]})
    assert back.status_code == 200 and "You have signed out." in back.text
    replayed = await browser.get("/", params={"state": params["state"]})
    assert "You have signed out." not in replayed.text  # the state is used once


async def test_without_an_end_session_endpoint_sign_out_is_the_portals_alone(
    portal: Portal,
) -> None:
    browser, fake, _ = portal
    fake.logout_endpoint = False
    await sign_in(browser, fake)
    page = (await browser.get("/")).text
    out = await browser.post("/logout", data={"csrf_token": csrf(page)})
    assert out.status_code == 303
    assert re.fullmatch(r"/\?state=[\w-]{22}", out.headers["location"])
    cookies = out.headers.get_list("set-cookie")
    assert cookies[0] == "portal_session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
    back = await browser.get(out.headers["location"])
    assert back.status_code == 200 and "You have signed out." in back.text
    assert "Sign in</a>" in back.text


async def test_state_changes_need_the_sessions_csrf_token(portal: Portal) -> None:
    browser, fake, _ = portal
    await sign_in(browser, fake)
    for path in ("/api", "/logout"):
        refused = await browser.post(path, data={"csrf_token": "x" * 43})
        assert refused.status_code == 403 and "This form has expired" in refused.text
        assert (await browser.post(path)).status_code == 403
    assert "Signed in as" in (await browser.get("/")).text


@pytest.mark.parametrize(
    ("callback", "status", "shown"),
    [
        (
            {"error": "access_denied", "error_description": "<script>x</script> said no"},
            403,
            "&lt;script&gt;x&lt;/script&gt; said no",
        ),
        ({"error": "login_required"}, 400, "It gave no reason."),
        ({"state": "another"}, 400, "does not belong to the sign-in this browser started"),
        ({"iss": "http://evil.test"}, 400, "does not come from the portal&#39;s authorization"),
        ({"code": "unknown"}, 400, "would not redeem the code"),
    ],
)
async def test_callback_errors_are_pages(
    portal: Portal, callback: dict[str, str], status: int, shown: str
) -> None:
    browser, fake, _ = portal
    page = await sign_in(browser, fake, **callback)
    assert page.status_code == status
    assert shown in page.text
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "Traceback" not in page.text


async def test_a_callback_without_a_sign_in_in_progress(portal: Portal) -> None:
    browser, fake, _ = portal
    page = await browser.get("/callback", params={"code": "c", "state": "s", "iss": ISSUER})
    assert page.status_code == 400 and "No sign-in in progress" in page.text
    login = await browser.get("/login")
    code, params = fake.code_for(login.headers["location"])
    query = {"code": code, "state": params["state"], "iss": ISSUER}
    assert (await browser.get("/callback", params=query)).status_code == 303
    again = await browser.get("/callback", params=query)  # the sign-in is over
    assert again.status_code == 400 and "No sign-in in progress" in again.text


async def test_an_id_token_with_another_nonce_is_refused(portal: Portal) -> None:
    browser, fake, _ = portal
    fake.nonce_override = "someone-elses"
    page = await sign_in(browser, fake)
    assert page.status_code == 502
    assert "did not pass the portal&#39;s checks" in page.text
    assert "nonce is not the one sent" in page.text
    assert "Signed in as" not in (await browser.get("/")).text


async def test_a_rotated_key_is_fetched_once(
    portal: Portal, signing_key: rsa.RSAPrivateKey
) -> None:
    browser, fake, _ = portal
    assert (await sign_in(browser, fake)).status_code == 303
    fake.kid = "k2"  # the issuer rotated (same key material, new kid)
    assert (await sign_in(browser, fake)).status_code == 303
    assert fake.calls.count("GET auth.test/oauth2/default/v1/keys") == 2
    fake.kid = "k3"  # within the cooldown, no second refetch: refused
    assert (await sign_in(browser, fake)).status_code == 502
    assert fake.calls.count("GET auth.test/oauth2/default/v1/keys") == 2


async def test_an_issuer_that_is_down_gets_a_502_page(portal: Portal) -> None:
    browser, fake, _ = portal
    fake.down = True
    page = await browser.get("/login")
    assert page.status_code == 502
    assert "The sign-in service is unavailable" in page.text
    assert "discovery: ConnectError" in page.text
    fake.down = False
    assert (await browser.get("/login")).status_code == 303


async def test_the_api_down_is_shown_as_no_answer(portal: Portal) -> None:
    browser, fake, _ = portal
    await sign_in(browser, fake)
    page = (await browser.get("/")).text
    await browser.get("/")  # discovery cached from now on
    fake.down = True
    down = await browser.post("/api", data={"csrf_token": csrf(page)})
    assert down.status_code == 502
    assert f"No answer: no answer from {API}: ConnectError" in down.text


async def test_a_cookie_that_does_not_open_is_cleared(portal: Portal) -> None:
    browser, fake, _ = portal
    await sign_in(browser, fake)
    value = browser.cookies["portal_session"]
    browser.cookies.set("portal_session", value[:-4] + "AAAA", domain="127.0.0.1")
    page = await browser.get("/")
    assert "Signed in as" not in page.text and "Sign in</a>" in page.text
    assert page.headers["set-cookie"].startswith("portal_session=; ")


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/nowhere", 404, None),
        ("GET", "/api", 405, "POST"),
        ("POST", "/", 405, "GET"),
        ("HEAD", "/", 200, None),
    ],
)
async def test_other_requests(
    portal: Portal, method: str, path: str, status: int, allow: str | None
) -> None:
    browser, _, _ = portal
    response = await browser.request(method, path)
    assert response.status_code == status
    assert response.headers.get("allow") == allow
    assert response.headers["x-frame-options"] == "DENY"


async def test_the_stylesheet(portal: Portal) -> None:
    browser, _, _ = portal
    css = await browser.get("/static/portal.css")
    assert css.status_code == 200 and css.headers["content-type"] == "text/css; charset=utf-8"
    assert "system-ui" in css.text


async def test_an_api_asking_for_a_second_factor_signs_in_again_then_is_called(
    portal: Portal,
) -> None:
    browser, fake, _ = portal
    await sign_in(browser, fake)
    page = (await browser.get("/")).text
    assert "Call the refunds API (needs a second factor)" in page
    calls = len(fake.calls)
    asked = await browser.post("/api", data={"csrf_token": csrf(page), "api": "sensitive"})
    assert asked.status_code == 303 and asked.headers["location"] == "/login"
    assert fake.calls[calls:] == ["GET gateway.test/orders/42/refunds"]  # no refresh tried
    login = await browser.get(asked.headers["location"])
    code, params = fake.code_for(login.headers["location"])
    assert (params["acr_values"], params["max_age"]) == (MFA, "600")
    back = await browser.get(
        "/callback", params={"code": code, "state": params["state"], "iss": ISSUER}
    )
    assert back.status_code == 303 and back.headers["location"] == "/"
    done = await browser.get("/")
    assert done.status_code == 200
    assert answer(done.text) == {"order": 42, "refunds": []}
    assert f"GET <code>{REFUNDS}</code>" in done.text
    # the call was made once: the next visit is the plain page
    calls = len(fake.calls)
    assert "<pre" not in (await browser.get("/")).text and len(fake.calls) == calls


async def test_only_the_portals_own_post_starts_a_step_up_or_its_call(portal: Portal) -> None:
    """A cross-site link cannot make the portal ask for more, nor call the sensitive
    API: both come from sealed cookies that only POST /api (CSRF-checked) sets."""
    browser, fake, _ = portal
    await sign_in(browser, fake)
    calls = len(fake.calls)
    home = await browser.get("/?call=sensitive&then=sensitive")
    assert "<pre" not in home.text and len(fake.calls) == calls
    login = await browser.get(f"/login?then=sensitive&acr_values={quote(MFA)}&max_age=1")
    params = parse_qs(urlsplit(login.headers["location"]).query)
    assert "acr_values" not in params and "max_age" not in params
    forged = await browser.get("/", headers={"cookie": "portal_then=forged"})
    assert "<pre" not in forged.text and len(fake.calls) == calls


async def test_a_step_up_that_does_not_reach_the_acr_is_refused(portal: Portal) -> None:
    browser, fake, _ = portal
    fake.honour_acr = False  # an issuer that ignores acr_values
    await sign_in(browser, fake)
    page = (await browser.get("/")).text
    asked = await browser.post("/api", data={"csrf_token": csrf(page), "api": "sensitive"})
    login = await browser.get(asked.headers["location"])
    code, params = fake.code_for(login.headers["location"])
    back = await browser.get(
        "/callback", params={"code": code, "state": params["state"], "iss": ISSUER}
    )
    assert back.status_code == 403
    assert "Sign-in not strong enough" in back.text
    cookies = back.headers.get_list("set-cookie")
    assert not any(c.startswith("portal_session=") for c in cookies)  # no session from it
