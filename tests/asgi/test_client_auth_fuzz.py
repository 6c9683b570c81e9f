"""Property: whatever bytes arrive as the body or the Authorization header, the token
endpoint answers with an OAuth JSON error (or a token), quickly, and never a 500."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.asgi.test_malformed_requests import raw_jwt
from tests.conftest import REPORTING_SECRET, TOKEN_URL, AuthServer

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
texts = st.text(max_size=40)
forms = st.fixed_dictionaries(
    {"grant_type": st.one_of(st.just("client_credentials"), st.just("client_credentials"), texts)},
    optional={
        "scope": st.one_of(st.just("orders:read"), texts),
        "client_id": st.one_of(st.just("reporting"), texts),
        "client_secret": st.one_of(st.just(REPORTING_SECRET), texts),
        "client_assertion": st.one_of(st.just("eyJhbGciOiJFUzI1NiJ9.e30.c2ln"), texts),
        "client_assertion_type": st.one_of(st.just(ASSERTION_TYPE), texts),
        "resource": st.one_of(st.just("api://default"), texts),
    },
)
form_bodies = forms.map(lambda fields: urlencode(fields).encode())

# client assertions: well-formed JWTs (unsigned) whose JSON holds anything, lone
# surrogates included; iss = sub, so that they reach the client lookup
odd_text = st.text(
    st.characters(categories=["Cs"]) | st.characters(categories=["L", "N", "P", "Cc"]),
    max_size=12,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | odd_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
names = st.one_of(st.sampled_from(["billing", "reporting", "\ud800x"]), odd_text, json_values)
headers = st.fixed_dictionaries(
    {"alg": st.one_of(st.just("ES256"), json_values)},
    optional={"kid": st.one_of(st.just("billing-1"), json_values), "typ": json_values},
)
claims = st.tuples(
    names,
    st.fixed_dictionaries(
        {}, optional={"aud": json_values, "exp": json_values, "jti": json_values}
    ),
).map(lambda t: {"iss": t[0], "sub": t[0], **t[1]})
assertion_bodies = st.tuples(headers, claims).map(
    lambda t: urlencode(
        {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": raw_jwt(*t),
        }
    ).encode()
)
bodies = st.one_of(
    st.binary(max_size=512),
    form_bodies,
    form_bodies,
    assertion_bodies,
    st.tuples(form_bodies, st.binary(max_size=16)).map(lambda t: t[0] + t[1]),
)
credentials = st.tuples(st.one_of(st.just("reporting"), st.text(max_size=20)), st.text(max_size=50))
authorizations = st.one_of(
    st.none(),
    st.none(),
    st.binary(max_size=128),
    st.binary(max_size=96).map(lambda raw: b"Basic " + base64.b64encode(raw)),
    credentials.map(
        lambda c: (
            b"Basic "
            + base64.b64encode(
                f"{quote_plus(c[0])}:{quote_plus(c[1])}".encode("utf-8", "surrogatepass")
            )
        )
    ),
    st.just(b"Basic " + base64.b64encode(f"reporting:{REPORTING_SECRET}".encode())),
)
content_types = st.sampled_from(
    [b"application/x-www-form-urlencoded", b"application/x-www-form-urlencoded; charset=utf-8"]
)


def per_client_throttle_only(data: dict[str, Any]) -> None:
    """Throttle per client_id (it is exercised too) but not per address: every example
    comes from the same one, and a locked address would end the search early."""
    data["authserver"]["client_auth_throttle"] = {"ip_failures": 0}


@pytest.fixture
def fuzz_server(make_authserver: Callable[..., AuthServer]) -> AuthServer:
    return make_authserver(per_client_throttle_only)


async def post(
    server: AuthServer, body: bytes, headers: list[tuple[bytes, bytes]]
) -> httpx.Response:
    async with server.client() as http:
        return await http.post(TOKEN_URL, content=body, headers=headers)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies, authorization=authorizations, content_type=content_types)
@example(  # a lone surrogate as the assertion's sub: once a 500 (the audit line could not encode)
    body=urlencode(
        {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": raw_jwt({"alg": "ES256"}, {"iss": "\ud800x", "sub": "\ud800x"}),
        }
    ).encode(),
    authorization=None,
    content_type=b"application/x-www-form-urlencoded",
)
def test_the_token_endpoint_answers_any_bytes(
    fuzz_server: AuthServer, body: bytes, authorization: bytes | None, content_type: bytes
) -> None:
    headers = [(b"content-type", content_type)]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    started = time.perf_counter()
    response = asyncio.run(post(fuzz_server, body, headers))
    assert time.perf_counter() - started < 1.0
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    document = response.json()
    if response.status_code == 200:  # a well-formed request with the right secret
        assert document["token_type"] == "Bearer"
        return
    assert response.status_code in (400, 401, 413, 429), response.text
    assert set(document) == {"error", "error_description"}
    assert len(document["error_description"]) <= 200
