"""Access policies at work: the token endpoint and the authorization endpoint decide
by the first matching rule, narrow scopes, apply its lifetimes, issue a refresh token
only when its use would be allowed, and refuse (audited, counted) what no rule allows."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from authserver.usergrants import refresh_hash
from tests.asgi.test_signin_flow import (
    AUTHORIZE,
    CALLBACK,
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
from tests.asgi.test_user_tokens import claims_of, refresh
from tests.conftest import ADMIN_SECRET, ISSUER, REPORTING_SECRET, TOKEN_URL, AuthServer

pytestmark = pytest.mark.anyio

POLICIES = [
    {
        "name": "machines",
        "clients": ["reporting"],
        "rules": [
            {
                "name": "reporting-reads",
                "if": {"grant_types": ["client_credentials"]},
                "then": {"scopes": ["orders:read"], "access_token_ttl": "5m"},
            }
        ],
    },
    {
        "name": "people",
        "rules": [
            {
                "name": "admins-write",
                "if": {"groups": ["admins"], "scopes": ["orders:write"]},
                "then": {
                    "access_token_ttl": "15m",
                    "id_token_ttl": "30m",
                    "refresh_tokens": {"idle_ttl": "1d", "max_ttl": "7d"},
                },
            },
            {"name": "no-write", "if": {"scopes": ["orders:write"]}, "then": {"access": "deny"}},
            {
                "name": "code-only",
                "if": {"grant_types": ["authorization_code"], "groups": ["engineering"]},
                "then": {"scopes": ["openid", "profile", "orders:read"]},
            },
            {"name": "refreshers", "if": {"grant_types": ["refresh_token"], "groups": ["admins"]}},
        ],
    },
]


def config(data: dict[str, Any]) -> None:
    sign_in_config(data)
    auth = data["authserver"]
    auth["servers"][0]["access_policies"] = POLICIES
    portal = auth["clients"][-2]
    portal["grant_types"] = ["authorization_code", "refresh_token"]
    portal["scopes"] += ["orders:write"]
    auth["users"][0]["groups"] = ["admins"]
    auth["users"].append(
        {
            "username": "bob",
            "password_hash": auth["users"][0]["password_hash"],
            "groups": ["engineering"],
        }
    )


@pytest.fixture
def server(make_authserver: Any) -> AuthServer:
    return make_authserver(config)  # type: ignore[no-any-return]


def lifetime(token: str) -> int:
    claims = claims_of(token)
    return int(claims["exp"] - claims["iat"])


def decisions(server: AuthServer, policy: str, rule: str, decision: str) -> float:
    value = server.services.metrics.registry.get_sample_value(
        "tokengate_authserver_policy_decisions_total",
        {"server": "default", "policy": policy, "rule": rule, "decision": decision},
    )
    assert value is not None  # every series exists from the start
    return value


async def test_a_machine_client_gets_what_its_rule_grants_for_as_long(server: AuthServer) -> None:
    assert decisions(server, "machines", "reporting-reads", "allow") == 0
    async with server.client() as http:
        response = await http.post(
            TOKEN_URL,
            data={"grant_type": "client_credentials", "scope": "orders:read"},
            auth=("reporting", REPORTING_SECRET),
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["scope"], body["expires_in"]) == ("orders:read", 300)
    assert lifetime(body["access_token"]) == 300
    [issued] = [line for line in server.audit_lines() if line["event"] == "token.issued"]
    assert (issued["policy"], issued["rule"]) == ("machines", "reporting-reads")
    assert decisions(server, "machines", "reporting-reads", "allow") == 1


async def test_a_request_no_rule_allows_is_access_denied_audited_with_the_policy(
    server: AuthServer,
) -> None:
    assert decisions(server, "people", "", "deny") == 0
    async with server.client() as http:
        response = await http.post(
            TOKEN_URL,
            data={"grant_type": "client_credentials", "scope": "orders:read"},
            auth=("admin", ADMIN_SECRET),
        )
    assert response.status_code == 400
    assert response.json() == {
        "error": "access_denied",
        "error_description": "the authorization server's access policy does not allow this request",
    }
    assert response.headers["cache-control"] == "no-store"
    [denied] = [line for line in server.audit_lines() if line["event"] == "token.denied"]
    assert denied["client_id"] == "admin" and denied["grant_type"] == "client_credentials"
    assert (denied["reason"], denied["detail"]) == ("policy_denied", "no_matching_rule")
    assert (denied["policy"], denied["rule"]) == ("people", None)
    assert decisions(server, "people", "", "deny") == 1
    registry = server.services.metrics.registry
    errors = registry.get_sample_value(
        "tokengate_authserver_token_errors_total", {"server": "default", "error": "access_denied"}
    )
    assert errors == 1


async def test_an_admin_gets_the_rules_lifetimes_and_refreshes_under_them(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        back = await sign_in(http, scope="openid orders:write")
        response = await exchange(http, back["code"])
        assert response.status_code == 200, response.text
        body = response.json()
        remember(body["refresh_token"])
        assert body["scope"] == "openid orders:write" and body["expires_in"] == 900
        assert lifetime(body["access_token"]) == 900
        assert lifetime(body["id_token"]) == 1800
        family = server.services.store.refresh_grant(refresh_hash(body["refresh_token"]), 0)
        assert family is not None
        grant, _ = family
        assert grant.expires_at - claims_of(body["access_token"])["iat"] == 7 * 86400
        again = await refresh(http, body["refresh_token"])
        assert again.status_code == 200, again.text
        assert lifetime(again.json()["access_token"]) == 900
        # narrowed to openid, the refresh matches another rule: the server's lifetimes
        narrowed = await refresh(http, again.json()["refresh_token"], scope="openid")
        assert narrowed.status_code == 200, narrowed.text
        assert narrowed.json()["scope"] == "openid"
        assert lifetime(narrowed.json()["access_token"]) == 3600
    rules = [
        (line["grant_type"], line["rule"])
        for line in server.audit_lines()
        if line["event"] == "token.issued"
    ]
    assert rules == [
        ("authorization_code", "admins-write"),
        ("refresh_token", "admins-write"),
        ("refresh_token", "refreshers"),
    ]


async def test_a_refresh_the_policy_refuses_keeps_its_token(server: AuthServer) -> None:
    store = server.services.store
    async with server.client() as http:
        back = await sign_in(http, scope="openid orders:write")
        body = (await exchange(http, back["code"])).json()
        remember(body["refresh_token"])
        alice = store.user_by_key("alice")
        assert alice is not None
        store.update_user(dataclasses.replace(alice, groups=("engineering",)))
        refused = await refresh(http, body["refresh_token"])
        assert refused.status_code == 400
        assert refused.json()["error"] == "access_denied"
        store.update_user(alice)  # an admin again: the same refresh token still works
        allowed = await refresh(http, body["refresh_token"])
        assert allowed.status_code == 200, allowed.text
    [denied] = [line for line in server.audit_lines() if line["event"] == "token.denied"]
    assert denied["grant_type"] == "refresh_token" and denied["user_id"] == alice.id
    assert (denied["reason"], denied["detail"], denied["rule"]) == (
        "policy_denied",
        "rule_denies",
        "no-write",
    )


async def test_scopes_are_narrowed_and_no_refresh_token_comes_when_none_would_work(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        _page, form = await start(http, scope="openid profile email orders:read")
        back = callback_params(await submit(http, form, username="bob"))
        response = await exchange(http, back["code"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "openid profile orders:read"  # email: not in the rule's scopes
    assert "refresh_token" not in body  # bob's refresh would match no rule
    assert "email" not in claims_of(body["id_token"])


@pytest.mark.parametrize(
    ("username", "scope", "rule", "detail"),
    [
        ("bob", "openid orders:write", "no-write", "rule_denies"),
        ("alice", "openid orders:read", None, "no_matching_rule"),
    ],
)
async def test_the_authorization_endpoint_refuses_what_the_policy_denies(
    server: AuthServer, username: str, scope: str, rule: str | None, detail: str
) -> None:
    async with server.client() as http:
        _page, form = await start(http, scope=scope, state="st-1")
        back = callback_params(await submit(http, form, username=username))
        assert back == {
            "error": "access_denied",
            "error_description": "the authorization server's access policy does not allow "
            "this request",
            "state": "st-1",
            "iss": ISSUER,
        }
        # signed in all the same: with SSO, the next request is decided again, no form
        again = await http.get(AUTHORIZE, params=authorize_params(scope=scope, state="s2"))
        assert again.headers["location"].startswith(CALLBACK + "?error=access_denied")
    denied = [line for line in server.audit_lines() if line["event"] == "token.denied"]
    first = denied[0]
    assert (first["grant_type"], first["rule"], first["detail"], first["username"]) == (
        "authorization_code",
        rule,
        detail,
        username,
    )
    assert all(d["reason"] == "policy_denied" and d["policy"] == "people" for d in denied)


async def test_without_policies_nothing_changes(make_authserver: Any) -> None:
    server = make_authserver(sign_in_config)
    async with server.client() as http:
        response = await http.post(
            TOKEN_URL, data={"grant_type": "client_credentials"}, auth=("admin", ADMIN_SECRET)
        )
        assert response.status_code == 200
        back = await sign_in(http)
        assert (await exchange(http, back["code"])).status_code == 200
    for line in server.audit_lines():
        assert "policy" not in line and "rule" not in line
    assert not any(
        m.name == "tokengate_authserver_policy_decisions" and m.samples
        for m in server.services.metrics.registry.collect()
    )
