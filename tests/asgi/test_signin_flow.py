"""Signing a user in: authorize -> hosted sign-in page -> code -> tokens, in process,
with its errors: nothing redirected to an unchecked redirect_uri, PKCE enforced, codes
single use (reuse revokes), CSRF, one message for every refusal, throttling, headers."""

from __future__ import annotations

import re
import secrets
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from authserver.passwords import hash_password
from authserver.pkce import s256
from tests.conftest import ISSUER, PUBLIC_URL, REPORTING_SECRET, TOKEN_URL, AuthServer

pytestmark = pytest.mark.anyio

AUTHORIZE = f"{ISSUER}/v1/authorize"
PORTAL_SECRET = "portal-secret-0123456789abcdefghijklmnop"
CALLBACK = "https://portal.example.com/callback"
SPA_CALLBACK = "http://127.0.0.1/callback"
ALICE_PASSWORD = "alice-password"
ALICE_HASH = hash_password(ALICE_PASSWORD)


def sign_in_config(data: dict[str, Any]) -> None:
    auth = data["authserver"]
    auth["clients"] += [
        {
            "client_id": "portal",
            "secret": PORTAL_SECRET,
            "grant_types": ["authorization_code"],
            "redirect_uris": [CALLBACK],
            "scopes": ["openid", "profile", "email", "orders:read"],
        },
        {
            "client_id": "spa",
            "auth_method": "none",
            "redirect_uris": [SPA_CALLBACK],
            "scopes": ["openid", "orders:read"],
        },
    ]
    auth["users"] = [
        {
            "username": "alice",
            "password_hash": ALICE_HASH,
            "profile": {"name": "Alice Doe", "email": "alice@example.com"},
        },
        {"username": "mallory", "password_hash": ALICE_HASH, "disabled": True},
    ]
    auth["sign_in"] = {"brand": {"name": "Acme <Corp>", "color": "#123456"}}


# Codes and session cookie values the flow saw, for tests/test_zz_no_secrets_in_logs.py
# to look for in every log (it runs last and reads this file).
ISSUED_SECRETS_FILE = "signin-issued-secrets.txt"
_record: list[Path] = []


@pytest.fixture(autouse=True)
def _remember_secrets(tmp_path_factory: pytest.TempPathFactory) -> None:
    _record[:] = [tmp_path_factory.getbasetemp() / ISSUED_SECRETS_FILE]


def remember(value: str) -> None:
    with _record[0].open("a") as f:
        f.write(value + "\n")


@pytest.fixture
def server(make_authserver: Any) -> AuthServer:
    return make_authserver(sign_in_config)  # type: ignore[no-any-return]


class Form(HTMLParser):
    """The page's one form: its action and its inputs."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.action: str | None = None
        self.method: str | None = None
        self.fields: dict[str, str] = {}
        self.forms = 0
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms += 1
            self.action, self.method = a.get("action"), a.get("method")
        elif tag == "input" and a.get("name"):
            self.fields[a["name"] or ""] = a.get("value") or ""


def authorize_params(**changes: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "client_id": "portal",
        "redirect_uri": CALLBACK,
        "response_type": "code",
        "scope": "openid profile email orders:read",
        "state": "st-" + secrets.token_hex(4),
        "nonce": "n-" + secrets.token_hex(4),
        "code_challenge": s256("v" * 43),
        "code_challenge_method": "S256",
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}


async def start(http: httpx.AsyncClient, **changes: str | None) -> tuple[httpx.Response, Form]:
    """GET authorize, follow to the sign-in page; the page and its form."""
    response = await http.get(AUTHORIZE, params=authorize_params(**changes))
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/signin/login"
    page = await http.get(response.headers["location"])
    assert page.status_code == 200
    return page, Form(page.text)


async def submit(
    http: httpx.AsyncClient, form: Form, username: str = "alice", password: str = ALICE_PASSWORD
) -> httpx.Response:
    assert form.action is not None
    return await http.post(
        form.action, data={**form.fields, "username": username, "password": password}
    )


def callback_params(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith(CALLBACK + "?") or location.startswith(SPA_CALLBACK)
    params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    if "code" in params:
        remember(params["code"])
    for cookie in response.headers.get_list("set-cookie"):
        name, _, rest = cookie.partition("=")
        if name.endswith("tg_session") and rest.split(";")[0]:
            remember(rest.split(";")[0])
    return params


async def exchange(
    http: httpx.AsyncClient, code: str, verifier: str = "v" * 43, **changes: str | None
) -> httpx.Response:
    data: dict[str, str | None] = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CALLBACK,
        "code_verifier": verifier,
    }
    data.update(changes)
    return await http.post(
        TOKEN_URL,
        data={k: v for k, v in data.items() if v is not None},
        auth=("portal", PORTAL_SECRET),
    )


async def sign_in(http: httpx.AsyncClient, **changes: str | None) -> dict[str, str]:
    """A code for the portal: through the form, or at once with a live session."""
    response = await http.get(AUTHORIZE, params=authorize_params(**changes))
    if response.headers["location"] != "/signin/login":
        return callback_params(response)
    page = await http.get(response.headers["location"])
    return callback_params(await submit(http, Form(page.text)))


def assert_page_headers(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    for directive in (
        "default-src 'none'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ):
        assert directive in csp
    assert "script-src" not in csp and "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"


# --------------------------------------------------------------------------- the flow


async def test_the_whole_flow_gives_an_access_token_and_an_id_token(server: AuthServer) -> None:
    async with server.client() as http:
        params = authorize_params()
        first = await http.get(AUTHORIZE, params=params)
        assert first.status_code == 303
        assert_page_headers(first)
        page = await http.get(first.headers["location"])
        assert_page_headers(page)
        # its POST is answered by a redirect to the client, which form-action must allow
        assert (
            "form-action 'self' https://portal.example.com;"
            in page.headers["content-security-policy"]
        )
        assert "text/html" in page.headers["content-type"]
        form = Form(page.text)
        assert form.forms == 1 and form.method == "post"
        assert {"username", "password", "csrf_token"} <= set(form.fields)
        assert "<script" not in page.text
        assert "Acme &lt;Corp&gt;" in page.text  # branded, escaped
        assert 'for="username"' in page.text and 'for="password"' in page.text
        done = await submit(http, form)
        assert_page_headers(done)
        back = callback_params(done)
        assert back["state"] == params["state"] and back["iss"] == ISSUER
        assert len(back["code"]) >= 43
        cookies = done.headers.get_list("set-cookie")
        session_cookie = next(c for c in cookies if c.startswith("tg_session="))
        assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie
        assert "Path=/" in session_cookie
        tokens = await exchange(http, back["code"])
        assert tokens.status_code == 200, tokens.text
        body = tokens.json()
        metadata = (await http.get(f"{ISSUER}/.well-known/openid-configuration")).json()
        jwks = (await http.get(metadata["jwks_uri"])).json()
    key = jwt.PyJWK(jwks["keys"][0]).key
    access = jwt.decode(body["access_token"], key, algorithms=["RS256"], audience="api://default")
    user = await server.services.users.find("alice")
    assert user is not None
    assert access["sub"] == user.id and access["preferred_username"] == "alice"
    assert access["client_id"] == "portal" and access["amr"] == ["pwd"]
    assert access["scope"] == "openid profile email orders:read"
    id_token = jwt.decode(
        body["id_token"], key, algorithms=["RS256"], audience="portal", issuer=ISSUER
    )
    assert id_token["nonce"] == params["nonce"] and id_token["sub"] == user.id
    assert id_token["name"] == "Alice Doe" and id_token["email"] == "alice@example.com"
    assert id_token["auth_time"] == access["auth_time"] and id_token["sid"]
    assert jwt.get_unverified_header(body["id_token"])["typ"] == "JWT"
    issued = [line for line in server.audit_lines() if line["event"] == "token.issued"]
    assert issued[-1]["grant_type"] == "authorization_code"
    assert issued[-1]["user_id"] == user.id and issued[-1]["username"] == "alice"
    events = [line["event"] for line in server.audit_lines()]
    assert "user.signin" in events and "session.created" in events


async def test_a_live_session_gets_codes_without_the_form_for_any_client(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        await sign_in(http)
        again = await http.get(AUTHORIZE, params=authorize_params())
        assert callback_params(again)["code"]  # SSO: straight back with a code
        spa = await http.get(
            AUTHORIZE,
            params=authorize_params(
                client_id="spa", redirect_uri="http://127.0.0.1:53111/callback", scope="openid"
            ),
        )
        assert spa.status_code == 303
        code = parse_qs(urlsplit(spa.headers["location"]).query)["code"][0]
        tokens = await http.post(
            TOKEN_URL,
            data={
                "grant_type": "authorization_code",
                "client_id": "spa",
                "code": code,
                "redirect_uri": "http://127.0.0.1:53111/callback",
                "code_verifier": "v" * 43,
            },
        )
        assert tokens.status_code == 200, tokens.text
        # prompt=login and an exceeded max_age ask again
        assert (await http.get(AUTHORIZE, params=authorize_params(prompt="login"))).headers[
            "location"
        ] == "/signin/login"
        server.clock.advance(120)
        stale = await http.get(AUTHORIZE, params=authorize_params(max_age="60"))
        assert stale.headers["location"] == "/signin/login"


async def test_prompt_none_without_a_session_is_login_required(server: AuthServer) -> None:
    async with server.client() as http:
        response = await http.get(AUTHORIZE, params=authorize_params(prompt="none", state="s1"))
    back = callback_params(response)
    assert back == {
        "error": "login_required",
        "error_description": "the user must sign in",
        "state": "s1",
        "iss": ISSUER,
    }


async def test_login_hint_fills_the_username(server: AuthServer) -> None:
    async with server.client() as http:
        _, form = await start(http, login_hint="alice")
    assert form.fields["username"] == "alice"


async def test_form_post_answers_with_a_form_to_the_redirect_uri(server: AuthServer) -> None:
    async with server.client() as http:
        _, form = await start(http, response_mode="form_post", state="fp")
        done = await submit(http, form)
    assert done.status_code == 200
    posted = Form(done.text)
    assert posted.action == CALLBACK and posted.method == "post"
    assert (
        posted.fields["state"] == "fp" and posted.fields["iss"] == ISSUER and posted.fields["code"]
    )
    assert (
        "form-action 'self' https://portal.example.com" in done.headers["content-security-policy"]
    )
    assert "<script" not in done.text


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "changes",
    [
        {"redirect_uri": "https://evil.example/callback"},
        {"redirect_uri": CALLBACK + "/../evil"},
        {"redirect_uri": "https://portal.example.com@evil.example/callback"},
        {"redirect_uri": None},
        {"client_id": "nobody"},
        {"client_id": None},
        {"redirect_uri": "https://evil.example/", "response_type": "token"},
        {"client_id": "reporting"},  # a client without redirect URIs
    ],
)
async def test_nothing_is_redirected_to_an_unchecked_redirect_uri(
    server: AuthServer, changes: dict[str, str | None]
) -> None:
    async with server.client() as http:
        response = await http.get(AUTHORIZE, params=authorize_params(**changes))
    assert response.status_code == 400
    assert "location" not in response.headers
    assert "text/html" in response.headers["content-type"]
    assert_page_headers(response)
    assert "evil" not in response.text


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain", "code_challenge": "v" * 43}, "invalid_request"),
        ({"response_type": None}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"request": "eyJhbGciOiJub25lIn0.e30."}, "request_not_supported"),
        ({"scope": "openid orders:write"}, "invalid_scope"),
    ],
)
async def test_errors_after_the_checks_go_back_with_state_and_iss(
    server: AuthServer, changes: dict[str, str | None], error: str
) -> None:
    async with server.client() as http:
        response = await http.get(AUTHORIZE, params=authorize_params(state="keep", **changes))
    back = callback_params(response)
    assert back["error"] == error and back["state"] == "keep" and back["iss"] == ISSUER
    assert "code" not in back


async def test_a_wrong_or_missing_verifier_gets_no_token(server: AuthServer) -> None:
    async with server.client() as http:
        code = (await sign_in(http))["code"]
        wrong = await exchange(http, code, verifier="w" * 43)
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
        code = (await sign_in(http))["code"]
        missing = await exchange(http, code, verifier=None)  # type: ignore[arg-type]
        assert missing.json()["error"] == "invalid_grant"
        code = (await sign_in(http))["code"]
        other_uri = await exchange(http, code, redirect_uri=CALLBACK + "?x=1")
        assert other_uri.json()["error"] == "invalid_grant"


async def test_a_reused_code_fails_and_revokes_the_tokens_it_gave(server: AuthServer) -> None:
    async with server.client() as http:
        code = (await sign_in(http))["code"]
        first = await exchange(http, code)
        assert first.status_code == 200
        access_token = first.json()["access_token"]
        second = await exchange(http, code)
        assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
        introspected = await http.post(
            f"{ISSUER}/v1/introspect",
            data={"token": access_token},
            auth=("portal", PORTAL_SECRET),
        )
    assert introspected.json() == {"active": False}
    revoked = [line for line in server.audit_lines() if line["event"] == "token.revoked"]
    assert revoked and revoked[-1]["reason"] == "code_reused"


async def test_a_code_is_no_good_to_another_client(server: AuthServer) -> None:
    async with server.client() as http:
        code = (await sign_in(http))["code"]
        injected = await http.post(
            TOKEN_URL,
            data={
                "grant_type": "authorization_code",
                "client_id": "spa",
                "code": code,
                "redirect_uri": CALLBACK,
                "code_verifier": "v" * 43,
            },
        )
        assert injected.status_code == 400 and injected.json()["error"] == "invalid_grant"
        as_reporting = await http.post(
            TOKEN_URL,
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK},
            auth=("reporting", REPORTING_SECRET),
        )
        assert as_reporting.json()["error"] == "unauthorized_client"


async def test_a_public_client_cannot_use_a_secret_or_client_credentials(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        response = await http.post(
            TOKEN_URL, data={"grant_type": "client_credentials", "client_id": "spa"}
        )
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"


async def test_the_form_refuses_posts_without_the_right_csrf_token(server: AuthServer) -> None:
    async with server.client() as http:
        _, form = await start(http)
        assert form.action is not None
        missing = {k: v for k, v in form.fields.items() if k != "csrf_token"}
        no_token = await http.post(
            form.action, data={**missing, "username": "alice", "password": ALICE_PASSWORD}
        )
        assert no_token.status_code == 400 and "location" not in no_token.headers
        wrong = await http.post(
            form.action,
            data={
                **form.fields,
                "csrf_token": "x" * 43,
                "username": "alice",
                "password": ALICE_PASSWORD,
            },
        )
        assert wrong.status_code == 400 and "location" not in wrong.headers
    async with server.client() as stranger:  # the form's token, without its cookie
        replay = await stranger.post(
            form.action, data={**form.fields, "username": "alice", "password": ALICE_PASSWORD}
        )
    assert replay.status_code == 400 and "location" not in replay.headers
    assert not [line for line in server.audit_lines() if line["event"] == "user.signin"]


async def test_every_refusal_says_the_same(server: AuthServer) -> None:
    bodies = []
    async with server.client() as http:
        _, form = await start(http)
        for username, password in (
            ("alice", "wrong-password"),
            ("nobody", "whatever-pass"),
            ("mallory", ALICE_PASSWORD),
        ):
            response = await submit(http, form, username, password)
            assert response.status_code == 401
            assert "The username or password is incorrect." in response.text
            assert 'aria-describedby="signin-error"' in response.text
            bodies.append(re.sub(r'value="[^"]*"', "", response.text))
    assert len(set(bodies)) == 1
    failures = [line for line in server.audit_lines() if line["event"] == "user.signin"]
    reasons = [line["reason"] for line in failures]
    assert reasons == ["bad_credentials", "bad_credentials", "disabled"]
    assert all(line["outcome"] == "failure" for line in failures)


async def test_failures_lock_the_username_then_even_the_right_password_fails(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        _, form = await start(http)
        for _ in range(6):
            await submit(http, form, "alice", "wrong-password")
        locked = await submit(http, form, "alice", ALICE_PASSWORD)
        assert locked.status_code == 401 and "location" not in locked.headers
        assert "The username or password is incorrect." in locked.text
        assert [line for line in server.audit_lines() if line["event"] == "user.signin"][-1][
            "reason"
        ] == "locked"
        server.clock.advance(3600)  # the lock is over (and that page has expired)
        assert (await sign_in(http))["code"]


async def test_the_stylesheets_are_served(server: AuthServer) -> None:
    async with server.client() as http:
        css = await http.get("/signin/static/signin.css")
        brand = await http.get("/signin/static/brand.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "#123456" in brand.text


async def test_discovery_advertises_the_code_flow(server: AuthServer) -> None:
    async with server.client() as http:
        metadata = (await http.get(f"{ISSUER}/.well-known/openid-configuration")).json()
    assert metadata["authorization_endpoint"] == AUTHORIZE
    assert metadata["response_types_supported"] == ["code"]
    assert metadata["response_modes_supported"] == ["query", "fragment", "form_post"]
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["id_token_signing_alg_values_supported"] == ["RS256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    assert {"openid", "profile", "email"} <= set(metadata["scopes_supported"])
    assert "none" in metadata["token_endpoint_auth_methods_supported"]
    assert "authorization_code" in metadata["grant_types_supported"]
    assert {"sub", "nonce", "at_hash", "email", "name"} <= set(metadata["claims_supported"])
    assert PUBLIC_URL in metadata["issuer"]
