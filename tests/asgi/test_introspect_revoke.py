"""Introspection (RFC 7662) and revocation (RFC 7009), client-authenticated."""

from __future__ import annotations

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
