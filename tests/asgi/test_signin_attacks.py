"""Attacks on signing in, in process: look-alike redirect URIs, PKCE downgrades and
swaps, code and refresh-token injection, CSRF on the sign-in and sign-out forms,
session fixation, open redirects at logout, password guessing (throttling), user
enumeration by message and by time, disabled and unassigned users, framing and CORS.

Each test proves that the attack got nothing: exact statuses, no Location to the
client with a code, nothing new in the store, audit lines that say failure.

Covered elsewhere, so not repeated here: a reused code revokes its access and
refresh tokens (test_signin_flow.py, test_user_tokens.py), a reused refresh token
revokes its family, a refresh cannot widen scopes, a public client cannot use
another's refresh token (test_user_tokens.py), and the one message for an unknown
user, a wrong password and a disabled user (test_signin_flow.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import secrets
import sqlite3
import statistics
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from argon2 import PasswordHasher, Type

from authserver.pkce import s256
from authserver.sessions import session_hash
from tests.asgi.test_signin_flow import (
    ALICE_HASH,
    ALICE_PASSWORD,
    AUTHORIZE,
    CALLBACK,
    PORTAL_SECRET,
    SPA_CALLBACK,
    Form,
    _remember_secrets,  # noqa: F401  (autouse: the secrets seen, for the log-leak search)
    authorize_params,
    callback_params,
    exchange,
    remember,
    sign_in,
    start,
    submit,
)
from tests.asgi.test_user_tokens import (
    HOME,
    INTROSPECT,
    LOGOUT,
    REVOKE,
    SPA_ORIGIN,
    USERINFO,
    claims_of,
    introspect,
    refresh,
    tokens,
)
from tests.asgi.test_user_tokens import config as user_tokens_config
from tests.conftest import ISSUER, PUBLIC_URL, REPORTING_SECRET, TOKEN_URL, AuthServer

pytestmark = pytest.mark.anyio

PARTNER_SECRET = "partner-secret-0123456789abcdefghijklmnopq"
PARTNER_CALLBACK = "https://partner.example.com/cb"
PARTNER_BYE = "https://partner.example.com/bye"
LEGACY_CALLBACK = "https://legacy.example.com/cb"
ADMIN_CALLBACK = "https://admin.example.com/cb"
LOGIN = "/signin/login"
VERIFIER = "v" * 43  # what authorize_params' challenge was made from
TABLES = ("interactions", "auth_codes", "sessions", "grants", "refresh_tokens")


def attack_config(data: dict[str, Any]) -> None:
    """test_user_tokens' config (portal, spa, admin-app for group admins) plus a second
    confidential web app (partner), a confidential client without PKCE (legacy), and a
    user in the admins group (carol)."""
    user_tokens_config(data)
    auth = data["authserver"]
    auth["clients"] += [
        {
            "client_id": "partner",
            "secret": PARTNER_SECRET,
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [PARTNER_CALLBACK],
            "post_logout_redirect_uris": [PARTNER_BYE],
            "scopes": ["openid", "orders:read", "offline_access"],
        },
        {
            "client_id": "legacy",
            "secret": PARTNER_SECRET,
            "grant_types": ["authorization_code"],
            "redirect_uris": [LEGACY_CALLBACK],
            "require_pkce": False,
            "scopes": ["openid"],
        },
    ]
    auth["users"].append({"username": "carol", "password_hash": ALICE_HASH, "groups": ["admins"]})


@pytest.fixture
def server(make_authserver: Any) -> AuthServer:
    return make_authserver(attack_config)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- helpers


def stored(server: AuthServer) -> dict[str, int]:
    """Rows per table of the sign-in state, read over a connection of its own."""
    uri = f"file:{server.services.store.path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        count = "SELECT count(*) FROM {}"  # TABLES: constants, not input
        return {t: db.execute(count.format(t)).fetchone()[0] for t in TABLES}


def events(server: AuthServer, name: str) -> list[dict[str, Any]]:
    return [line for line in server.audit_lines() if line["event"] == name]


def redirect_query(response: httpx.Response, base: str) -> dict[str, str]:
    """The parameters of a 303 to ``base`` (any client); codes are remembered."""
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith(base + "?"), location
    params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    if "code" in params:
        remember(params["code"])
    remember_cookies(response)
    return params


def remember_cookies(response: httpx.Response) -> None:
    for cookie in response.headers.get_list("set-cookie"):
        value = cookie.partition("=")[2].split(";")[0]
        if value:
            remember(value)


def session_cookie(response: httpx.Response) -> str | None:
    """The value a response sets tg_session to (None: it sets none)."""
    for cookie in response.headers.get_list("set-cookie"):
        name, _, rest = cookie.partition("=")
        if name == "tg_session":
            value = rest.split(";")[0]
            if value:
                remember(value)
            return value
    return None


def assert_unframeable(response: httpx.Response) -> None:
    assert response.headers["x-frame-options"] == "DENY"
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp.split("; ")


def assert_error_page(response: httpx.Response, status: int = 400) -> None:
    """Shown, not redirected: an HTML page, no Location, no cookie set."""
    assert response.status_code == status, response.text
    assert "location" not in response.headers
    assert "set-cookie" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert_unframeable(response)


def without_values(html: str) -> str:
    return re.sub(r'value="[^"]*"', "", html)


def second_browser(server: AuthServer, ip: str) -> httpx.AsyncClient:
    """A browser with its own cookies, from another address."""
    transport = httpx.ASGITransport(app=server.app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL)


async def partner_code(http: httpx.AsyncClient, **changes: str | None) -> str:
    """A code for the partner app, by SSO (the browser is signed in already)."""
    params = authorize_params(
        client_id="partner", redirect_uri=PARTNER_CALLBACK, scope="openid orders:read", **changes
    )
    return redirect_query(await http.get(AUTHORIZE, params=params), PARTNER_CALLBACK)["code"]


async def partner_exchange(http: httpx.AsyncClient, code: str, **changes: str) -> httpx.Response:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": PARTNER_CALLBACK,
        "code_verifier": VERIFIER,
        **changes,
    }
    return await http.post(TOKEN_URL, data=data, auth=("partner", PARTNER_SECRET))


def assert_denied(response: httpx.Response, error: str = "invalid_grant") -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error
    assert "access_token" not in response.json() and "refresh_token" not in response.json()


# --------------------------------------------------------------------------- redirect URIs

PORTAL_LOOK_ALIKES = (
    CALLBACK + "x",  # the registered URI as a prefix
    CALLBACK + "/",
    CALLBACK + "/extra",
    "https://portal.example.com/call",  # a prefix of the registered URI
    "https://portal.example.com/",
    "https://portal.example.com",
    CALLBACK + "/../x",  # path traversal, plain and encoded
    "https://portal.example.com/x/../callback",
    CALLBACK + "/%2e%2e/x",
    CALLBACK + "/%2E%2E/x",
    "https://portal.example.com/x/%2e%2e/callback",
    CALLBACK + "/..%2fx",
    "https://portal.example.com/%63allback",
    "https://portal.example.com//callback",
    "https://portal.example.com@evil.example/callback",  # userinfo: the host is after @
    "https://portal.example.com:443@evil.example/callback",
    "https://evil.example@portal.example.com/callback",
    "https://portal.example.com:443/callback",  # another port, scheme or host
    "https://portal.example.com:8443/callback",
    "http://portal.example.com/callback",
    "wss://portal.example.com/callback",
    "https://evil.example/callback",
    "https://portal.example.com.evil.example/callback",
    "https://portal.example.com./callback",
    "https://PORTAL.example.com/callback",  # case
    "https://portal.EXAMPLE.com/callback",
    "HTTPS://portal.example.com/callback",
    "https://portal.example.com/Callback",
    CALLBACK + "#",  # fragments
    CALLBACK + "#x",
    CALLBACK + "%23x",
    CALLBACK + "?",  # extra query
    CALLBACK + "?x=1",
    CALLBACK + "?code=planted",
    CALLBACK + "\r\nLocation: https://evil.example/",  # header injection
    " " + CALLBACK,
    CALLBACK + " ",
    "//evil.example/callback",  # relative and script URIs
    "/callback",
    "javascript:alert(document.cookie)//https://portal.example.com/callback",
    "data:text/html,<script>alert(1)</script>",
)
SPA_LOOK_ALIKES = (  # registered: http://127.0.0.1/callback (any port)
    "http://127.0.0.1.evil.example/callback",
    "http://127.0.0.1:8080@evil.example/callback",
    "http://evil.example#@127.0.0.1/callback",
    "http://127.0.0.1?@evil.example/callback",
    "http://127.0.0.1:5000/callback/",
    "http://127.0.0.1:5000/callback/../x",
    "http://127.0.0.1:5000/callback/%2e%2e/x",
    "http://127.0.0.1:5000/callback#x",
    "http://127.0.0.1:5000/callback?x=1",
    "http://127.0.0.1:0/callback",
    "http://127.0.0.1:65536/callback",
    "http://localhost/callback",  # another loopback name or address
    "http://localhost:5000/callback",
    "http://[::1]:5000/callback",
    "http://127.0.0.2/callback",
    "http://127.1/callback",
    "http://2130706433/callback",
    "http://0x7f000001/callback",
    "https://127.0.0.1/callback",
)


async def test_look_alike_redirect_uris_get_an_error_page_and_nothing_else(
    server: AuthServer,
) -> None:
    """With a live session (where a slip would hand out a code at once), in every
    response mode and with prompt=none: an error page, never a redirect, a form or a
    cookie, and nothing stored."""
    async with server.client() as http:
        assert (await sign_in(http))["code"]
        before = stored(server)
        cases = [("portal", uri, "openid") for uri in PORTAL_LOOK_ALIKES]
        cases += [("spa", uri, "openid") for uri in SPA_LOOK_ALIKES]
        for client_id, uri, scope in cases:
            for extra in ({}, {"response_mode": "form_post"}, {"prompt": "none"}):
                params = authorize_params(client_id=client_id, redirect_uri=uri, scope=scope)
                response = await http.get(AUTHORIZE, params={**params, **extra})
                assert response.status_code == 400, (uri, extra)
                assert_error_page(response)
                assert "<form" not in response.text and "evil" not in response.text, uri
                assert "redirect_uri is not registered for this client" in response.text
            posted = await http.post(AUTHORIZE, data=params)  # the POST form of the request
            assert_error_page(posted)
        assert stored(server) == before
    assert len(events(server, "token.issued")) == 0
    assert len(events(server, "user.signin")) == 1  # the sign-in before the corpus


# --------------------------------------------------------------------------- PKCE


@pytest.mark.parametrize("client_id", ["spa", "portal"])
async def test_authorize_refuses_missing_plain_and_method_less_pkce_even_with_a_session(
    server: AuthServer, client_id: str
) -> None:
    """A public client (PKCE mandatory) and a confidential one that did not opt out:
    the error goes back to the registered URI, with no code, and no code is stored."""
    redirect_uri = SPA_CALLBACK if client_id == "spa" else CALLBACK
    async with server.client() as http:
        assert (await sign_in(http))["code"]
        before = stored(server)
        for changes, words in (
            ({"code_challenge": None, "code_challenge_method": None}, "is required"),
            ({"code_challenge_method": "plain", "code_challenge": VERIFIER}, "must be S256"),
            ({"code_challenge_method": "plain"}, "must be S256"),
            ({"code_challenge_method": None}, "code_challenge_method is required"),  # = plain
            ({"code_challenge_method": "s256"}, "must be S256"),
            ({"code_challenge": None}, "without code_challenge"),
            ({"code_challenge": VERIFIER}, "43 characters"),  # a verifier, not its hash
        ):
            response = await http.get(
                AUTHORIZE,
                params=authorize_params(
                    client_id=client_id,
                    redirect_uri=redirect_uri,
                    scope="openid",
                    state="pk",
                    **changes,
                ),
            )
            back = redirect_query(response, redirect_uri)
            assert "code" not in back, changes
            assert back["error"] == "invalid_request" and words in back["error_description"]
            assert back["state"] == "pk" and back["iss"] == ISSUER
            assert "set-cookie" not in response.headers
        assert stored(server) == before


async def test_a_code_needs_the_verifier_of_its_own_challenge(server: AuthServer) -> None:
    """Code injection into a public client: an attacker redeems a stolen code with the
    verifier of a flow of its own; and a PKCE downgrade: a verifier sent for a code
    that was issued without a challenge."""
    async with server.client() as http:
        assert (await sign_in(http))["code"]
        mine, theirs = secrets.token_urlsafe(40), secrets.token_urlsafe(40)
        codes = {}
        for verifier in (mine, theirs):
            back = await sign_in(
                http,
                client_id="spa",
                redirect_uri=SPA_CALLBACK,
                scope="openid",
                code_challenge=s256(verifier),
            )
            codes[verifier] = back["code"]

        async def redeem(code: str, verifier: str | None) -> httpx.Response:
            data = {
                "grant_type": "authorization_code",
                "client_id": "spa",
                "code": code,
                "redirect_uri": SPA_CALLBACK,
            }
            if verifier is not None:
                data["code_verifier"] = verifier
            return await http.post(TOKEN_URL, data=data)

        assert_denied(await redeem(codes[mine], theirs))
        assert_denied(await redeem(codes[theirs], None))
        legacy = await http.get(
            AUTHORIZE,
            params=authorize_params(
                client_id="legacy",
                redirect_uri=LEGACY_CALLBACK,
                scope="openid",
                code_challenge=None,
                code_challenge_method=None,
            ),
        )
        code = redirect_query(legacy, LEGACY_CALLBACK)["code"]
        downgraded = await http.post(
            TOKEN_URL,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": LEGACY_CALLBACK,
                "code_verifier": mine,
            },
            auth=("legacy", PARTNER_SECRET),
        )
        assert_denied(downgraded)
    assert events(server, "token.issued") == []
    denied = events(server, "token.denied")
    assert [(d["client_id"], d["reason"]) for d in denied] == [
        ("spa", "invalid_grant"),
        ("spa", "invalid_grant"),
        ("legacy", "invalid_grant"),
    ]


# --------------------------------------------------------------------------- code injection


async def test_another_client_cannot_redeem_a_code_even_with_its_own_credentials(
    server: AuthServer,
) -> None:
    """Client B (confidential, its own secret, allowed the code flow) presents client
    A's code with A's redirect_uri and the right verifier; then A's code at another
    server's token endpoint; then a code A has redeemed: refused, and that replay by
    anyone revokes what A got."""
    partners_token = TOKEN_URL.replace("/default/", "/partners/")
    async with server.client() as http:
        stolen = (await sign_in(http))["code"]
        assert_denied(await partner_exchange(http, stolen, redirect_uri=CALLBACK))
        elsewhere = (await sign_in(http))["code"]
        other_server = await http.post(
            partners_token,
            data={
                "grant_type": "authorization_code",
                "code": elsewhere,
                "redirect_uri": CALLBACK,
                "code_verifier": VERIFIER,
            },
            auth=("portal", PORTAL_SECRET),
        )
        assert_denied(other_server)
        code = (await sign_in(http))["code"]
        first = await exchange(http, code)
        assert first.status_code == 200
        remember(first.json()["refresh_token"])
        replayed = await partner_exchange(http, code, redirect_uri=CALLBACK)
        assert_denied(replayed)
        assert await introspect(http, first.json()["access_token"]) == {"active": False}
        assert_denied(await refresh(http, first.json()["refresh_token"]))
    issued = events(server, "token.issued")
    assert [line["client_id"] for line in issued] == ["portal"]
    denied = [line for line in events(server, "token.denied") if line["client_id"] == "partner"]
    assert [line["reason"] for line in denied] == ["invalid_grant", "invalid_grant"]
    assert all(line["outcome"] == "denied" and line["jti"] is None for line in denied)
    assert {line["reason"] for line in events(server, "token.revoked")} == {"code_reused"}


# --------------------------------------------------------------------------- refresh tokens


async def test_another_confidential_client_cannot_use_a_refresh_token(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        first = await tokens(http)
        stolen = await http.post(
            TOKEN_URL,
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
            auth=("partner", PARTNER_SECRET),
        )
        assert_denied(stolen)
        assert (
            stolen.json()["error_description"] == "the refresh token was issued to another client"
        )
        # refused before it was retired: the owner's token still works
        assert (await refresh(http, first["refresh_token"])).status_code == 200
    assert [line["client_id"] for line in events(server, "token.issued")] == ["portal", "portal"]


async def test_a_retired_refresh_token_from_another_client_revokes_and_is_audited_as_reuse(
    server: AuthServer,
) -> None:
    """A retired refresh token has leaked, whoever presents it: the family ends and the
    audit log says reuse (DESIGN: "Presenting a retired one revokes the whole family
    ... and is audited as reuse")."""
    async with server.client() as http:
        first = await tokens(http)
        second = await refresh(http, first["refresh_token"])
        assert second.status_code == 200
        replayed = await http.post(
            TOKEN_URL,
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
            auth=("partner", PARTNER_SECRET),
        )
        assert_denied(replayed)
        assert_denied(await refresh(http, second.json()["refresh_token"]))
        assert await introspect(http, second.json()["access_token"]) == {"active": False}
    [reuse] = events(server, "token.reuse_detected")
    assert reuse["reason"] == "refresh_token_reused" and reuse["revoked"] == 2


async def test_a_refresh_cannot_add_offline_access(server: AuthServer) -> None:
    """Widening to offline_access would turn a token that ends with the session into
    one that outlives logout."""
    async with server.client() as http:
        first = await tokens(http, scope="openid orders:read")
        widened = await refresh(
            http, first["refresh_token"], scope="openid orders:read offline_access"
        )
        assert_denied(widened, "invalid_scope")
        done = await http.get(LOGOUT, params={"id_token_hint": first["id_token"]})
        assert done.status_code == 200 and "You are signed out" in done.text
        assert_denied(await refresh(http, first["refresh_token"]))
    assert [line["grant_type"] for line in events(server, "token.issued")] == ["authorization_code"]


# --------------------------------------------------------------------------- CSRF


async def test_the_sign_in_form_takes_only_its_own_csrf_token_once(server: AuthServer) -> None:
    async with server.client() as http, second_browser(server, "198.51.100.7") as attacker:
        _, earlier = await start(http)
        _, later = await start(http)  # the newer sign-in's cookie replaces the earlier's
        assert earlier.fields["csrf_token"] != later.fields["csrf_token"]
        swapped = await http.post(
            LOGIN, data={**earlier.fields, "username": "alice", "password": ALICE_PASSWORD}
        )
        assert_error_page(swapped)  # another sign-in's token
        _, own = await start(attacker)
        planted = await attacker.post(  # the attacker's sign-in, the victim's token
            LOGIN, data={**own.fields, "csrf_token": later.fields["csrf_token"]}
        )
        assert_error_page(planted)
        in_url = await http.get(LOGIN, params={"username": "alice", "password": ALICE_PASSWORD})
        assert in_url.status_code == 200 and "set-cookie" not in in_url.headers
        assert stored(server)["sessions"] == 0
        assert events(server, "user.signin") == []
        signin_cookie = http.cookies["tg_signin"]
        remember(signin_cookie)
        done = await submit(http, later)
        assert callback_params(done)["code"]
        codes = stored(server)["auth_codes"]
        replay = await http.post(  # the same POST again, with the sign-in's old cookie
            LOGIN,
            data={**later.fields, "username": "alice", "password": ALICE_PASSWORD},
            headers={"cookie": f"tg_signin={signin_cookie}"},
        )
        assert_error_page(replay)
        assert "expired" in replay.text
        assert stored(server)["auth_codes"] == codes and stored(server)["sessions"] == 1
    assert [line["outcome"] for line in events(server, "user.signin")] == ["success"]


async def test_logout_from_another_site_does_not_end_the_session(server: AuthServer) -> None:
    """Without an id_token_hint naming the session, a logout must be confirmed with a
    token only the session's own page has: a cross-site GET or POST, the attacker's
    own hint, or the attacker's own confirm token end nothing."""
    async with server.client() as victim, second_browser(server, "198.51.100.7") as attacker:
        sid = claims_of((await tokens(victim))["id_token"])["sid"]
        theirs = await tokens(attacker)  # the attacker's own sign-in and ID token
        their_csrf = Form((await attacker.get(LOGOUT)).text).fields["csrf_token"]
        hint = theirs["id_token"]
        forged: tuple[tuple[str, dict[str, str], int], ...] = (
            ("GET", {}, 200),  # asks
            ("POST", {"confirm": "yes"}, 200),
            ("POST", {"confirm": "yes", "csrf_token": ""}, 200),
            ("POST", {"confirm": "yes", "csrf_token": their_csrf}, 200),
            ("GET", {"confirm": "yes", "csrf_token": their_csrf}, 200),
            ("GET", {"id_token_hint": hint}, 200),
            ("GET", {"id_token_hint": hint, "post_logout_redirect_uri": HOME, "state": "x"}, 200),
            ("POST", {"id_token_hint": hint, "confirm": "yes", "csrf_token": their_csrf}, 200),
            ("GET", {"post_logout_redirect_uri": HOME}, 200),  # a redirect needs a hint
            ("POST", {"post_logout_redirect_uri": HOME, "confirm": "yes"}, 200),
            ("GET", {"id_token_hint": "x.y.z", "post_logout_redirect_uri": HOME}, 200),
        )
        for method, params, status in forged:
            if method == "GET":
                response = await victim.get(LOGOUT, params=params)
            else:
                response = await victim.post(LOGOUT, data=params)
            if status == 200:
                assert response.status_code == 200, (method, params)
                assert "Sign out?" in response.text and "location" not in response.headers
                assert "set-cookie" not in response.headers
                assert_unframeable(response)
            else:
                assert_error_page(response, status)
            assert server.services.store.session_alive(sid, int(server.clock())), params
        assert (await sign_in(victim))["code"]  # still signed in: SSO, no form
    assert events(server, "user.signout") == [] and events(server, "session.ended") == []


# --------------------------------------------------------------------------- session fixation


async def test_a_planted_session_cookie_is_never_adopted(server: AuthServer) -> None:
    """The attacker sets tg_session in the victim's browser before the sign-in (a
    sibling host can on http): the sign-in makes a new value, and the planted one
    signs no one in. Every sign-in makes a new value."""
    planted = secrets.token_urlsafe(32)
    remember(planted)
    async with server.client() as http:
        first = await http.get(
            AUTHORIZE, params=authorize_params(), headers={"cookie": f"tg_session={planted}"}
        )
        assert first.status_code == 303 and first.headers["location"] == LOGIN
        signin = first.cookies["tg_signin"]
        remember(signin)
        cookies = f"tg_session={planted}; tg_signin={signin}"
        form = Form((await http.get(LOGIN, headers={"cookie": cookies})).text)
        done = await http.post(
            LOGIN,
            data={**form.fields, "username": "alice", "password": ALICE_PASSWORD},
            headers={"cookie": cookies},
        )
        assert callback_params(done)["code"]
        issued = session_cookie(done)
        assert issued is not None and len(issued) == 43 and issued != planted
        store = server.services.store
        now = int(server.clock())
        assert store.touch_session(session_hash(planted), now, 60) is None
        assert store.touch_session(session_hash(issued), now, 7200) is not None
        alone = await http.get(
            AUTHORIZE, params=authorize_params(), headers={"cookie": f"tg_session={planted}"}
        )
        assert alone.status_code == 303 and alone.headers["location"] == LOGIN
        sso = await http.get(
            AUTHORIZE, params=authorize_params(), headers={"cookie": f"tg_session={issued}"}
        )
        assert callback_params(sso)["code"] and session_cookie(sso) is None
        again = await http.get(
            AUTHORIZE,
            params=authorize_params(prompt="login"),
            headers={"cookie": f"tg_session={issued}"},
        )
        signin = again.cookies["tg_signin"]
        remember(signin)
        cookies = f"tg_session={issued}; tg_signin={signin}"
        form = Form((await http.get(LOGIN, headers={"cookie": cookies})).text)
        renewed = await http.post(
            LOGIN,
            data={**form.fields, "username": "alice", "password": ALICE_PASSWORD},
            headers={"cookie": cookies},
        )
        assert callback_params(renewed)["code"]
        newer = session_cookie(renewed)
        assert newer is not None and newer not in (issued, planted)
    assert len(events(server, "session.created")) == 2


async def test_a_new_sign_in_ends_the_session_it_replaces(server: AuthServer) -> None:
    """Renewing the session id at sign-in (DESIGN: "its id is renewed at every
    sign-in") means the old id stops working: whoever copied the cookie before a
    prompt=login or max_age re-authentication must not keep the session."""
    async with server.client() as http:
        first = await http.get(AUTHORIZE, params=authorize_params())
        page = await http.get(first.headers["location"])
        old = session_cookie(await submit(http, Form(page.text)))
        assert old is not None
        _, form = await start(http, prompt="login")
        renewed = await submit(http, form)
        assert callback_params(renewed)["code"]
        assert session_cookie(renewed) not in (None, old)
    async with server.client() as thief:
        stolen = await thief.get(
            AUTHORIZE, params=authorize_params(), headers={"cookie": f"tg_session={old}"}
        )
    assert stolen.status_code == 303 and stolen.headers["location"] == LOGIN
    assert stored(server)["sessions"] == 1


# --------------------------------------------------------------------------- open redirect


async def test_logout_never_redirects_where_the_hinted_client_did_not_register(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        portal_hint = (await tokens(http))["id_token"]
        partner = await partner_exchange(http, await partner_code(http))
        assert partner.status_code == 200, partner.text
        remember(partner.json()["refresh_token"])
        partner_hint = partner.json()["id_token"]
        sid = claims_of(portal_hint)["sid"]
        assert claims_of(partner_hint)["sid"] == sid
        refused: list[dict[str, str]] = [
            {"id_token_hint": portal_hint, "post_logout_redirect_uri": PARTNER_BYE},
            {"id_token_hint": partner_hint, "post_logout_redirect_uri": HOME},
            {"client_id": "partner", "post_logout_redirect_uri": PARTNER_BYE},  # no hint
            {
                "id_token_hint": portal_hint,
                "client_id": "partner",
                "post_logout_redirect_uri": PARTNER_BYE,
            },
        ]
        for uri in (
            "javascript:alert(document.cookie)",
            "JavaScript:alert(1)//" + HOME,
            "data:text/html,<script>alert(1)</script>",
            "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
            "//evil.example/",
            "https://evil.example/",
            "HTTPS://portal.example.com/",
            "https://portal.example.com",
            HOME + "?next=https://evil.example/",
            HOME + "#@evil.example",
            "https://portal.example.com@evil.example/",
            HOME + "\r\nLocation: https://evil.example/",
        ):
            refused.append({"id_token_hint": portal_hint, "post_logout_redirect_uri": uri})
        for params in refused:
            for response in (
                await http.get(LOGOUT, params=params),
                await http.post(LOGOUT, data=params),
            ):
                # never a redirect: the signed-out page (a hint naming the session signs
                # out, as the client asked), or the question (without one)
                assert response.status_code == 200 and "location" not in response.headers
                assert_unframeable(response)
                assert "evil" not in response.text and "javascript" not in response.text.lower()
        # the first one's hint named the session: signed out, once, and nowhere sent
        assert not server.services.store.session_alive(sid, int(server.clock()))
        assert len(events(server, "user.signout")) == 1
        # and what is registered for the hinted client is where it goes (with state)
        done = await http.get(
            LOGOUT,
            params={
                "id_token_hint": partner_hint,
                "post_logout_redirect_uri": PARTNER_BYE,
                "state": "a&b=c",
            },
        )
        assert (
            done.status_code == 303 and done.headers["location"] == PARTNER_BYE + "?state=a%26b%3Dc"
        )
    assert len(events(server, "user.signout")) == 1  # no session left to end


# --------------------------------------------------------------------------- throttling


async def test_failures_lock_a_username_from_every_address_and_an_address_for_every_user(
    server: AuthServer,
) -> None:
    """Per username (5 free failures): locked from another address too. Per address
    (20): locked for every username. While locked, the right password gets the same
    401 page as a wrong one, and no session."""
    async with (
        server.client() as guesser,
        second_browser(server, "198.51.100.7") as elsewhere,
        second_browser(server, "198.51.100.8") as sprayer,
        second_browser(server, "198.51.100.9") as bystander,
    ):
        _, form = await start(guesser)
        for _ in range(6):
            wrong = await submit(guesser, form, "alice", "wrong-password")
            assert wrong.status_code == 401
        _, other_form = await start(elsewhere)
        locked = await submit(elsewhere, other_form, "alice", ALICE_PASSWORD)
        assert locked.status_code == 401 and "location" not in locked.headers
        assert "set-cookie" not in locked.headers
        assert without_values(locked.text) == without_values(wrong.text)
        assert_unframeable(locked)
        assert "The username or password is incorrect." in locked.text
        # that address is not locked for other users
        assert callback_params(await submit(elsewhere, other_form, "carol", ALICE_PASSWORD))
        _, spray_form = await start(sprayer)
        for i in range(21):
            sprayed = await submit(sprayer, spray_form, f"nobody{i}", "wrong-password")
            assert sprayed.status_code == 401
        sessions = stored(server)["sessions"]
        blocked = await submit(sprayer, spray_form, "carol", ALICE_PASSWORD)
        assert blocked.status_code == 401 and "set-cookie" not in blocked.headers
        assert without_values(blocked.text) == without_values(sprayed.text)
        assert stored(server)["sessions"] == sessions
        _, fresh = await start(bystander)  # other addresses are not locked for carol
        assert callback_params(await submit(bystander, fresh, "carol", ALICE_PASSWORD))["code"]
    lines = events(server, "user.signin")
    by = {(line["remote_addr"], line["username"], line["reason"]) for line in lines}
    assert ("198.51.100.7", "alice", "locked") in by
    assert ("198.51.100.8", "carol", "locked") in by
    assert all(line["outcome"] == "failure" for line in lines if line["reason"] == "locked")
    successes = [line["remote_addr"] for line in lines if line["outcome"] == "success"]
    assert successes == ["198.51.100.7", "198.51.100.9"]


# --------------------------------------------------------------------------- enumeration


def no_throttle(data: dict[str, Any]) -> None:
    attack_config(data)
    data["authserver"]["client_auth_throttle"] = {"failures": 0, "ip_failures": 0}


async def median_seconds(
    http: httpx.AsyncClient, form: Form, attempts: list[tuple[str, str]], rounds: int = 9
) -> list[float]:
    """The median time of each (username, password) over ``rounds``, interleaved so
    that a slow spell of the machine slows them all."""
    times: list[list[float]] = [[] for _ in attempts]
    for _ in range(rounds):
        for i, (username, password) in enumerate(attempts):
            started = time.perf_counter()
            response = await submit(http, form, username, password)
            times[i].append(time.perf_counter() - started)
            assert response.status_code == 401
    return [statistics.median(t) for t in times]


async def assert_about_the_same_time(
    http: httpx.AsyncClient, form: Form, attempts: list[tuple[str, str]]
) -> None:
    """Every median within 50% of every other, each a real verification. A busy
    machine (the suite shares two cores) may skew one measurement: up to three are
    taken, and one that agrees is enough; a real difference fails all three."""
    await submit(http, form, "warm-up", "wrong-password")
    measured = []
    for _ in range(3):
        medians = await median_seconds(http, form, attempts)
        measured.append(medians)
        if min(medians) > 0.003 and max(medians) < 1.5 * min(medians):
            return
    raise AssertionError(f"medians (s) of {[a[0][:10] for a in attempts]}: {measured}")


async def test_unknown_disabled_and_existing_users_take_about_the_same_time(
    make_authserver: Any,
) -> None:
    server = make_authserver(no_throttle)
    async with server.client() as http:
        _, form = await start(http)
        await assert_about_the_same_time(
            http,
            form,
            [
                ("alice", "wrong-password"),
                ("nobody", "wrong-password"),
                ("mallory", ALICE_PASSWORD),  # disabled, right password
                ("x" * 300, "wrong-password"),  # not even a valid username
            ],
        )
    reasons = {line["reason"] for line in events(server, "user.signin")}
    assert reasons == {"bad_credentials", "disabled"}


WEAK_HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=Type.ID).hash(
    "dave-password"
)


async def test_a_user_with_a_weaker_hash_takes_as_long_as_an_unknown_one(
    make_authserver: Any,
) -> None:
    def weak_user(data: dict[str, Any]) -> None:
        no_throttle(data)
        data["authserver"]["users"].append({"username": "dave", "password_hash": WEAK_HASH})

    server = make_authserver(weak_user)
    async with server.client() as http:
        _, form = await start(http)
        await assert_about_the_same_time(
            http, form, [("dave", "wrong-password"), ("nobody", "wrong-password")]
        )


# --------------------------------------------------------------------------- disabled, assignment


async def test_a_disabled_user_gets_no_session_code_or_token(server: AuthServer) -> None:
    async with server.client() as http:
        _, form = await start(http)
        refused = await submit(http, form, "mallory", ALICE_PASSWORD)  # the right password
        assert refused.status_code == 401 and "location" not in refused.headers
        assert "set-cookie" not in refused.headers
        assert stored(server)["sessions"] == 0
        # alice signs in, gets a code and tokens; then she is disabled
        body = await tokens(http)
        code = (await sign_in(http))["code"]
        alice = await server.services.users.find("alice")
        assert alice is not None
        record = server.services.store.user(alice.id)
        assert record is not None
        server.services.store.update_user(dataclasses.replace(record, disabled=True))
        assert_denied(await exchange(http, code))
        sso = await http.get(AUTHORIZE, params=authorize_params())
        assert sso.status_code == 303 and sso.headers["location"] == LOGIN  # no code
        again = await http.get(LOGIN)
        assert_denied(await refresh(http, body["refresh_token"]))
        userinfo = await http.get(
            USERINFO, headers={"authorization": f"Bearer {body['access_token']}"}
        )
        assert userinfo.status_code == 401
        retry = await submit(http, Form(again.text), "alice", ALICE_PASSWORD)
        assert retry.status_code == 401 and "set-cookie" not in retry.headers
    reasons = [line["reason"] for line in events(server, "user.signin")]
    assert reasons == ["disabled", "ok", "disabled"]
    assert [line["grant_type"] for line in events(server, "token.issued")] == ["authorization_code"]


async def test_a_user_outside_the_client_s_groups_gets_no_session_code_or_token(
    server: AuthServer,
) -> None:
    admin = {"client_id": "admin-app", "redirect_uri": ADMIN_CALLBACK, "scope": "openid"}
    async with server.client() as http:
        _, form = await start(http, **admin, state="adm")
        denied = await submit(http, form)  # alice, the right password, not in admins
        back = redirect_query(denied, ADMIN_CALLBACK)
        assert back == {
            "error": "access_denied",
            "error_description": "the user is not assigned to this client",
            "state": "adm",
            "iss": ISSUER,
        }
        assert session_cookie(denied) is None and stored(server)["sessions"] == 0
        assert stored(server)["auth_codes"] == 0
    async with server.client() as http:  # carol is in admins; then she is taken out
        _, form = await start(http, **admin)
        code = redirect_query(await submit(http, form, "carol", ALICE_PASSWORD), ADMIN_CALLBACK)[
            "code"
        ]
        carol = await server.services.users.find("carol")
        assert carol is not None
        record = server.services.store.user(carol.id)
        assert record is not None
        server.services.store.update_user(dataclasses.replace(record, groups=()))
        redeemed = await http.post(
            TOKEN_URL,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": ADMIN_CALLBACK,
                "code_verifier": VERIFIER,
            },
            auth=("admin-app", PORTAL_SECRET),
        )
        assert_denied(redeemed)
    lines = events(server, "user.signin")
    assert [(line["username"], line["reason"]) for line in lines] == [
        ("alice", "not_assigned"),
        ("carol", "ok"),
    ]
    assert events(server, "token.issued") == []


# --------------------------------------------------------------------------- framing


async def test_every_page_refuses_to_be_framed(server: AuthServer) -> None:
    pages: dict[str, tuple[httpx.Response, int]] = {}
    async with server.client() as http, server.client() as stranger:
        first = await http.get(AUTHORIZE, params=authorize_params())
        pages["authorize redirect"] = (first, 303)
        form_page = await http.get(LOGIN)
        pages["sign-in"] = (form_page, 200)
        form = Form(form_page.text)
        pages["sign-in failure"] = (await submit(http, form, "alice", "wrong-password"), 401)
        pages["csrf error"] = (await http.post(LOGIN, data={"username": "alice"}), 400)
        pages["expired sign-in"] = (await stranger.get(LOGIN), 400)
        done = await submit(http, form)
        callback_params(done)
        pages["sign-in redirect"] = (done, 303)
        pages["authorize error"] = (
            await http.get(AUTHORIZE, params=authorize_params(redirect_uri=CALLBACK + "/")),
            400,
        )
        pages["authorize 405"] = (await http.put(AUTHORIZE), 405)
        posted = await http.get(AUTHORIZE, params=authorize_params(response_mode="form_post"))
        remember(Form(posted.text).fields["code"])
        pages["form_post"] = (posted, 200)
        pages["form_post error"] = (
            await http.get(
                AUTHORIZE, params=authorize_params(response_mode="form_post", scope="nope")
            ),
            200,
        )
        pages["logout confirm"] = (await http.get(LOGOUT), 200)
        pages["logout, a forged hint"] = (
            await http.get(LOGOUT, params={"id_token_hint": "x.y.z"}),
            200,
        )
        confirm = Form(pages["logout confirm"][0].text)
        pages["signed out"] = (
            await http.post(LOGOUT, data={**confirm.fields, "confirm": "yes"}),
            200,
        )
    for name, (response, status) in pages.items():
        assert response.status_code == status, name
        assert_unframeable(response)
        if status != 303:
            assert response.headers["content-type"].startswith("text/html"), name
    assert "You are signed out" in pages["signed out"][0].text


async def test_the_logout_confirmation_may_continue_to_the_client_and_nowhere_else(
    server: AuthServer,
) -> None:
    """The confirmation's POST is answered with a 303 to the post_logout_redirect_uri,
    which Chromium checks against the page's form-action: that origin must be there (the
    sign-in page's is checked in test_signin_flow.py), and no other."""
    async with server.client() as http, second_browser(server, "198.51.100.7") as other:
        await tokens(http)
        elsewhere = (await tokens(other))["id_token"]  # names another session
        confirm = await http.get(
            LOGOUT, params={"id_token_hint": elsewhere, "post_logout_redirect_uri": HOME}
        )
        assert confirm.status_code == 200 and "Sign out?" in confirm.text
        assert form_action(confirm) == ["'self'", "https://portal.example.com"]
        plain = await http.get(LOGOUT)
        assert plain.status_code == 200 and form_action(plain) == ["'self'"]


def form_action(response: httpx.Response) -> list[str]:
    for directive in response.headers["content-security-policy"].split("; "):
        name, _, sources = directive.partition(" ")
        if name == "form-action":
            return sources.split()
    return []


# --------------------------------------------------------------------------- CORS

DISALLOWED_ORIGINS = (
    "https://evil.example",
    "null",
    SPA_ORIGIN + "/",
    SPA_ORIGIN + ".evil.example",
    "https://SPA.example.com",
    "http://spa.example.com",
    "https://spa.example.com:443",
    "https://spa.example.com:8443",
    "https://evil.spa.example.com",
    SPA_ORIGIN + " https://evil.example",
)


async def test_a_disallowed_origin_never_gets_cors_headers(server: AuthServer) -> None:
    async with server.client() as http:
        access = (await tokens(http))["access_token"]
        bearer = {"authorization": f"Bearer {access}"}
        for origin in DISALLOWED_ORIGINS:
            h = {"origin": origin}
            preflight = {**h, "access-control-request-method": "POST"}
            answers = (
                (await http.options(TOKEN_URL, headers=preflight), 405),
                (await http.options(USERINFO, headers=preflight), 405),
                (await http.options(REVOKE, headers=preflight), 405),
                (await http.options(f"{ISSUER}/v1/keys", headers=preflight), 405),
                (
                    await http.post(
                        TOKEN_URL,
                        data={"grant_type": "client_credentials"},
                        auth=("reporting", REPORTING_SECRET),
                        headers=h,
                    ),
                    200,
                ),
                (await http.get(USERINFO, headers={**h, **bearer}), 200),
                (await http.get(f"{ISSUER}/v1/keys", headers=h), 200),
                (await http.get(f"{ISSUER}/.well-known/openid-configuration", headers=h), 200),
                (await http.post(REVOKE, data={"token": "x"}, headers=h), 401),
            )
            for response, status in answers:
                assert response.status_code == status, (origin, response.request.url)
                assert not [k for k in response.headers if k.startswith("access-control-")], (
                    origin,
                    response.request.url,
                )


async def test_the_authorize_endpoint_and_the_sign_in_pages_never_send_cors_headers(
    server: AuthServer,
) -> None:
    """Not even for an origin a client lists: they are pages, not APIs."""
    h = {"origin": SPA_ORIGIN}
    preflight = {**h, "access-control-request-method": "POST"}
    async with server.client() as http:
        answers = [
            (await http.options(AUTHORIZE, headers=preflight), 405),
            (await http.get(AUTHORIZE, params=authorize_params(), headers=h), 303),
            (await http.options(LOGIN, headers=preflight), 405),
            (await http.get(LOGIN, headers=h), 200),
        ]
        form = Form(answers[-1][0].text)
        for password, status in (("wrong-password", 401), (ALICE_PASSWORD, 303)):
            posted = await http.post(
                LOGIN,
                data={**form.fields, "username": "alice", "password": password},
                headers=h,
            )
            answers.append((posted, status))
        callback_params(posted)
        answers.append((await http.get(LOGOUT, headers=h), 200))
        answers.append((await http.options(LOGOUT, headers=preflight), 405))
        answers.append((await http.post(INTROSPECT, data={"token": "x"}, headers=h), 401))
    for response, status in answers:
        assert response.status_code == status, response.request.url
        assert not [k for k in response.headers if k.startswith("access-control-")], (
            response.request.url
        )
