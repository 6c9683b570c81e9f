"""Introspection (RFC 7662) and revocation (RFC 7009), client-authenticated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest

from tests.asgi.test_token_endpoint import assert_oauth_error
from tests.conftest import ADMIN_SECRET, ISSUER, REPORTING_SECRET, AuthServer

pytestmark = pytest.mark.anyio

INTROSPECT = f"{ISSUER}/v1/introspect"
REVOKE = f"{ISSUER}/v1/revoke"
REPORTING = ("reporting", REPORTING_SECRET)
ADMIN = ("admin", ADMIN_SECRET)


def admin_introspects_any(data: dict[str, Any]) -> None:
    """admin plays a resource server: it may introspect every client's tokens."""
    data["authserver"]["clients"][1]["introspect"] = "any"


@pytest.fixture
def authserver(make_authserver: Callable[..., AuthServer]) -> AuthServer:
    return make_authserver(admin_introspects_any)


async def issue(http: httpx.AsyncClient, auth: tuple[str, str], issuer: str = ISSUER) -> str:
    response = await http.post(
        f"{issuer}/v1/token", data={"grant_type": "client_credentials"}, auth=auth
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]  # type: ignore[no-any-return]


async def introspect(http: httpx.AsyncClient, token: str, auth: Any = ADMIN) -> dict[str, Any]:
    response = await http.post(INTROSPECT, data={"token": token}, auth=auth)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.json()  # type: ignore[no-any-return]


async def test_introspection_of_an_active_token(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        document = await introspect(http, token)
    claims = jwt.decode(token, options={"verify_signature": False})
    now = int(authserver.clock.now)
    assert document == {
        "active": True,
        "token_type": "Bearer",
        "scope": "orders:read",
        "client_id": "reporting",
        "sub": "reporting",
        "aud": "api://default",
        "iss": ISSUER,
        "exp": now + 3600,
        "iat": now,
        "jti": claims["jti"],
        "tenant": "acme",
        "groups": ["ops", "reporting"],
    }
    line = authserver.audit_lines()[-1]
    assert line["event"] == "token.introspected"
    assert (line["client_id"], line["jti"], line["outcome"]) == ("admin", claims["jti"], "active")
    assert token not in authserver.audit_path.read_text()


async def test_expired_token_is_inactive(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        authserver.clock.advance(3600 + 31)  # past exp and the leeway
        assert await introspect(http, token) == {"active": False}


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        jwt.encode({"iss": ISSUER, "sub": "x"}, "k" * 32, algorithm="HS256"),
        jwt.encode({"iss": ISSUER}, None, algorithm="none"),
        "eyJhbGciOiJSUzI1NiIsImtpZCI6WyJhIl19.e30.c2ln",  # {"alg":"RS256","kid":["a"]}
        "eyJhbGciOiJSUzI1NiJ9.W10.c2ln",  # payload is a JSON list
    ],
    ids=["garbage", "three-dots", "hs256", "alg-none", "kid-is-a-list", "payload-list"],
)
async def test_malformed_and_foreign_tokens_are_inactive(
    authserver: AuthServer, token: str
) -> None:
    async with authserver.client() as http:
        assert await introspect(http, token) == {"active": False}


async def test_token_of_another_authorization_server_is_inactive(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        partners_token = await issue(http, ADMIN, "http://auth.test/oauth2/partners")
        assert await introspect(http, partners_token) == {"active": False}


async def test_introspection_requires_client_authentication(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        anonymous = await http.post(INTROSPECT, data={"token": token})
        wrong = await http.post(INTROSPECT, data={"token": token}, auth=("admin", "nope"))
        missing = await http.post(INTROSPECT, data={}, auth=ADMIN)
        get = await http.get(INTROSPECT, auth=ADMIN)
    assert_oauth_error(anonymous, 401, "invalid_client")
    assert_oauth_error(wrong, 401, "invalid_client", 'Basic realm="tokengate"')
    assert_oauth_error(missing, 400, "invalid_request")
    assert_oauth_error(get, 405, "invalid_request")
    assert get.headers["allow"] == "POST"


async def test_revocation_makes_the_token_inactive(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        other = await issue(http, REPORTING)
        response = await http.post(
            REVOKE, data={"token": token, "token_type_hint": "access_token"}, auth=REPORTING
        )
        assert response.status_code == 200
        assert response.content == b""
        assert response.headers["cache-control"] == "no-store"
        assert await introspect(http, token) == {"active": False}
        assert (await introspect(http, other))["active"] is True
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert authserver.services.store.is_revoked(jti)
    revoked = [line for line in authserver.audit_lines() if line["event"] == "token.revoked"]
    assert [(x["client_id"], x["jti"], x["outcome"]) for x in revoked] == [
        ("reporting", jti, "revoked")
    ]


async def test_revoking_an_unknown_token_is_200(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        response = await http.post(REVOKE, data={"token": "not-a-token"}, auth=REPORTING)
    assert response.status_code == 200
    assert authserver.audit_lines()[-1]["outcome"] == "ignored"


async def test_a_client_cannot_revoke_another_clients_token(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        response = await http.post(REVOKE, data={"token": token}, auth=ADMIN)
        assert_oauth_error(response, 400, "unauthorized_client")
        assert (await introspect(http, token))["active"] is True
    line = [x for x in authserver.audit_lines() if x["event"] == "token.revoked"][-1]
    assert (line["client_id"], line["outcome"], line["reason"]) == (
        "admin",
        "error",
        "unauthorized_client",
    )


async def test_revocation_requires_client_authentication(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        response = await http.post(REVOKE, data={"token": token})
        assert_oauth_error(response, 401, "invalid_client")
        assert (await introspect(http, token))["active"] is True


async def test_revocations_are_kept_until_exp_then_purged(authserver: AuthServer) -> None:
    store = authserver.services.store
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        await http.post(REVOKE, data={"token": token}, auth=REPORTING)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    now = int(authserver.clock.now)
    assert store.purge(now + 3599) == 0
    assert store.is_revoked(jti)
    assert store.purge(now + 3601) == 1
    assert not store.is_revoked(jti)


# --------------------------------------------------------------------------- who may introspect


async def test_by_default_a_client_introspects_only_its_own_tokens(
    make_authserver: Callable[..., AuthServer],
) -> None:
    server = make_authserver()  # no client has introspect: any
    async with server.client() as http:
        reporting_token = await issue(http, REPORTING)
        admin_token = await issue(http, ADMIN)
        own = await introspect(http, reporting_token, auth=REPORTING)
        others = await introspect(http, admin_token, auth=REPORTING)
        others_too = await introspect(http, reporting_token, auth=ADMIN)
    assert own["active"] is True and own["client_id"] == "reporting"
    assert others == others_too == {"active": False}
    lines = [x for x in server.audit_lines() if x["event"] == "token.introspected"]
    admin_jti = jwt.decode(admin_token, options={"verify_signature": False})["jti"]
    assert [(x["client_id"], x["outcome"], x["reason"]) for x in lines] == [
        ("reporting", "active", "ok"),
        ("reporting", "inactive", "not_permitted"),
        ("admin", "inactive", "not_permitted"),
    ]
    assert lines[1]["jti"] == admin_jti  # which token was asked about, for the security team
    assert lines[1]["scopes"] == []


async def test_introspect_any_reads_every_token_of_its_servers(
    make_authserver: Callable[..., AuthServer],
) -> None:
    def reporting_is_a_resource_server(data: dict[str, Any]) -> None:
        data["authserver"]["clients"][0]["introspect"] = "any"

    server = make_authserver(reporting_is_a_resource_server)
    async with server.client() as http:
        admin_token = await issue(http, ADMIN)
        document = await introspect(http, admin_token, auth=REPORTING)
        # not at a server the client may not use
        partners = await http.post(
            "http://auth.test/oauth2/partners/v1/introspect",
            data={"token": await issue(http, ADMIN, "http://auth.test/oauth2/partners")},
            auth=REPORTING,
        )
    assert document["active"] is True and document["client_id"] == "admin"
    assert_oauth_error(partners, 400, "unauthorized_client")


# --------------------------------------------------------------------------- exp and nbf, no leeway


@pytest.mark.parametrize(
    ("after_issue", "active"),
    [(3599, True), (3600, False), (3601.5, False)],
    ids=["before-exp", "at-exp", "1.5s-past-exp"],
)
async def test_a_token_is_inactive_from_its_exp_on(
    authserver: AuthServer, after_issue: float, active: bool
) -> None:
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        authserver.clock.advance(after_issue)
        document = await introspect(http, token)
    assert document["active"] is active
    assert authserver.audit_lines()[-1]["reason"] == ("ok" if active else "token_invalid")


def own_token(server: AuthServer, **claims: Any) -> str:
    """A token signed with the server's own current key, with the given claims."""
    now = int(server.clock.now)
    base = {
        "iss": ISSUER,
        "sub": "reporting",
        "aud": "api://default",
        "exp": now + 600,
        "iat": now,
        "jti": "jti-" + str(len(claims)),
        "client_id": "reporting",
        "scope": "orders:read",
    }
    base.update(claims)
    return server.services.keyring.current("default").signer.sign(base)


async def test_a_token_is_inactive_before_its_nbf(authserver: AuthServer) -> None:
    token = own_token(authserver, nbf=int(authserver.clock.now) + 60)
    async with authserver.client() as http:
        before = await introspect(http, token)
        authserver.clock.advance(60)
        after = await introspect(http, token)
    assert before == {"active": False}
    assert after["active"] is True and after["nbf"] == int(authserver.clock.now)


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "2099-01-01"},
        {"exp": True},
        {"exp": float("nan")},
        {"exp": float("inf")},
        {"iat": [1]},
        {"nbf": {"at": 1}},
        {"nbf": "0"},
        {"jti": ["a"]},
        {"aud": 7},
        {"iss": [ISSUER]},
    ],
    ids=lambda c: "-".join(f"{k}={v!r}" for k, v in c.items()),
)
async def test_own_tokens_with_odd_claims_are_inactive(
    authserver: AuthServer, claims: dict[str, Any]
) -> None:
    async with authserver.client() as http:
        assert await introspect(http, own_token(authserver, **claims)) == {"active": False}
        revoke = await http.post(
            REVOKE, data={"token": own_token(authserver, **claims)}, auth=REPORTING
        )
    assert revoke.status_code == 200
    assert authserver.audit_lines()[-1]["outcome"] == "ignored"
