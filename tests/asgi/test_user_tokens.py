"""A user's tokens after sign-in: refresh tokens (rotation, reuse, narrowing, the
session's end), userinfo, RP-initiated logout, app assignment by group, user claims,
introspection and revocation of refresh tokens, and CORS for browser apps."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from authserver.pkce import s256
from tests.asgi.test_signin_flow import (
    ALICE_PASSWORD,
    AUTHORIZE,
    CALLBACK,
    PORTAL_SECRET,
    SPA_CALLBACK,
    Form,
    _remember_secrets,  # noqa: F401  (autouse: records what the log-leak search looks for)
    authorize_params,
    callback_params,
    exchange,
    remember,
    sign_in,
    sign_in_config,
    start,
    submit,
)
from tests.conftest import ISSUER, REPORTING_SECRET, TOKEN_URL, AuthServer

pytestmark = pytest.mark.anyio

USERINFO = f"{ISSUER}/v1/userinfo"
LOGOUT = f"{ISSUER}/v1/logout"
INTROSPECT = f"{ISSUER}/v1/introspect"
REVOKE = f"{ISSUER}/v1/revoke"
HOME = "https://portal.example.com/"
SPA_ORIGIN = "https://spa.example.com"
PARTNER = "https://partner.example.com/cb"
LEGACY = "https://legacy.example.com/cb"


def config(data: dict[str, Any]) -> None:
    sign_in_config(data)
    auth = data["authserver"]
    portal, spa = auth["clients"][-2:]
    portal["grant_types"] = ["authorization_code", "refresh_token"]
    portal["scopes"] += ["offline_access"]
    portal["post_logout_redirect_uris"] = [HOME]
    spa["grant_types"] = ["authorization_code", "refresh_token"]
    spa["allowed_origins"] = [SPA_ORIGIN]
    auth["clients"].append(
        {
            "client_id": "admin-app",
            "secret": PORTAL_SECRET,
            "grant_types": ["authorization_code"],
            "redirect_uris": ["https://admin.example.com/cb"],
            "groups": ["admins"],
            "scopes": ["openid"],
        }
    )
    auth["clients"].append(
        {
            "client_id": "legacy-cli",
            "secret": PORTAL_SECRET,
            "grant_types": ["password", "refresh_token"],
            "scopes": ["openid", "profile", "orders:read"],
        }
    )
    auth["clients"].append(
        {
            "client_id": "partner-app",
            "secret": PORTAL_SECRET,
            "grant_types": ["authorization_code"],
            "redirect_uris": [PARTNER],
            "scopes": ["openid", "email", "orders:read"],
            "consent": "required",
        }
    )
    auth["clients"].append(
        {
            "client_id": "legacy-spa",
            "auth_method": "none",
            "grant_types": ["implicit"],
            "redirect_uris": [LEGACY],
            "scopes": ["openid", "profile", "orders:read"],
        }
    )
    auth["users"][0]["groups"] = ["engineering"]
    auth["users"].append({"username": "bob", "password_hash": auth["users"][0]["password_hash"]})
    auth["users"][0]["profile"]["department"] = "R&D"
    auth["servers"][0]["user_claims"] = [
        {"name": "groups", "from": "groups", "into": ["access_token", "id_token"]},
        {"name": "dept", "from": "profile.department", "into": ["access_token"]},
    ]


@pytest.fixture
def server(make_authserver: Any) -> AuthServer:
    return make_authserver(config)  # type: ignore[no-any-return]


async def tokens(
    http: httpx.AsyncClient, scope: str = "openid profile email orders:read"
) -> dict[str, Any]:
    back = await sign_in(http, scope=scope)
    response = await exchange(http, back["code"])
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    remember(body["refresh_token"])
    return body


async def refresh(http: httpx.AsyncClient, token: str, **extra: str) -> httpx.Response:
    response = await http.post(
        TOKEN_URL,
        data={"grant_type": "refresh_token", "refresh_token": token, **extra},
        auth=("portal", PORTAL_SECRET),
    )
    if response.status_code == 200:
        remember(response.json()["refresh_token"])
    return response


async def introspect(http: httpx.AsyncClient, token: str, **extra: str) -> dict[str, Any]:
    response = await http.post(
        INTROSPECT, data={"token": token, **extra}, auth=("portal", PORTAL_SECRET)
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- refresh


async def test_a_refresh_token_is_rotated_on_every_use(server: AuthServer) -> None:
    async with server.client() as http:
        first = await tokens(http)
        assert len(first["refresh_token"]) >= 43 and "." not in first["refresh_token"]
        second = await refresh(http, first["refresh_token"])
        assert second.status_code == 200, second.text
        body = second.json()
        assert body["refresh_token"] != first["refresh_token"]
        assert set(body) == {
            "access_token",
            "token_type",
            "expires_in",
            "scope",
            "refresh_token",
            "id_token",
        }
        assert body["scope"] == "openid profile email orders:read"
        access = claims_of(body["access_token"])
        assert access["sub"] == claims_of(first["access_token"])["sub"]
        assert access["client_id"] == "portal" and access["preferred_username"] == "alice"
        id_token = claims_of(body["id_token"])
        assert id_token["aud"] == "portal" and "nonce" not in id_token
        assert second.headers["cache-control"] == "no-store"
        third = await refresh(http, body["refresh_token"])
        assert third.status_code == 200


async def test_a_retired_refresh_token_revokes_its_whole_family(server: AuthServer) -> None:
    async with server.client() as http:
        first = await tokens(http)
        second = (await refresh(http, first["refresh_token"])).json()
        third = (await refresh(http, second["refresh_token"])).json()
        reused = await refresh(http, first["refresh_token"])
        assert reused.status_code == 400
        assert reused.json()["error"] == "invalid_grant"
        # the live refresh token and every access token of the family are dead now
        assert (await refresh(http, third["refresh_token"])).json()["error"] == "invalid_grant"
        for body in (first, second, third):
            assert await introspect(http, body["access_token"]) == {"active": False}
    lines = server.audit_lines()
    [reuse] = [line for line in lines if line["event"] == "token.reuse_detected"]
    assert reuse["grant_type"] == "refresh_token" and reuse["client_id"] == "portal"
    assert reuse["revoked"] == 3 and reuse["reason"] == "refresh_token_reused"
    issued = [line for line in lines if line["event"] == "token.issued"]
    assert [line["grant_type"] for line in issued] == [
        "authorization_code",
        "refresh_token",
        "refresh_token",
    ]


async def test_two_uses_at_once_only_one_wins(server: AuthServer) -> None:
    import anyio

    async with server.client() as http:
        first = await tokens(http)
        results: list[int] = []

        async def use() -> None:
            results.append((await refresh(http, first["refresh_token"])).status_code)

        async with anyio.create_task_group() as group:
            group.start_soon(use)
            group.start_soon(use)
        assert sorted(results) == [200, 400]


async def test_a_refresh_narrows_scopes_and_never_widens_them(server: AuthServer) -> None:
    async with server.client() as http:
        first = await tokens(http, scope="openid orders:read")
        narrowed = await refresh(http, first["refresh_token"], scope="orders:read")
        assert narrowed.status_code == 200
        assert narrowed.json()["scope"] == "orders:read" and "id_token" not in narrowed.json()
        widened = await refresh(http, narrowed.json()["refresh_token"], scope="orders:read email")
        assert widened.status_code == 400 and widened.json()["error"] == "invalid_scope"
        # a refused request cost nothing: the token still works, with the original scopes
        again = await refresh(http, narrowed.json()["refresh_token"])
        assert again.status_code == 200 and again.json()["scope"] == "openid orders:read"


async def test_another_client_cannot_use_a_refresh_token(server: AuthServer) -> None:
    async with server.client() as http:
        first = await tokens(http)
        stolen = await http.post(
            TOKEN_URL,
            data={
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
                "client_id": "spa",
            },
        )
        assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
        assert (await refresh(http, first["refresh_token"])).status_code == 200


async def test_a_disabled_user_s_refresh_tokens_stop_at_once(server: AuthServer) -> None:
    async with server.client() as http:
        first = await tokens(http)
        alice = await server.services.users.find("alice")
        assert alice is not None
        record = server.services.store.user(alice.id)
        assert record is not None
        import dataclasses

        server.services.store.update_user(dataclasses.replace(record, disabled=True))
        refused = await refresh(http, first["refresh_token"])
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
        assert await introspect(http, first["access_token"]) == {"active": False}


async def test_refresh_tokens_expire_idle_and_at_the_family_s_end(make_authserver: Any) -> None:
    def short(data: dict[str, Any]) -> None:
        config(data)
        data["authserver"]["servers"][0]["refresh_tokens"] = {"idle_ttl": "1h", "max_ttl": "3h"}
        data["authserver"]["sessions"] = {"idle_timeout": "1d", "max_lifetime": "1d"}

    server = make_authserver(short)
    async with server.client() as http:
        first = await tokens(http)
        server.clock.advance(3601)  # unused for longer than idle_ttl
        assert (await refresh(http, first["refresh_token"])).json()["error"] == "invalid_grant"
        token = (await tokens(http))["refresh_token"]
        for _ in range(3):  # each use within idle_ttl of the last: it lives on...
            server.clock.advance(3000)
            response = await refresh(http, token)
            assert response.status_code == 200, response.text
            token = response.json()["refresh_token"]
        server.clock.advance(1900)  # ...up to max_ttl after the sign-in (10900 s > 3 h)
        assert (await refresh(http, token)).json()["error"] == "invalid_grant"


async def test_logout_ends_refresh_tokens_without_offline_access(server: AuthServer) -> None:
    async with server.client() as http:
        online = await tokens(http)
        offline = await tokens(http, scope="openid orders:read offline_access")
        hint = online["id_token"]
        done = await http.get(
            LOGOUT, params={"id_token_hint": hint, "post_logout_redirect_uri": HOME, "state": "s1"}
        )
        assert done.status_code == 303 and done.headers["location"] == HOME + "?state=s1"
        assert (await refresh(http, online["refresh_token"])).json()["error"] == "invalid_grant"
        assert await introspect(http, online["access_token"]) == {"active": False}
        assert (await refresh(http, offline["refresh_token"])).status_code == 200


async def test_a_public_client_refreshes_without_a_secret(server: AuthServer) -> None:
    async with server.client() as http:
        verifier = secrets.token_urlsafe(40)
        back = await sign_in(
            http,
            client_id="spa",
            redirect_uri=SPA_CALLBACK,
            scope="openid orders:read",
            code_challenge=s256(verifier),
        )
        first = await http.post(
            TOKEN_URL,
            data={
                "grant_type": "authorization_code",
                "code": back["code"],
                "redirect_uri": SPA_CALLBACK,
                "code_verifier": verifier,
                "client_id": "spa",
            },
        )
        assert first.status_code == 200, first.text
        remember(first.json()["refresh_token"])
        again = await http.post(
            TOKEN_URL,
            data={
                "grant_type": "refresh_token",
                "refresh_token": first.json()["refresh_token"],
                "client_id": "spa",
            },
            headers={"origin": SPA_ORIGIN},
        )
        assert again.status_code == 200
        assert again.headers["access-control-allow-origin"] == SPA_ORIGIN
        remember(again.json()["refresh_token"])


async def test_refresh_tokens_can_be_introspected_and_revoked(server: AuthServer) -> None:
    async with server.client() as http:
        first = await tokens(http)
        found = await introspect(http, first["refresh_token"], token_type_hint="refresh_token")
        assert found["active"] is True and found["token_type"] == "refresh_token"
        assert (
            found["client_id"] == "portal" and found["scope"] == "openid profile email orders:read"
        )
        assert found["sub"] == claims_of(first["access_token"])["sub"]
        other = await http.post(
            INTROSPECT, data={"token": first["refresh_token"]}, auth=("reporting", REPORTING_SECRET)
        )
        assert other.json() == {"active": False}  # another client's token
        revoked = await http.post(
            REVOKE,
            data={"token": first["refresh_token"], "token_type_hint": "refresh_token"},
            auth=("portal", PORTAL_SECRET),
        )
        assert revoked.status_code == 200 and revoked.content == b""
        assert await introspect(http, first["refresh_token"]) == {"active": False}
        assert await introspect(http, first["access_token"]) == {"active": False}
        assert (await refresh(http, first["refresh_token"])).json()["error"] == "invalid_grant"


async def test_code_reuse_revokes_the_refresh_tokens_it_gave(server: AuthServer) -> None:
    async with server.client() as http:
        back = await sign_in(http)
        first = (await exchange(http, back["code"])).json()
        remember(first["refresh_token"])
        second = await refresh(http, first["refresh_token"])
        assert (await exchange(http, back["code"])).json()["error"] == "invalid_grant"
        assert (await refresh(http, second.json()["refresh_token"])).json()[
            "error"
        ] == "invalid_grant"
        assert await introspect(http, second.json()["access_token"]) == {"active": False}
        assert await introspect(http, first["access_token"]) == {"active": False}
    # the code's own access token is recorded with the code, in the family's transaction
    revoked = {
        line["jti"]
        for line in server.audit_lines()
        if line["event"] == "token.revoked" and line["reason"] == "code_reused"
    }
    assert revoked == {
        claims_of(first["access_token"])["jti"],
        claims_of(second.json()["access_token"])["jti"],
    }


# --------------------------------------------------------------------------- userinfo


async def test_userinfo_answers_with_the_granted_scopes_claims(server: AuthServer) -> None:
    async with server.client() as http:
        body = await tokens(http)
        bearer = {"authorization": f"Bearer {body['access_token']}"}
        response = await http.get(USERINFO, headers=bearer)
        assert response.status_code == 200
        info = response.json()
        assert info["sub"] == claims_of(body["access_token"])["sub"]
        assert info["name"] == "Alice Doe" and info["email"] == "alice@example.com"
        assert info["preferred_username"] == "alice" and info["groups"] == ["engineering"]
        assert "dept" not in info  # an access-token-only claim
        posted = await http.post(USERINFO, data={"access_token": body["access_token"]})
        assert posted.json() == info
        narrow = (await tokens(http, scope="openid")).get("access_token")
        assert set(
            (await http.get(USERINFO, headers={"authorization": f"Bearer {narrow}"})).json()
        ) == {"sub", "groups"}


async def test_userinfo_errors_are_bearer_challenges(server: AuthServer) -> None:
    async with server.client() as http:
        none = await http.get(USERINFO)
        assert none.status_code == 401
        assert none.headers["www-authenticate"] == f'Bearer realm="{ISSUER}"'
        bad = await http.get(USERINFO, headers={"authorization": "Bearer nope.nope.nope"})
        assert bad.status_code == 401
        assert 'error="invalid_token"' in bad.headers["www-authenticate"]
        body = await tokens(http, scope="orders:read")
        no_openid = await http.get(
            USERINFO, headers={"authorization": f"Bearer {body['access_token']}"}
        )
        assert no_openid.status_code == 403
        assert no_openid.headers["www-authenticate"] == (
            f'Bearer realm="{ISSUER}", error="insufficient_scope", '
            'error_description="the access token lacks openid", scope="openid"'
        )
        machine = await http.post(
            TOKEN_URL,
            data={"grant_type": "client_credentials"},
            auth=("reporting", REPORTING_SECRET),
        )
        token = machine.json()["access_token"]
        assert (
            await http.get(USERINFO, headers={"authorization": f"Bearer {token}"})
        ).status_code == 401
        full = await tokens(http)
        await http.post(
            REVOKE, data={"token": full["access_token"]}, auth=("portal", PORTAL_SECRET)
        )
        revoked = await http.get(
            USERINFO, headers={"authorization": f"Bearer {full['access_token']}"}
        )
        assert revoked.status_code == 401


# --------------------------------------------------------------------------- logout


async def test_logout_without_a_hint_asks_first_and_refuses_forged_posts(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        await tokens(http)
        asked = await http.get(LOGOUT)
        assert asked.status_code == 200 and "Sign out?" in asked.text
        assert asked.headers["x-frame-options"] == "DENY"
        form = Form(asked.text)
        assert form.action == LOGOUT and "csrf_token" in form.fields
        forged = await http.post(LOGOUT, data={"confirm": "yes", "csrf_token": "x" * 64})
        assert "Sign out?" in forged.text  # not signed out: asked again
        assert (await sign_in(http)).get("code")  # still signed in (SSO, no form)
        done = await http.post(LOGOUT, data={**form.fields, "confirm": "yes"})
        assert done.status_code == 200 and "You are signed out" in done.text
        assert any(c.startswith("tg_session=;") for c in done.headers.get_list("set-cookie"))
        again = await http.get(AUTHORIZE, params=authorize_params())
        assert again.headers["location"] == "/signin/login"  # the session is gone
    events = [line["event"] for line in server.audit_lines()]
    assert "user.signout" in events and "session.ended" in events


async def test_logout_redirects_only_where_the_hinted_client_registered(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        body = await tokens(http)
        for params in (
            {"post_logout_redirect_uri": HOME},  # no hint: whose URI would it be?
            {"id_token_hint": body["id_token"] + "x", "post_logout_redirect_uri": HOME},
            {"id_token_hint": body["access_token"], "post_logout_redirect_uri": HOME},
        ):
            asked = await http.get(LOGOUT, params=params)  # not a hint naming the session
            assert asked.status_code == 200 and "Sign out?" in asked.text, params
            assert "location" not in asked.headers
        assert (await sign_in(http)).get("code")  # nothing was ended without asking
        unregistered = await http.get(
            LOGOUT,
            params={
                "id_token_hint": body["id_token"],
                "post_logout_redirect_uri": "https://evil.example/",
            },
        )
        assert unregistered.status_code == 200 and "location" not in unregistered.headers
        assert "You are signed out" in unregistered.text and "evil" not in unregistered.text
        again = await http.get(AUTHORIZE, params=authorize_params())
        assert again.headers["location"] == "/signin/login"  # signed out all the same


async def test_an_expired_id_token_still_names_the_session(server: AuthServer) -> None:
    async with server.client() as http:
        body = await tokens(http)
        server.clock.advance(5400)  # the ID token (1 h) expired; the session (idle 2 h) lives
        done = await http.get(
            LOGOUT, params={"id_token_hint": body["id_token"], "post_logout_redirect_uri": HOME}
        )
        assert done.status_code == 303 and done.headers["location"] == HOME


# --------------------------------------------------------------------------- assignment, claims


async def test_users_outside_a_client_s_groups_are_not_assigned(server: AuthServer) -> None:
    async with server.client() as http:
        await tokens(http)  # signed in (SSO session)
        denied = await http.get(
            AUTHORIZE,
            params=authorize_params(
                client_id="admin-app", redirect_uri="https://admin.example.com/cb", scope="openid"
            ),
        )
        assert denied.status_code == 303
        location = denied.headers["location"]
        assert location.startswith("https://admin.example.com/cb?")
        params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        assert params["error"] == "access_denied" and "code" not in params
    reasons = [line["reason"] for line in server.audit_lines() if line["event"] == "user.signin"]
    assert reasons[-1] == "not_assigned"


async def test_user_claims_go_where_they_are_configured(server: AuthServer) -> None:
    async with server.client() as http:
        body = await tokens(http)
        access, id_token = claims_of(body["access_token"]), claims_of(body["id_token"])
        assert access["groups"] == ["engineering"] and access["dept"] == "R&D"
        assert id_token["groups"] == ["engineering"] and "dept" not in id_token


# --------------------------------------------------------------------------- discovery, CORS


async def test_discovery_names_the_new_endpoints(server: AuthServer) -> None:
    async with server.client() as http:
        doc = (await http.get(f"{ISSUER}/.well-known/openid-configuration")).json()
    assert doc["userinfo_endpoint"] == USERINFO and doc["end_session_endpoint"] == LOGOUT
    assert doc["grant_types_supported"] == [
        "client_credentials",
        "authorization_code",
        "refresh_token",
        "password",
        "implicit",
    ]
    assert doc["response_types_supported"] == ["code", "id_token", "id_token token"]
    assert doc["response_modes_supported"] == ["query", "fragment", "form_post"]
    assert "offline_access" in doc["scopes_supported"] and "groups" in doc["claims_supported"]


async def test_cors_only_for_allowed_origins(server: AuthServer) -> None:
    async with server.client() as http:
        preflight = await http.options(
            TOKEN_URL, headers={"origin": SPA_ORIGIN, "access-control-request-method": "POST"}
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == SPA_ORIGIN
        assert "access-control-allow-credentials" not in preflight.headers
        keys = await http.get(f"{ISSUER}/v1/keys", headers={"origin": SPA_ORIGIN})
        assert keys.headers["access-control-allow-origin"] == SPA_ORIGIN
        assert keys.headers["vary"] == "Origin"
        other = await http.get(f"{ISSUER}/v1/keys", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        evil = await http.options(
            TOKEN_URL,
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in evil.headers
        page = await http.get(AUTHORIZE, params=authorize_params(), headers={"origin": SPA_ORIGIN})
        assert "access-control-allow-origin" not in page.headers


async def test_live_sessions_are_a_gauge(server: AuthServer) -> None:
    registry = server.services.metrics.registry
    now = int(server.clock())
    server.services._maintain(now, purge=False)
    assert registry.get_sample_value("tokengate_authserver_sessions_active") == 0
    async with server.client() as http:
        await tokens(http)
    server.services._maintain(now, purge=False)
    assert registry.get_sample_value("tokengate_authserver_sessions_active") == 1


async def test_prompt_none_with_an_id_token_hint_checks_whose_session_it_is(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        alice = await tokens(http)
        same = await sign_in(http, prompt="none", id_token_hint=alice["id_token"])
        assert "code" in same
        bogus = await http.get(
            AUTHORIZE, params=authorize_params(prompt="none", id_token_hint="x.y.z")
        )
        assert parse_qs(urlsplit(bogus.headers["location"]).query)["error"] == ["invalid_request"]
    async with server.client() as other:  # bob's ID token, presented in alice's browser
        _, form = await start(other)
        back = callback_params(await submit(other, form, username="bob"))
        bob = (await exchange(other, back["code"])).json()
        remember(bob["refresh_token"])
    async with server.client() as http:
        await tokens(http)
        wrong = await http.get(
            AUTHORIZE, params=authorize_params(prompt="none", id_token_hint=bob["id_token"])
        )
        params = parse_qs(urlsplit(wrong.headers["location"]).query)
        assert params["error"] == ["login_required"] and "code" not in params


async def test_templates_dir_replaces_the_pages(make_authserver: Any, tmp_path: Any) -> None:
    import shutil
    from importlib import resources

    from tokengate.config import parse_config
    from tokengate.yamlconf import ConfigErrors

    templates = tmp_path / "templates"
    shutil.copytree(str(resources.files("authserver").joinpath("templates")), templates)
    signin = templates / "signin.html"
    signin.write_text(signin.read_text().replace("<h1>Sign in</h1>", "<h1>Welcome to Acme</h1>"))

    def custom(data: dict[str, Any]) -> None:
        config(data)
        data["authserver"]["sign_in"]["templates_dir"] = str(templates)

    server = make_authserver(custom)
    async with server.client() as http:
        page, form = await start(http)
        assert "<h1>Welcome to Acme</h1>" in page.text and "csrf_token" in form.fields

    (templates / "error.html").write_text("{% if %}")  # a syntax error
    text = (
        "authserver:\n  servers: [{name: a, audience: b}]\n"
        f"  sign_in: {{templates_dir: {templates}}}\n"
    )
    with pytest.raises(ConfigErrors) as raised:
        parse_config(text, check_files=True)
    [problem] = [str(e) for e in raised.value.errors]
    assert problem.startswith(f"authserver.sign_in.templates_dir: {templates}/error.html line 1: ")
    (templates / "error.html").unlink()
    with pytest.raises(ConfigErrors) as raised:
        parse_config(text, check_files=True)
    assert [str(e) for e in raised.value.errors] == [
        f"authserver.sign_in.templates_dir: {templates} lacks error.html "
        "(every page template is replaced)"
    ]


async def test_the_password_grant_is_opt_in_and_throttled_like_the_page(
    server: AuthServer,
) -> None:
    async def password(username: str, secret: str, **extra: str) -> httpx.Response:
        async with server.client() as http:
            return await http.post(
                TOKEN_URL,
                data={"grant_type": "password", "username": username, "password": secret, **extra},
                auth=("legacy-cli", PORTAL_SECRET),
            )

    good = await password("alice", ALICE_PASSWORD, scope="openid orders:read")
    assert good.status_code == 200, good.text
    body = good.json()
    remember(body["refresh_token"])
    assert body["scope"] == "openid orders:read"
    id_token = claims_of(body["id_token"])
    assert id_token["aud"] == "legacy-cli" and "sid" not in id_token
    assert claims_of(body["access_token"])["amr"] == ["pwd"]
    async with server.client() as http:
        again = await http.post(
            TOKEN_URL,
            data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
            auth=("legacy-cli", PORTAL_SECRET),
        )
        assert again.status_code == 200  # no session to end with
        remember(again.json()["refresh_token"])
    wrong = await password("alice", "wrong-password")
    unknown = await password("nobody", "wrong-password")
    disabled = await password("mallory", ALICE_PASSWORD)
    for refused in (wrong, unknown, disabled):
        assert refused.status_code == 400
        assert refused.json() == {
            "error": "invalid_grant",
            "error_description": "the username or password is incorrect",
        }
    for _ in range(5):
        await password("alice", "wrong-password")
    locked = await password("alice", ALICE_PASSWORD)  # the right password, while locked
    assert locked.json()["error"] == "invalid_grant"
    reasons = [
        line["reason"]
        for line in server.audit_lines()
        if line["event"] == "user.signin" and line["client_id"] == "legacy-cli"
    ]
    assert reasons[:4] == ["ok", "bad_credentials", "bad_credentials", "disabled"]
    assert reasons[-1] == "locked"
    async with server.client() as http:
        portal = await http.post(
            TOKEN_URL,
            data={"grant_type": "password", "username": "alice", "password": ALICE_PASSWORD},
            auth=("portal", PORTAL_SECRET),
        )
    assert portal.json()["error"] == "unauthorized_client"  # not opted in


def test_check_warns_about_the_password_grant() -> None:
    from tokengate.config import parse_config

    text = (
        "authserver:\n  servers: [{name: a, audience: b}]\n  clients:\n"
        "    - {client_id: legacy, secret: " + PORTAL_SECRET + ", grant_types: [password]}\n"
    )
    assert parse_config(text).warnings == (
        "authserver.clients[0].grant_types: password (legacy) is deprecated by RFC 9700 "
        "(OAuth 2.0 Security BCP); prefer authorization_code with PKCE",
    )


class Buttons(Form):
    """The consent page's form, its buttons too."""

    def __init__(self, html: str) -> None:
        self.buttons: list[tuple[str, str]] = []
        super().__init__(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        super().handle_starttag(tag, attrs)
        a = dict(attrs)
        if tag == "button" and a.get("name"):
            self.buttons.append((a["name"] or "", a.get("value") or ""))


async def test_a_client_that_requires_consent_asks_once(server: AuthServer) -> None:
    partner = {"client_id": "partner-app", "redirect_uri": PARTNER, "scope": "openid email"}
    async with server.client() as http:
        _, form = await start(http, **partner)
        to_consent = await submit(http, form)  # the password is right: now the consent page
        assert to_consent.status_code == 303
        assert to_consent.headers["location"] == "/signin/consent"
        page = await http.get("/signin/consent")
        assert page.status_code == 200 and "Allow access?" in page.text
        assert "See your email address" in page.text and "partner-app" in page.text
        assert (
            "form-action 'self' https://partner.example.com"
            in (page.headers["content-security-policy"])
        )
        consent = Buttons(page.text)
        assert consent.buttons == [("consent", "allow"), ("consent", "deny")]
        forged = await http.post("/signin/consent", data={"consent": "allow"})
        assert forged.status_code == 400  # no CSRF token: nothing granted
        allowed = await http.post("/signin/consent", data={**consent.fields, "consent": "allow"})
        assert allowed.status_code == 303
        params = parse_qs(urlsplit(allowed.headers["location"]).query)
        assert allowed.headers["location"].startswith(PARTNER + "?") and "code" in params
        remember(params["code"][0])
        again = await http.get(AUTHORIZE, params=authorize_params(**partner))
        assert "code" in parse_qs(urlsplit(again.headers["location"]).query)  # granted before
        more = await http.get(
            AUTHORIZE, params=authorize_params(**{**partner, "scope": "openid orders:read"})
        )
        assert more.headers["location"] == "/signin/consent"  # a scope never granted
        silent = await http.get(
            AUTHORIZE,
            params=authorize_params(**{**partner, "scope": "openid orders:read"}, prompt="none"),
        )
        assert parse_qs(urlsplit(silent.headers["location"]).query)["error"] == ["consent_required"]
        asked = await http.get(AUTHORIZE, params=authorize_params(**partner, prompt="consent"))
        assert asked.headers["location"] == "/signin/consent"
        page = await http.get("/signin/consent")
        denied = await http.post(
            "/signin/consent", data={**Buttons(page.text).fields, "consent": "deny"}
        )
        back = parse_qs(urlsplit(denied.headers["location"]).query)
        assert back["error"] == ["access_denied"] and "code" not in back
    events = [line["event"] for line in server.audit_lines()]
    assert events.count("consent.granted") == 1 and events.count("consent.denied") == 1


async def test_the_implicit_flow_is_opt_in_and_answers_in_the_fragment(
    server: AuthServer,
) -> None:
    legacy = {"client_id": "legacy-spa", "redirect_uri": LEGACY, "code_challenge": None}
    async with server.client() as http:
        await tokens(http)  # signed in: SSO
        both = await http.get(
            AUTHORIZE,
            params=authorize_params(
                **legacy, response_type="token id_token", scope="openid profile orders:read"
            ),
        )
        assert both.status_code == 303
        location = both.headers["location"]
        assert location.startswith(LEGACY + "#") and "?" not in location
        fragment = {k: v[0] for k, v in parse_qs(urlsplit(location).fragment).items()}
        assert set(fragment) == {
            "access_token",
            "token_type",
            "expires_in",
            "scope",
            "id_token",
            "state",
            "iss",
        }
        id_token = claims_of(fragment["id_token"])
        assert id_token["aud"] == "legacy-spa" and id_token["name"] == "Alice Doe"
        assert id_token["nonce"].startswith("n-") and "at_hash" in id_token
        assert claims_of(fragment["access_token"])["client_id"] == "legacy-spa"
        only = await http.get(
            AUTHORIZE, params=authorize_params(**legacy, response_type="id_token", scope="openid")
        )
        fragment = parse_qs(urlsplit(only.headers["location"]).fragment)
        assert set(fragment) == {"id_token", "state", "iss"}
        assert "at_hash" not in claims_of(fragment["id_token"][0])
        for changes, error in (
            ({"nonce": None}, "invalid_request"),  # a nonce is required
            ({"response_mode": "query"}, "invalid_request"),  # never tokens in a query
            ({"response_type": "token"}, "unsupported_response_type"),
        ):
            refused = await http.get(
                AUTHORIZE,
                params=authorize_params(
                    **{**legacy, "response_type": "id_token", "scope": "openid", **changes}
                ),
            )
            where = urlsplit(refused.headers["location"])
            # an unknown response type's error goes where any would: the query
            part = where.query if changes.get("response_type") == "token" else where.fragment
            assert parse_qs(part)["error"] == [error], changes
            assert "id_token=" not in refused.headers["location"]
        code_client = await http.get(
            AUTHORIZE, params=authorize_params(response_type="id_token", code_challenge=None)
        )
        assert parse_qs(urlsplit(code_client.headers["location"]).fragment)["error"] == [
            "unauthorized_client"
        ]
    issued = [line for line in server.audit_lines() if line["event"] == "token.issued"]
    assert [line["grant_type"] for line in issued][-2:] == ["implicit", "implicit"]


def test_check_warns_about_the_implicit_grant() -> None:
    from tokengate.config import parse_config

    text = (
        "authserver:\n  servers: [{name: a, audience: b}]\n  clients:\n"
        "    - {client_id: old, auth_method: none, grant_types: [implicit],"
        " redirect_uris: ['https://x.test/cb']}\n"
    )
    assert parse_config(text).warnings == (
        "authserver.clients[0].grant_types: implicit (old) is deprecated by RFC 9700 "
        "(OAuth 2.0 Security BCP); prefer authorization_code with PKCE",
    )


async def test_the_claims_parameter_adds_id_token_claims_the_user_has(server: AuthServer) -> None:
    import json

    wanted = {"id_token": {"email": {"essential": True}, "name": None, "phone_number": None}}
    async with server.client() as http:
        back = await sign_in(http, scope="openid orders:read", claims=json.dumps(wanted))
        body = (await exchange(http, back["code"])).json()
        remember(body["refresh_token"])
        claims = claims_of(body["id_token"])
        assert claims["email"] == "alice@example.com" and claims["name"] == "Alice Doe"
        assert "phone_number" not in claims  # the user has none
        for bad in ("not json", "[1]", '{"id_token": 3}'):
            refused = await http.get(AUTHORIZE, params=authorize_params(claims=bad))
            assert parse_qs(urlsplit(refused.headers["location"]).query)["error"] == [
                "invalid_request"
            ]


async def test_a_failing_store_is_a_503_on_every_user_endpoint(server: AuthServer) -> None:
    """A user read that fails (a locked or full store) answers 503, never a 500."""
    import sqlite3

    def locked(*args: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    async with server.client() as http:
        body = await tokens(http)
        back = await sign_in(http)
        store = server.services.store
        store.user = locked  # type: ignore[method-assign]
        store.user_by_key = locked  # type: ignore[method-assign]
        bearer = {"authorization": f"Bearer {body['access_token']}"}
        answers = {
            "userinfo": await http.get(USERINFO, headers=bearer),
            "code": await exchange(http, back["code"]),
            "refresh introspection": await http.post(
                INTROSPECT,
                data={"token": body["refresh_token"]},
                auth=("portal", PORTAL_SECRET),
            ),
            "password": await http.post(
                TOKEN_URL,
                data={"grant_type": "password", "username": "alice", "password": "x"},
                auth=("legacy-cli", PORTAL_SECRET),
            ),
        }
        for name, answer in answers.items():
            assert answer.status_code == 503, name
            assert answer.json()["error"] == "server_error", name
            assert answer.headers["retry-after"] == "1", name
        out = await http.get(LOGOUT, params={"id_token_hint": body["id_token"]})
        assert out.status_code == 503 and "try again soon" in out.text


async def test_on_https_the_cookies_are_secure_host_only(make_authserver: Any) -> None:
    """public_url https: the session and sign-in cookies are Secure, named __Host-,
    Path=/ with no Domain; the flow works with them."""

    def https(data: dict[str, Any]) -> None:
        config(data)
        data["authserver"]["public_url"] = "https://auth.test"

    server = make_authserver(https)
    issuer = "https://auth.test/oauth2/default"
    async with httpx.AsyncClient(
        transport=server.transport(), base_url="https://auth.test"
    ) as http:
        first = await http.get(f"{issuer}/v1/authorize", params=authorize_params())
        assert first.status_code == 303
        [signin_cookie] = first.headers.get_list("set-cookie")
        assert signin_cookie.startswith("__Host-tg_signin=")
        assert "; Secure" in signin_cookie and "Path=/" in signin_cookie
        assert "domain" not in signin_cookie.lower()
        page = await http.get(first.headers["location"])
        form = Form(page.text)
        done = await http.post(
            form.action or "", data={**form.fields, "username": "alice", "password": ALICE_PASSWORD}
        )
        assert done.status_code == 303 and done.headers["location"].startswith(CALLBACK)
        session = next(
            c for c in done.headers.get_list("set-cookie") if c.startswith("__Host-tg_session=")
        )
        assert session.endswith("; Path=/; HttpOnly; SameSite=Lax; Secure")
        remember(session.split(";")[0].partition("=")[2])
        code = parse_qs(urlsplit(done.headers["location"]).query)["code"][0]
        remember(code)
        sso = await http.get(f"{issuer}/v1/authorize", params=authorize_params())
        assert "code=" in sso.headers["location"]  # the __Host- cookie signs in again
        remember(parse_qs(urlsplit(sso.headers["location"]).query)["code"][0])


async def test_disabling_or_deleting_a_user_revokes_their_tokens_at_once(
    server: AuthServer,
) -> None:
    """Onto the revocation list (and so the revocation feed gateways follow): the
    access tokens of every family, not only at the next refresh; sessions end."""
    import dataclasses

    async with server.client() as http:
        first = await tokens(http)
        offline = await tokens(http, scope="openid orders:read offline_access")
        store = server.services.store
        alice = store.user_by_key("alice")
        assert alice is not None
        store.update_user(dataclasses.replace(alice, disabled=True))
        for body in (first, offline):
            assert store.is_revoked(claims_of(body["access_token"])["jti"])
        assert store.sessions(int(server.clock()), alice.id) == []
        now = int(server.clock())
        revoked, _ = store.revocations_after("default", 0, 100, now)
        assert {claims_of(b["access_token"])["jti"] for b in (first, offline)} <= {
            jti for jti, _ in revoked
        }
