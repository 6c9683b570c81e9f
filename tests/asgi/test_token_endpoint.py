"""The token endpoint, driven by Authlib's OAuth 2.0 client and by hand for errors."""

from __future__ import annotations

import base64
import itertools
import json
import string
import time
import uuid
from typing import Any
from urllib.parse import quote_plus, urlencode

import httpx
import jwt
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from tests.conftest import ADMIN_SECRET, ISSUER, REPORTING_SECRET, TOKEN_URL, AuthServer

pytestmark = pytest.mark.anyio

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


async def discover(http: httpx.AsyncClient, issuer: str = ISSUER) -> dict[str, Any]:
    response = await http.get(f"{issuer}/.well-known/oauth-authorization-server")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


async def test_discovery_advertises_only_what_is_used(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        metadata = (await http.get(f"{ISSUER}/.well-known/openid-configuration")).json()
    assert metadata["grant_types_supported"] == ["client_credentials"]
    assert metadata["response_types_supported"] == []
    assert metadata["id_token_signing_alg_values_supported"] == []  # no ID tokens yet
    assert metadata["access_token_signing_alg_values_supported"] == ["RS256"]


async def verify_with_jwks(
    http: httpx.AsyncClient, token: str, metadata: dict[str, Any], audience: str
) -> dict[str, Any]:
    """What any resource server does: JWKS from the metadata, key by kid, pinned alg."""
    jwks = (await http.get(metadata["jwks_uri"])).json()
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    return jwt.decode(
        token,
        jwt.PyJWK(jwk).key,
        algorithms=[jwk["alg"]],
        audience=audience,
        issuer=metadata["issuer"],
    )


def assert_token_response(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer"
    return body  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_authlib_client_gets_a_verifiable_token_with_a_secret(
    authserver: AuthServer, method: str
) -> None:
    async with authserver.client() as http:
        metadata = await discover(http)
        assert method in metadata["token_endpoint_auth_methods_supported"]
        async with AsyncOAuth2Client(
            "reporting",
            REPORTING_SECRET,
            token_endpoint_auth_method=method,
            transport=authserver.transport(),
        ) as oauth:
            token = await oauth.fetch_token(
                metadata["token_endpoint"], grant_type="client_credentials"
            )
        assert token["token_type"] == "Bearer"
        assert token["expires_in"] == 3600
        assert token["scope"] == "orders:read"
        assert "refresh_token" not in token
        claims = await verify_with_jwks(http, token["access_token"], metadata, "api://default")
    now = authserver.clock.now
    assert claims == {
        "iss": ISSUER,
        "sub": "reporting",
        "aud": "api://default",
        "exp": int(now) + 3600,
        "iat": int(now),
        "jti": claims["jti"],
        "client_id": "reporting",
        "scope": "orders:read",
        "tenant": "acme",
        "groups": ["ops", "reporting"],
    }
    issued = [line for line in authserver.audit_lines() if line["event"] == "token.issued"]
    assert len(issued) == 1
    assert issued[0]["jti"] == claims["jti"]
    assert issued[0]["client_id"] == "reporting"
    assert issued[0]["remote_addr"] == "203.0.113.7"


async def test_authlib_client_gets_a_token_with_private_key_jwt(
    authserver: AuthServer, billing_key: tuple[ec.EllipticCurvePrivateKey, dict[str, str]]
) -> None:
    private_key, jwk = billing_key
    async with authserver.client() as http:
        metadata = await discover(http)
        assert "private_key_jwt" in metadata["token_endpoint_auth_methods_supported"]
        assert "ES256" in metadata["token_endpoint_auth_signing_alg_values_supported"]
        signing_key = ECKey.import_key(private_key)
        async with AsyncOAuth2Client(
            "billing",
            signing_key,
            token_endpoint_auth_method="private_key_jwt",
            transport=authserver.transport(),
        ) as oauth:
            oauth.register_client_auth_method(
                PrivateKeyJWT(metadata["token_endpoint"], alg="ES256", headers={"kid": jwk["kid"]})
            )
            token = await oauth.fetch_token(
                metadata["token_endpoint"], grant_type="client_credentials"
            )
        claims = await verify_with_jwks(http, token["access_token"], metadata, "api://default")
    assert claims["sub"] == claims["client_id"] == "billing"
    assert claims["scope"] == "orders:write"


async def test_es256_server_signs_with_its_own_key(authserver: AuthServer) -> None:
    partners = "http://auth.test/oauth2/partners"
    async with authserver.client() as http:
        metadata = await discover(http, partners)
        response = await http.post(
            metadata["token_endpoint"],
            data={"grant_type": "client_credentials"},
            auth=("admin", ADMIN_SECRET),
        )
        body = assert_token_response(response)
        assert body["expires_in"] == 600
        assert body["scope"] == "partners:read"
        header = jwt.get_unverified_header(body["access_token"])
        assert header["alg"] == "ES256"
        claims = await verify_with_jwks(http, body["access_token"], metadata, "api://partners")
        default_jwks = (await http.get(f"{ISSUER}/v1/keys")).json()
    assert claims["iss"] == partners
    assert header["kid"] not in {k["kid"] for k in default_jwks["keys"]}


@pytest.mark.parametrize(
    ("scope", "granted"),
    [
        (None, "orders:read orders:write"),  # default: everything the client may have
        ("orders:write", "orders:write"),
        ("orders:write  orders:read orders:write", "orders:write orders:read"),
    ],
)
async def test_scope_defaults_and_subsets(
    authserver: AuthServer, scope: str | None, granted: str
) -> None:
    data = {"grant_type": "client_credentials"}
    if scope is not None:
        data["scope"] = scope
    async with authserver.client() as http:
        response = await http.post(TOKEN_URL, data=data, auth=("admin", ADMIN_SECRET))
    assert assert_token_response(response)["scope"] == granted


async def test_resource_naming_the_audience_is_accepted(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        response = await http.post(
            TOKEN_URL,
            data={"grant_type": "client_credentials", "resource": "api://default"},
            auth=("reporting", REPORTING_SECRET),
        )
    assert_token_response(response)


async def test_basic_credentials_are_form_urlencoded_before_base64(make_authserver: Any) -> None:
    client_id, secret = "svc:reports/1 x", "s3cr%t+with/odd=chars&0123456789abcdefghij"

    def add_client(data: dict[str, Any]) -> None:
        data["authserver"]["clients"].append({"client_id": client_id, "secret": secret})

    server = make_authserver(add_client)
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    headers = {"authorization": "Basic " + base64.b64encode(raw).decode()}
    async with server.client() as http:
        response = await http.post(
            TOKEN_URL, data={"grant_type": "client_credentials"}, headers=headers
        )
    assert_token_response(response)


async def test_secret_hash_clients_authenticate(make_authserver: Any) -> None:
    import hashlib

    secret = "hashed-secret-0123456789abcdefghijklmnopqr"

    def add_client(data: dict[str, Any]) -> None:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        data["authserver"]["clients"].append(
            {"client_id": "hashed", "secret_hash": f"sha256:{digest}"}
        )

    server = make_authserver(add_client)
    async with server.client() as http:
        ok = await http.post(
            TOKEN_URL, data={"grant_type": "client_credentials"}, auth=("hashed", secret)
        )
        bad = await http.post(
            TOKEN_URL, data={"grant_type": "client_credentials"}, auth=("hashed", secret + "x")
        )
    assert_token_response(ok)
    assert bad.status_code == 401


# --------------------------------------------------------------------------- errors


def basic(client_id: str, secret: str) -> str:
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


FORM = {"content-type": "application/x-www-form-urlencoded"}
GOOD_BASIC = {"authorization": basic("reporting", REPORTING_SECRET), **FORM}
CC = b"grant_type=client_credentials"
BASIC_CHALLENGE = 'Basic realm="tokengate"'

ERROR_CASES: list[tuple[str, str, dict[str, str], bytes, int, str, str | None]] = [
    # id, method, headers, body, status, error, www-authenticate
    ("get", "GET", GOOD_BASIC, b"", 405, "invalid_request", None),
    ("put", "PUT", GOOD_BASIC, CC, 405, "invalid_request", None),
    (
        "json-body",
        "POST",
        {"authorization": GOOD_BASIC["authorization"], "content-type": "application/json"},
        b'{"grant_type": "client_credentials"}',
        400,
        "invalid_request",
        None,
    ),
    ("no-grant-type", "POST", GOOD_BASIC, b"scope=orders:read", 400, "invalid_request", None),
    (
        "repeated-parameter",
        "POST",
        GOOD_BASIC,
        CC + b"&grant_type=client_credentials",
        400,
        "invalid_request",
        None,
    ),
    (
        "unsupported-grant",
        "POST",
        GOOD_BASIC,
        b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code=x",
        400,
        "unsupported_grant_type",
        None,
    ),
    (
        "password-not-opted-in",
        "POST",
        GOOD_BASIC,
        b"grant_type=password&username=a&password=b",
        400,
        "unauthorized_client",
        None,
    ),
    ("no-client-auth", "POST", FORM, CC, 401, "invalid_client", None),
    (
        "public-client-id-only",
        "POST",
        FORM,
        CC + b"&client_id=reporting",
        401,
        "invalid_client",
        None,
    ),
    (
        "wrong-secret-basic",
        "POST",
        {"authorization": basic("reporting", "nope"), **FORM},
        CC,
        401,
        "invalid_client",
        BASIC_CHALLENGE,
    ),
    (
        "wrong-secret-post",
        "POST",
        FORM,
        CC + b"&client_id=reporting&client_secret=nope",
        401,
        "invalid_client",
        None,
    ),
    (
        "unknown-client",
        "POST",
        {"authorization": basic("nobody", REPORTING_SECRET), **FORM},
        CC,
        401,
        "invalid_client",
        BASIC_CHALLENGE,
    ),
    (
        "basic-not-base64",
        "POST",
        {"authorization": "Basic !!!not-base64!!!", **FORM},
        CC,
        401,
        "invalid_client",
        BASIC_CHALLENGE,
    ),
    (
        "basic-without-colon",
        "POST",
        {"authorization": "Basic " + base64.b64encode(b"reporting").decode(), **FORM},
        CC,
        401,
        "invalid_client",
        BASIC_CHALLENGE,
    ),
    (
        "basic-not-utf8",
        "POST",
        {"authorization": "Basic " + base64.b64encode(b"rep\xff:x").decode(), **FORM},
        CC,
        401,
        "invalid_client",
        BASIC_CHALLENGE,
    ),
    (
        "bearer-instead-of-basic",
        "POST",
        {"authorization": "Bearer abc", **FORM},
        CC,
        401,
        "invalid_client",
        BASIC_CHALLENGE,
    ),
    (
        "two-auth-methods",
        "POST",
        GOOD_BASIC,
        CC + b"&client_id=reporting&client_secret=" + REPORTING_SECRET.encode(),
        400,
        "invalid_request",
        None,
    ),
    (
        "basic-and-body-client-id-differ",
        "POST",
        GOOD_BASIC,
        CC + b"&client_id=admin",
        401,
        "invalid_client",
        BASIC_CHALLENGE,
    ),
    (
        "scope-not-allowed-for-client",
        "POST",
        GOOD_BASIC,
        CC + b"&scope=orders:write",
        400,
        "invalid_scope",
        None,
    ),
    (
        "scope-unknown",
        "POST",
        GOOD_BASIC,
        CC + b"&scope=orders:read%20admin:all",
        400,
        "invalid_scope",
        None,
    ),
    (
        "scope-bad-characters",
        "POST",
        GOOD_BASIC,
        CC + b"&scope=orders%22read",
        400,
        "invalid_request",
        None,
    ),
    (
        "resource-mismatch",
        "POST",
        GOOD_BASIC,
        CC + b"&resource=api://other",
        400,
        "invalid_target",
        None,
    ),
    (
        "percent-encoded-non-utf8",
        "POST",
        GOOD_BASIC,
        CC + b"&scope=%ff%fe",
        400,
        "invalid_request",
        None,
    ),
    ("raw-non-ascii", "POST", GOOD_BASIC, CC + b"&scope=\xc3\xa9", 400, "invalid_request", None),
    ("too-large", "POST", GOOD_BASIC, CC + b"&pad=" + b"a" * 70000, 413, "invalid_request", None),
    (
        "client-assertion-wrong-type",
        "POST",
        FORM,
        CC + b"&client_assertion_type=urn:x&client_assertion=a.b.c",
        401,
        "invalid_client",
        None,
    ),
    (
        "client-assertion-garbage",
        "POST",
        FORM,
        CC + b"&client_assertion_type=" + quote_plus(JWT_BEARER).encode() + b"&client_assertion=x",
        401,
        "invalid_client",
        None,
    ),
]


def assert_oauth_error(
    response: httpx.Response, status: int, error: str, challenge: str | None = None
) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    assert body["error_description"]
    assert "Traceback" not in response.text
    assert response.headers.get("www-authenticate") == challenge


CLIENT_AUTH_FAILED = (
    b'{"error":"invalid_client","error_description":"client authentication failed"}'
)


def assert_client_auth_failed(response: httpx.Response, challenge: str | None = None) -> None:
    """Every failed client authentication gets these very bytes, whatever the cause."""
    assert_oauth_error(response, 401, "invalid_client", challenge)
    assert response.content == CLIENT_AUTH_FAILED


@pytest.mark.parametrize(
    ("method", "headers", "body", "status", "error", "challenge"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
async def test_token_errors(
    authserver: AuthServer,
    method: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    error: str,
    challenge: str | None,
) -> None:
    async with authserver.client() as http:
        response = await http.request(method, TOKEN_URL, headers=headers, content=body)
    assert_oauth_error(response, status, error, challenge)
    if error == "invalid_client":
        assert_client_auth_failed(response, challenge)
    if status == 405:
        assert response.headers["allow"] == "POST"
    lines = authserver.audit_lines()
    assert [line["event"] for line in lines] == ["token.denied"]
    assert lines[0]["reason"] == error
    assert lines[0]["outcome"] == "denied"
    assert lines[0]["jti"] is None


async def test_client_not_allowed_on_this_server(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        response = await http.post(
            "http://auth.test/oauth2/partners/v1/token",
            data={"grant_type": "client_credentials"},
            auth=("reporting", REPORTING_SECRET),
        )
    assert_oauth_error(response, 400, "unauthorized_client")
    assert [line["event"] for line in authserver.audit_lines()] == ["token.denied"]


async def test_client_without_the_grant_type(make_authserver: Any) -> None:
    def no_grants(data: dict[str, Any]) -> None:
        data["authserver"]["clients"][1]["grant_types"] = []

    server = make_authserver(no_grants)
    async with server.client() as http:
        response = await http.post(
            TOKEN_URL, data={"grant_type": "client_credentials"}, auth=("admin", ADMIN_SECRET)
        )
    assert_oauth_error(response, 400, "unauthorized_client")


async def test_secret_client_cannot_use_a_method_it_is_not_configured_for(
    make_authserver: Any,
) -> None:
    def basic_only(data: dict[str, Any]) -> None:
        data["authserver"]["clients"][1]["auth_method"] = "client_secret_basic"

    server = make_authserver(basic_only)
    async with server.client() as http:
        response = await http.post(
            TOKEN_URL,
            data={
                "grant_type": "client_credentials",
                "client_id": "admin",
                "client_secret": ADMIN_SECRET,
            },
        )
    assert_oauth_error(response, 401, "invalid_client")


@pytest.mark.parametrize("path", ["/oauth2/nope/v1/token", "/oauth2/default/v1/tokens", "/"])
async def test_unknown_server_or_endpoint_is_404(authserver: AuthServer, path: str) -> None:
    async with authserver.client() as http:
        response = await http.post(path, content=CC, headers=GOOD_BASIC)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


# --------------------------------------------------------------------------- private_key_jwt


def assertion(
    private_key: Any,
    *,
    kid: str | None = "billing-1",
    alg: str = "ES256",
    **overrides: Any,
) -> str:
    now = int(time.time())
    claims = {
        "iss": "billing",
        "sub": "billing",
        "aud": TOKEN_URL,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(claims, private_key, algorithm=alg, headers=headers)


async def post_assertion(server: AuthServer, token: str) -> httpx.Response:
    async with server.client() as http:
        return await http.post(
            TOKEN_URL,
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": token,
            },
        )


async def test_assertion_with_issuer_audience_is_accepted(
    authserver: AuthServer, billing_key: Any
) -> None:
    response = await post_assertion(authserver, assertion(billing_key[0], aud=ISSUER))
    assert_token_response(response)


async def test_assertion_without_kid_uses_the_only_key(
    authserver: AuthServer, billing_key: Any
) -> None:
    response = await post_assertion(authserver, assertion(billing_key[0], kid=None))
    assert_token_response(response)


async def test_replayed_assertion_is_refused(authserver: AuthServer, billing_key: Any) -> None:
    token = assertion(billing_key[0])
    assert_token_response(await post_assertion(authserver, token))
    replay = await post_assertion(authserver, token)
    assert_client_auth_failed(replay)
    lines = authserver.audit_lines()
    assert [line["event"] for line in lines] == ["token.issued", "token.denied"]
    assert (lines[1]["client_id"], lines[1]["detail"]) == ("billing", "assertion_replayed")
    assert token not in authserver.audit_path.read_text()  # never log an assertion


def _other_key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


ASSERTION_ERRORS = [
    # id, overrides, the audit line's detail (the response is always the same)
    # exp as seconds from when the test runs, not from when this module was imported
    ("exp-over-an-hour", {"_exp_in": 3700 + 31}, "assertion_lifetime"),
    ("expired", {"_exp_in": -120}, "assertion_expired"),
    ("no-exp", {"exp": None}, "assertion_invalid"),
    ("no-jti", {"jti": None}, "assertion_invalid"),
    ("wrong-aud", {"aud": "https://elsewhere/token"}, "assertion_audience"),
    ("iss-not-sub", {"iss": "someone"}, "assertion_iss_sub"),
    ("unknown-client", {"iss": "ghost", "sub": "ghost"}, "unknown_client"),
    ("secret-client", {"iss": "reporting", "sub": "reporting"}, "method_not_allowed"),
    ("unknown-kid", {"_kid": "other"}, "assertion_key_unknown"),
    ("wrong-alg-for-key", {"_alg": "HS256"}, "assertion_key_unknown"),
    ("signed-by-another-key", {"_key": "other"}, "assertion_invalid"),
]


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [c[1:] for c in ASSERTION_ERRORS],
    ids=[c[0] for c in ASSERTION_ERRORS],
)
async def test_bad_assertions_are_invalid_client(
    authserver: AuthServer, billing_key: Any, overrides: dict[str, Any], detail: str
) -> None:
    overrides = dict(overrides)
    if "_exp_in" in overrides:
        overrides["exp"] = int(time.time()) + overrides.pop("_exp_in")
    kid = overrides.pop("_kid", "billing-1")
    alg = overrides.pop("_alg", "ES256")
    key = _other_key() if overrides.pop("_key", None) else billing_key[0]
    if alg == "HS256":
        key = "a-shared-secret-that-is-long-enough-for-hs256"
    response = await post_assertion(authserver, assertion(key, kid=kid, alg=alg, **overrides))
    assert_client_auth_failed(response)
    lines = authserver.audit_lines()
    assert [line["event"] for line in lines] == ["token.denied"]
    assert (lines[0]["reason"], lines[0]["detail"]) == ("invalid_client", detail)


def use_jwks_uri(data: dict[str, Any]) -> None:
    """The billing client publishes its keys at a jwks_uri instead of in the config."""
    client = data["authserver"]["clients"][2]
    del client["jwks"]
    client["jwks_uri"] = "https://billing.test/jwks.json"


async def test_jwks_uri_client_keys_are_fetched_and_cached(
    make_authserver: Any, billing_key: Any
) -> None:
    fetches: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetches.append(str(request.url))
        return httpx.Response(200, json={"keys": [billing_key[1]]})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    server = make_authserver(use_jwks_uri, http=http)
    for _ in range(3):
        assert_token_response(await post_assertion(server, assertion(billing_key[0])))
    # an unknown kid may refetch, but only after the minimum interval
    unknown = await post_assertion(server, assertion(billing_key[0], kid="rotated"))
    assert_oauth_error(unknown, 401, "invalid_client")
    assert fetches == ["https://billing.test/jwks.json"]
    await http.aclose()


async def test_jwks_uri_failure_is_invalid_client(make_authserver: Any, billing_key: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    server = make_authserver(use_jwks_uri, http=http)
    response = await post_assertion(server, assertion(billing_key[0]))
    assert_client_auth_failed(response)
    assert server.audit_lines()[-1]["detail"] == "jwks_unavailable"
    await http.aclose()


# --------------------------------------------------------------------------- bounded input


def scope_flood(count: int = 16384) -> str:
    """``count`` distinct short scope tokens, about 62 KB: under the 64 KiB body limit."""
    alphabet = string.ascii_letters + string.digits
    two = ["".join(p) for p in itertools.product(alphabet, repeat=2)]
    three = ("".join(p) for p in itertools.product(alphabet, repeat=3))
    return " ".join(two + list(itertools.islice(three, count - len(two))))


async def timed_post(server: AuthServer, **kwargs: Any) -> tuple[httpx.Response, float]:
    async with server.client() as http:
        started = time.perf_counter()
        response = await http.post(TOKEN_URL, **kwargs)
        return response, time.perf_counter() - started


@pytest.mark.parametrize(
    ("auth", "status", "error"),
    [
        (("nobody", "wrong"), 401, "invalid_client"),
        (("reporting", REPORTING_SECRET), 400, "invalid_scope"),
    ],
    ids=["unknown-client", "valid-client"],
)
async def test_a_scope_flood_is_cheap(
    authserver: AuthServer, auth: tuple[str, str], status: int, error: str
) -> None:
    flood = scope_flood()
    data = {"grant_type": "client_credentials", "scope": flood}
    assert len(urlencode(data)) < 65536
    response, seconds = await timed_post(authserver, data=data, auth=auth)
    assert_oauth_error(response, status, error, BASIC_CHALLENGE if status == 401 else None)
    assert seconds < 0.5
    assert len(response.json()["error_description"]) <= 100
    line = authserver.audit_lines()[-1]
    assert line["scopes"] == []  # what was asked is parsed only for an authenticated client
    if status == 400:
        assert response.json()["error_description"] == "more than 100 scopes requested"


async def test_a_hundred_scopes_pass_and_a_long_one_does_not(make_authserver: Any) -> None:
    many = [f"s{i}" for i in range(100)]

    def offer_many(data: dict[str, Any]) -> None:
        data["authserver"]["servers"][0]["scopes"] += many

    server = make_authserver(offer_many)
    ok, _ = await timed_post(
        server,
        data={"grant_type": "client_credentials", "scope": " ".join([*many, *many])},
        auth=("admin", ADMIN_SECRET),
    )
    assert assert_token_response(ok)["scope"] == " ".join(many)
    long, seconds = await timed_post(
        server,
        data={"grant_type": "client_credentials", "scope": "a" * 60000},
        auth=("admin", ADMIN_SECRET),
    )
    assert_oauth_error(long, 400, "invalid_scope")
    assert long.json()["error_description"] == "a scope is longer than 256 characters"
    assert seconds < 0.5


async def test_refused_scopes_are_not_echoed_at_length(authserver: AuthServer) -> None:
    refused = " ".join(f"{i:03d}" + "x" * 252 for i in range(100))  # 100 scopes of 255
    response, _ = await timed_post(
        authserver,
        data={"grant_type": "client_credentials", "scope": refused},
        auth=("reporting", REPORTING_SECRET),
    )
    assert_oauth_error(response, 400, "invalid_scope")
    description = response.json()["error_description"]
    assert description == "scope not allowed: 000" + "x" * 61 + "... and 99 more"
    line = authserver.audit_lines()[-1]  # logged once authenticated, cut to one atomic write
    assert line["scopes"][:3] == refused.split()[:3]
    assert line["scopes"][-1].startswith("...[truncated] ") and line["scopes"][-1].endswith(" more")
    assert len(json.dumps(line, separators=(",", ":"), ensure_ascii=False)) < 4095


async def test_a_repeated_parameter_is_named_only_when_known(authserver: AuthServer) -> None:
    name = "p" * 30000
    async with authserver.client() as http:
        unknown = await http.post(
            TOKEN_URL, content=f"{name}=1&{name}=2".encode(), headers=GOOD_BASIC
        )
        known = await http.post(TOKEN_URL, content=CC + b"&scope=a&scope=b", headers=GOOD_BASIC)
    assert_oauth_error(unknown, 400, "invalid_request")
    assert unknown.json()["error_description"] == "a parameter is repeated"
    assert known.json()["error_description"] == "parameter scope is repeated"
