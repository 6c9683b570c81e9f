"""Rate limits in process: a gateway route's budget and the token endpoint's, with
their 429s, headers, audit lines and metrics (per process: no redis: configured)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.asgi.gateway_fixtures import Gateway, RecordingUpstream, make_gateway, upstream
from tests.conftest import ADMIN_SECRET, REPORTING_SECRET, TOKEN_URL, AuthServer

pytestmark = pytest.mark.anyio
__all__ = ["make_gateway", "upstream"]  # fixtures


def limited_routes(upstream_url: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "orders-read",
            "match": {"path": "/orders/**", "methods": ["GET"]},
            "upstream": upstream_url,
            "require": {"scopes": ["orders:read"]},
            "rate_limit": {"per": "client_id", "limit": "3/min"},
        },
        {
            "name": "orders-write",
            "match": {"path": "/orders/**", "methods": ["POST"]},
            "upstream": upstream_url,
            "require": {"scopes": ["orders:write"]},
            "rate_limit": {"per": "route", "limit": "1/min"},
        },
        {
            "name": "public",
            "match": {"path": "/public/**"},
            "upstream": upstream_url,
            "public": True,
            "rate_limit": {"per": "remote_addr", "limit": "60/min", "burst": 2},
        },
    ]


@pytest.fixture
async def gw(make_gateway: Any, upstream: tuple[RecordingUpstream, str]) -> Gateway:
    return await make_gateway(routes=limited_routes(upstream[1]))  # type: ignore[no-any-return]


async def test_a_client_over_its_budget_gets_429_and_is_never_forwarded(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    token = await gw.token()
    async with gw.client() as client:
        answers = [
            await client.get("/orders/1", headers={"authorization": f"Bearer {token}"})
            for _ in range(4)
        ]
        other = gw.sign({"client_id": "other", "sub": "other", "jti": "o1"})
        elsewhere = await client.get("/orders/1", headers={"authorization": f"Bearer {other}"})
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    # allowed answers carry the RateLimit fields too: what is left of the quota
    assert [r.headers["ratelimit"] for r in answers[:3]] == [
        '"orders-read";r=2;t=20',
        '"orders-read";r=1;t=40',
        '"orders-read";r=0;t=60',
    ]
    refused = answers[3]
    assert refused.headers["ratelimit-policy"] == '"orders-read";q=3;w=60'
    assert refused.headers["ratelimit"] == '"orders-read";r=0;t=60'
    assert 19 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {
        "error": "rate_limited",
        "error_description": "rate limit exceeded; retry later",
    }
    assert "www-authenticate" not in refused.headers
    assert elsewhere.status_code == 200  # another client_id has its own budget
    assert len(upstream[0].seen) == 4
    line = gw.audit_lines()[-2]
    assert (line["status"], line["decision"], line["reason"]) == (429, "deny", "rate_limited")
    assert line["client_id"] == "reporting"
    metrics = gw.app.metrics.exposition()[0].decode()
    assert (
        'tokengate_gateway_requests_total{code="429",decision="deny",method="GET",'
        'reason="rate_limited",route="orders-read"} 1.0'
    ) in metrics


async def test_per_route_and_address_limits_decide_before_authentication(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    async with gw.client() as client:
        no_token = [await client.post("/orders/1") for _ in range(2)]
        public = [await client.get("/public/x") for _ in range(3)]
    # the route's one request a minute is spent by a request that then fails authentication
    assert [r.status_code for r in no_token] == [401, 429]
    assert [r.status_code for r in public] == [200, 200, 429]
    assert public[2].headers["ratelimit-policy"] == '"public";q=2;w=2'
    assert public[2].headers["retry-after"] == "1"
    assert len(upstream[0].seen) == 2


# --------------------------------------------------------------------------- token endpoint


def token_limit(data: dict[str, Any]) -> None:
    data["authserver"]["rate_limits"] = {"token": {"per_client": "2/min"}}


async def test_the_token_endpoint_limits_each_authenticated_client(
    make_authserver: Any,
) -> None:
    server: AuthServer = make_authserver(token_limit)
    form = {"grant_type": "client_credentials"}
    async with server.client() as http:
        wrong = await http.post(TOKEN_URL, data=form, auth=("reporting", "x" * 40))
        answers = [
            await http.post(TOKEN_URL, data=form, auth=("reporting", REPORTING_SECRET))
            for _ in range(3)
        ]
        other = await http.post(TOKEN_URL, data=form, auth=("admin", ADMIN_SECRET))
        bad_scope = await http.post(
            TOKEN_URL, data={**form, "scope": "nope"}, auth=("admin", ADMIN_SECRET)
        )
    now = time.time()
    assert wrong.status_code == 401 and "x-rate-limit-limit" not in wrong.headers  # not spent
    assert [r.status_code for r in answers] == [200, 200, 429]
    first, _, refused = answers
    assert first.headers["x-rate-limit-limit"] == "2"
    assert first.headers["x-rate-limit-remaining"] == "1"
    assert first.headers["ratelimit-policy"] == '"token";q=2;w=60'
    assert first.headers["ratelimit"] == '"token";r=1;t=30'
    assert refused.json() == {
        "error": "temporarily_unavailable",
        "error_description": "too many token requests; retry later",
    }
    assert 29 <= int(refused.headers["retry-after"]) <= 30
    assert refused.headers["x-rate-limit-remaining"] == "0"
    assert now + 58 <= int(refused.headers["x-rate-limit-reset"]) <= now + 61
    assert refused.headers["cache-control"] == "no-store"
    assert other.status_code == 200 and other.headers["x-rate-limit-remaining"] == "1"
    # an error after the decision still says what is left
    assert bad_scope.status_code == 400 and bad_scope.headers["x-rate-limit-remaining"] == "0"
    denied = [line for line in server.audit_lines() if line["reason"] == "rate_limited"]
    assert [(d["event"], d["client_id"], d["outcome"]) for d in denied] == [
        ("token.denied", "reporting", "denied")
    ]
    text = server.services.metrics.exposition()[0].decode()
    assert (
        'tokengate_authserver_token_errors_total{error="rate_limited",server="default"} 1.0' in text
    )
    assert (
        'tokengate_authserver_token_errors_total{error="rate_limited",server="partners"} 0.0'
        in text
    )
