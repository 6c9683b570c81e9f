"""The authorization request's checks: errors before the client and redirect URI are
known good are never redirected; after, they go back with state and iss."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from authserver.authorize import (
    PageError,
    RedirectError,
    Target,
    client_scopes,
    form_post_page,
    parse_authorize,
    redirect_location,
)
from authserver.config import ClientConfig, ServerConfig
from authserver.pkce import s256

ISSUER = "https://id.example.com/oauth2/default"
SERVER = ServerConfig("default", ISSUER, "api://default", "RS256", 3600, ("orders:read",))
OTHER = ServerConfig("other", ISSUER[:-7] + "other", "api://other", "RS256", 3600, ())
CALLBACK = "https://portal.example.com/callback"
VERIFIER = "v" * 43


def client(client_id: str = "portal", **changes: Any) -> ClientConfig:
    base = ClientConfig(
        client_id=client_id,
        auth_methods=frozenset({"client_secret_basic"}),
        secret_digest=b"x" * 32,
        jwks=(),
        jwks_uri=None,
        grant_types=frozenset({"authorization_code"}),
        scopes=("openid", "profile", "orders:read"),
        servers=frozenset({"default"}),
        claims=MappingProxyType({}),
        redirect_uris=(CALLBACK, "http://127.0.0.1/cb"),
    )
    return dataclasses.replace(base, **changes)


CLIENTS = {
    "portal": client(),
    "spa": client("spa", auth_methods=frozenset({"none"}), secret_digest=None),
    "legacy": client("legacy", require_pkce=False),
    "machine": client("machine", grant_types=frozenset({"client_credentials"})),
    "elsewhere": client("elsewhere", servers=frozenset({"other"})),
}


def good(**changes: str | None) -> dict[str, str]:
    params = {
        "client_id": "portal",
        "redirect_uri": CALLBACK,
        "response_type": "code",
        "scope": "openid orders:read",
        "state": "st-1",
        "code_challenge": s256(VERIFIER),
        "code_challenge_method": "S256",
    }
    params.update(changes)  # type: ignore[arg-type]
    return {k: v for k, v in params.items() if v is not None}


def test_a_good_request() -> None:
    request = parse_authorize(
        SERVER,
        CLIENTS,
        good(nonce="n", prompt="login", max_age="300", login_hint="alice", extra="ignored"),
    )
    assert request.client.client_id == "portal"
    assert request.target == Target(CALLBACK, "query", "st-1", ISSUER)
    assert request.scopes == ("openid", "orders:read")
    assert request.code_challenge == s256(VERIFIER)
    assert (request.nonce, request.prompt, request.max_age, request.login_hint) == (
        "n",
        "login",
        300,
        "alice",
    )


@pytest.mark.parametrize(
    ("changes", "repeated", "error"),
    [
        ({"client_id": None}, (), "invalid_request"),
        ({"client_id": "nobody"}, (), "invalid_client"),
        ({"client_id": "elsewhere"}, (), "invalid_client"),  # not on this server
        ({"redirect_uri": None}, (), "invalid_request"),
        ({"redirect_uri": "https://evil.example/callback"}, (), "invalid_request"),
        ({"redirect_uri": CALLBACK + "/../evil"}, (), "invalid_request"),
        (
            {"redirect_uri": "https://portal.example.com@evil.example/callback"},
            (),
            "invalid_request",
        ),
        ({"client_id": "spa", "redirect_uri": CALLBACK + "x"}, (), "invalid_request"),
        ({}, ("redirect_uri",), "invalid_request"),
        ({}, ("client_id",), "invalid_request"),
        # whatever else is wrong too: nothing goes to an unvalidated redirect_uri
        (
            {"redirect_uri": "https://evil.example/", "response_type": "token"},
            (),
            "invalid_request",
        ),
        ({"redirect_uri": "https://evil.example/", "request": "x"}, (), "invalid_request"),
    ],
)
def test_errors_before_the_redirect_uri_is_known_good_are_shown_not_redirected(
    changes: dict[str, str | None], repeated: tuple[str, ...], error: str
) -> None:
    with pytest.raises(PageError) as caught:
        parse_authorize(SERVER, CLIENTS, good(**changes), repeated)
    assert caught.value.error == error


@pytest.mark.parametrize(
    ("changes", "repeated", "error"),
    [
        ({"response_type": None}, (), "invalid_request"),
        ({"response_type": "token"}, (), "unsupported_response_type"),
        ({"response_type": "code id_token"}, (), "unsupported_response_type"),
        ({"request": "eyJ..."}, (), "request_not_supported"),
        ({"request_uri": "https://x/r"}, (), "request_uri_not_supported"),
        ({"response_mode": "web_message"}, (), "invalid_request"),
        ({"scope": None}, (), "invalid_scope"),
        ({"scope": "orders:write"}, (), "invalid_scope"),
        ({"scope": "openid email"}, (), "invalid_scope"),  # email: not in the client's list
        ({"scope": 'a"b'}, (), "invalid_scope"),
        ({"code_challenge": None, "code_challenge_method": None}, (), "invalid_request"),
        ({"code_challenge_method": "plain"}, (), "invalid_request"),
        ({"code_challenge_method": None}, (), "invalid_request"),
        ({"code_challenge": "short"}, (), "invalid_request"),
        ({"prompt": "none login"}, (), "invalid_request"),
        ({"max_age": "-1"}, (), "invalid_request"),
        ({"max_age": "1e3"}, (), "invalid_request"),
        ({"nonce": "n" * 513}, (), "invalid_request"),
        ({"state": "s" * 2049}, (), "invalid_request"),
        ({"client_id": "machine"}, (), "unauthorized_client"),
        ({}, ("scope",), "invalid_request"),
    ],
)
def test_errors_after_it_go_back_to_the_client(
    changes: dict[str, str | None], repeated: tuple[str, ...], error: str
) -> None:
    with pytest.raises(RedirectError) as caught:
        parse_authorize(SERVER, CLIENTS, good(**changes), repeated)
    assert caught.value.error == error
    params = caught.value.params()
    assert params["error"] == error and params["iss"] == ISSUER
    if "state" in good(**changes) and len(good(**changes)["state"]) <= 2048:
        assert params["state"] == "st-1"


def test_public_clients_must_use_pkce_and_only_an_opted_out_confidential_one_may_not() -> None:
    no_pkce = {"code_challenge": None, "code_challenge_method": None}
    with pytest.raises(RedirectError, match="code_challenge is required"):
        parse_authorize(SERVER, CLIENTS, good(client_id="spa", **no_pkce))
    spa_public_opt_out = {**CLIENTS, "spa": dataclasses.replace(CLIENTS["spa"], require_pkce=False)}
    with pytest.raises(RedirectError, match="code_challenge is required"):
        parse_authorize(SERVER, spa_public_opt_out, good(client_id="spa", **no_pkce))
    legacy = parse_authorize(SERVER, CLIENTS, good(client_id="legacy", **no_pkce))
    assert legacy.code_challenge is None
    with pytest.raises(RedirectError, match="S256"):  # plain: never, opt-out or not
        parse_authorize(SERVER, CLIENTS, good(client_id="legacy", code_challenge_method="plain"))


def test_a_loopback_redirect_uri_on_any_port_and_form_post() -> None:
    request = parse_authorize(
        SERVER,
        CLIENTS,
        good(client_id="spa", redirect_uri="http://127.0.0.1:53177/cb", response_mode="form_post"),
    )
    assert request.target.redirect_uri == "http://127.0.0.1:53177/cb"
    assert request.target.response_mode == "form_post"


def test_prompt_and_hints() -> None:
    assert parse_authorize(SERVER, CLIENTS, good(prompt="none")).prompt == "none"
    assert parse_authorize(SERVER, CLIENTS, good(prompt="consent")).prompt is None
    assert parse_authorize(SERVER, CLIENTS, good(prompt="login consent")).prompt == "login"
    assert parse_authorize(SERVER, CLIENTS, good(max_age="0")).max_age == 0
    assert parse_authorize(SERVER, CLIENTS, good(login_hint="x" * 257)).login_hint is None


def test_the_scopes_a_client_may_ask_for() -> None:
    assert client_scopes(SERVER, CLIENTS["portal"]) == {"openid", "profile", "orders:read"}
    every = dataclasses.replace(CLIENTS["portal"], scopes=None)
    assert client_scopes(SERVER, every) == {
        "openid",
        "profile",
        "email",
        "address",
        "phone",
        "orders:read",
    }  # offline_access only with the refresh_token grant
    refreshing = dataclasses.replace(
        every, grant_types=frozenset({"authorization_code", "refresh_token"})
    )
    assert "offline_access" in client_scopes(SERVER, refreshing)
    assert client_scopes(OTHER, CLIENTS["portal"]) == {"openid", "profile"}


def test_responses_carry_state_and_iss() -> None:
    target = Target("https://app.example/cb?tenant=a&b=1", "query", "s t&x", ISSUER)
    location = redirect_location(target, target.params(code="abc"))
    parts = urlsplit(location)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "app.example", "/cb")
    assert parse_qsl(parts.query) == [
        ("tenant", "a"),
        ("b", "1"),
        ("code", "abc"),
        ("state", "s t&x"),
        ("iss", ISSUER),
    ]
    stateless = Target(CALLBACK, "query", None, ISSUER)
    assert stateless.params(code="c") == {"code": "c", "iss": ISSUER}


def test_the_form_post_page_escapes_what_it_carries() -> None:
    target = Target(CALLBACK, "form_post", '"><script>alert(1)</script>', ISSUER)
    page = form_post_page(target, target.params(code="abc")).decode()
    assert "<script" not in page
    assert f'action="{CALLBACK}"' in page and 'method="post"' in page
    assert 'name="code" value="abc"' in page
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in page
    assert f'name="iss" value="{ISSUER}"' in page
