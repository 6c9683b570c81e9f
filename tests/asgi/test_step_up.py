"""Step-up at the gateway (RFC 9470): a route's ``require.acr`` and ``require.max_age``,
answered 401 ``insufficient_user_authentication`` with the ``acr_values`` and
``max_age`` a new sign-in must meet."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.errors import Reason
from tests.asgi.gateway_fixtures import (
    Gateway,
    RecordingUpstream,
    gateway_section,
    make_gateway,
    upstream,
)
from tests.asgi.test_gateway_pipeline import assert_denied, bearer
from tests.conftest import config_from
from tokengate.yamlconf import ConfigErrors

pytestmark = pytest.mark.anyio
__all__ = ["make_gateway", "upstream"]  # fixtures

MFA = "urn:tokengate:loa:2fa"
PHISHING_RESISTANT = "urn:tokengate:loa:2fa:hwk"


def routes(data: list[dict[str, Any]], upstream_url: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "sensitive",
            "match": {"path": "/orders/sensitive/**"},
            "upstream": upstream_url,
            "require": {"scopes": ["orders:read"], "acr": [PHISHING_RESISTANT, MFA]},
        },
        {
            "name": "fresh",
            "match": {"path": "/orders/fresh/**"},
            "upstream": upstream_url,
            "require": {"scopes": ["orders:read"], "max_age": "5m"},
        },
        {
            "name": "both",
            "match": {"path": "/orders/both/**"},
            "upstream": upstream_url,
            "require": {"acr": [MFA], "max_age": 300},
        },
        *data,
    ]


@pytest.fixture
async def gw(make_gateway: Any, upstream: tuple[RecordingUpstream, str]) -> Gateway:
    base = gateway_section(upstream[1])["routes"]
    return await make_gateway(routes=routes(base, upstream[1]))  # type: ignore[no-any-return]


def user_token(gw: Gateway, **claims: Any) -> str:
    now = int(time.time())
    return gw.sign({"sub": "u_alice", "auth_time": now - 60, "amr": ["pwd", "otp"], **claims})


ACR_CHALLENGE = (
    'Bearer realm="tokengate", error="insufficient_user_authentication", '
    'error_description="a stronger sign-in is required (acr)", '
    f'acr_values="{PHISHING_RESISTANT} {MFA}"'
)


@pytest.mark.parametrize(
    "acr", [None, "urn:tokengate:loa:1fa", "", ["urn:tokengate:loa:2fa"], MFA.upper()]
)
async def test_a_token_without_an_accepted_acr_is_told_which(
    gw: Gateway, upstream: tuple[RecordingUpstream, str], acr: Any
) -> None:
    token = user_token(gw, acr=acr)
    async with gw.client() as client:
        response = await client.get("/orders/sensitive/1", headers=bearer(token))
    await assert_denied(
        gw, upstream[0], response, 401, Reason.INSUFFICIENT_USER_AUTHENTICATION, ACR_CHALLENGE
    )
    assert response.json() == {
        "error": "insufficient_user_authentication",
        "error_description": "a stronger sign-in is required (acr)",
    }


@pytest.mark.parametrize("acr", [MFA, PHISHING_RESISTANT])
async def test_an_accepted_acr_passes(
    gw: Gateway, upstream: tuple[RecordingUpstream, str], acr: str
) -> None:
    async with gw.client() as client:
        response = await client.get("/orders/sensitive/1", headers=bearer(user_token(gw, acr=acr)))
    assert response.status_code == 200, response.text
    assert upstream[0].seen == [("GET", b"/orders/sensitive/1")]


async def test_a_clients_own_token_never_meets_a_step_up(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    token = await gw.token()  # client credentials: no acr, no auth_time
    async with gw.client() as client:
        acr = await client.get("/orders/sensitive/1", headers=bearer(token))
        fresh = await client.get("/orders/fresh/1", headers=bearer(token))
    assert acr.status_code == fresh.status_code == 401
    assert fresh.headers["www-authenticate"] == (
        'Bearer realm="tokengate", error="insufficient_user_authentication", '
        'error_description="a recent sign-in is required (the token has no auth_time)", '
        'max_age="300"'
    )
    assert upstream[0].seen == []


@pytest.mark.parametrize(
    ("ago", "status"),
    [(0, 200), (299, 200), (300 + 29, 200), (300 + 31, 401), (86400, 401)],
)
async def test_max_age_counts_from_auth_time_with_the_issuers_leeway(
    gw: Gateway, ago: int, status: int
) -> None:
    token = user_token(gw, auth_time=int(time.time()) - ago)
    async with gw.client() as client:
        response = await client.get("/orders/fresh/1", headers=bearer(token))
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"] == (
            'Bearer realm="tokengate", error="insufficient_user_authentication", '
            'error_description="a more recent sign-in is required (max_age)", max_age="300"'
        )


@pytest.mark.parametrize("auth_time", ["1700000000", True, None, 1.5e308 * 10])
async def test_an_auth_time_that_is_not_a_number_is_no_sign_in_time(
    gw: Gateway, auth_time: Any
) -> None:
    token = user_token(gw, auth_time=auth_time)
    async with gw.client() as client:
        response = await client.get("/orders/fresh/1", headers=bearer(token))
    assert response.status_code == 401
    assert "the token has no auth_time" in response.headers["www-authenticate"]


async def test_both_requirements_are_named_and_scope_problems_come_first(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    stale = user_token(gw, acr="urn:tokengate:loa:1fa", auth_time=int(time.time()) - 3600)
    async with gw.client() as client:
        both = await client.get("/orders/both/1", headers=bearer(stale))
        # a token that also lacks a scope: another sign-in would not help, so 403 first
        no_scope = await client.get(
            "/orders/sensitive/1", headers=bearer(user_token(gw, scope="orders:write"))
        )
    assert both.status_code == 401
    assert both.headers["www-authenticate"] == (
        'Bearer realm="tokengate", error="insufficient_user_authentication", '
        'error_description="a stronger sign-in is required (acr)", '
        f'acr_values="{MFA}", max_age="300"'
    )
    assert no_scope.status_code == 403
    lines = gw.audit_lines()
    assert [line["reason"] for line in lines] == [
        "insufficient_user_authentication",
        "insufficient_scope",
    ]
    body, _ = gw.app.metrics.exposition()
    assert (
        b'tokengate_gateway_requests_total{code="401",decision="deny",method="GET",'
        b'reason="insufficient_user_authentication",route="both"} 1.0'
    ) in body


@pytest.mark.parametrize(
    ("require", "problem"),
    [
        ({"acr": []}, "gateway.routes[0].require.acr: must list at least one acr value"),
        (
            {"acr": ['a"b']},
            "gateway.routes[0].require.acr[0]: must be an acr value without spaces or quotes",
        ),
        ({"acr": ["a b"]}, "gateway.routes[0].require.acr[0]: must be an acr value"),
        ({"max_age": 0}, "gateway.routes[0].require.max_age: must be a duration > 0"),
        ({"max_age": "soon"}, "gateway.routes[0].require.max_age: "),
    ],
)
def test_step_up_config_errors_name_the_key_path(require: dict[str, Any], problem: str) -> None:
    section = gateway_section("http://127.0.0.1:7000")
    section["routes"] = [
        {
            "name": "r",
            "match": {"path": "/x"},
            "upstream": "http://127.0.0.1:7000",
            "require": require,
        }
    ]
    with pytest.raises(ConfigErrors) as info:
        config_from({"gateway": section})
    assert any(str(e).startswith(problem) for e in info.value.errors), info.value.errors
