"""The gateway pipeline in-process: tokens from the real authorization server, a real
loopback upstream, and an attack corpus that must never reach it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.errors import Reason
from tests.asgi.gateway_fixtures import (
    PARTNERS,
    Gateway,
    RecordingUpstream,
    gateway_section,
    make_gateway,
    upstream,
)
from tests.conftest import ISSUER

pytestmark = pytest.mark.anyio
__all__ = ["make_gateway", "upstream"]  # fixtures


@pytest.fixture
async def gw(make_gateway: Any) -> Gateway:
    return await make_gateway()  # type: ignore[no-any-return]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- allowed


async def test_allowed_request_reaches_the_upstream_with_identity(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    token = await gw.token()
    async with gw.client() as client:
        response = await client.get(
            "/orders/42?b=2&a=1&access_token=x",
            headers={
                **bearer(token),
                "x-request-id": "req-123",
                "X-Auth-Subject": "admin",
                "x_auth_scopes": "admin",
                "X-Forwarded-For": "10.0.0.1",
                "Connection": "x-secret",
                "X-Secret": "hop",
                "Cookie": "a=1",
            },
        )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-123"
    echoed = response.json()
    assert (echoed["method"], echoed["path"], echoed["query"]) == (
        "GET",
        "/orders/42",
        "b=2&a=1&access_token=x",
    )
    headers = echoed["headers"]
    assert headers["x-auth-subject"] == "reporting"
    assert headers["x-auth-client-id"] == "reporting"
    assert headers["x-auth-scopes"] == "orders:read"
    assert headers["x-auth-issuer"] == ISSUER
    assert headers["x-forwarded-for"] == "198.51.100.9"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "api.test"
    assert headers["x-request-id"] == "req-123"
    assert headers["cookie"] == "a=1"
    for absent in ("authorization", "x_auth_scopes", "x-secret", "connection"):
        assert absent not in headers
    line = gw.audit_lines()[-1]
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert line == {
        "ts": line["ts"],
        "event": "gateway.request",
        "request_id": "req-123",
        "route": "orders-read",
        "method": "GET",
        "path": "/orders/42",
        "status": 200,
        "decision": "allow",
        "reason": "ok",
        "client_id": "reporting",
        "sub": "reporting",
        "iss": ISSUER,
        "jti": claims["jti"],
        "scopes": ["orders:read"],
        "remote_addr": "198.51.100.9",
        "duration_ms": line["duration_ms"],
        "bytes_in": 0,
        "bytes_out": len(response.content),
    }
    assert token not in gw.audit_path.read_text()


async def test_request_bodies_reach_the_upstream_intact(gw: Gateway) -> None:
    token = await gw.token("admin")
    body = secrets.token_bytes(300_000)
    async with gw.client() as client:
        response = await client.post("/orders/1", content=body, headers=bearer(token))
    assert response.status_code == 200
    assert response.json()["body_bytes"] == len(body)
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert gw.audit_lines()[-1]["bytes_in"] == len(body)
    async with gw.client() as client:
        response = await client.post("/orders/1", content=b"", headers=bearer(token))
    assert response.json()["body_bytes"] == 0
    assert response.json()["headers"]["content-length"] == "0"


async def test_strip_prefix_and_forward_token(gw: Gateway) -> None:
    token = await gw.token("admin", PARTNERS)
    async with gw.client() as client:
        response = await client.get("/partners/v2/items", headers=bearer(token))
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["path"] == "/v2/items"
    assert echoed["headers"]["authorization"] == f"Bearer {token}"


async def test_public_routes_need_no_token_and_strip_spoofed_identity(gw: Gateway) -> None:
    async with gw.client() as client:
        response = await client.get(
            "/public/x", headers={"X-Auth-Subject": "admin", "X-AUTH-ISSUER": "me"}
        )
    assert response.status_code == 200
    headers = response.json()["headers"]
    assert not [h for h in headers if h.replace("_", "-").startswith("x-auth-")]


async def test_upstream_status_and_headers_pass_through(gw: Gateway) -> None:
    async with gw.client() as client:
        response = await client.get("/public/x?status=418")
    assert response.status_code == 418
    assert gw.audit_lines()[-1]["decision"] == "allow"


# --------------------------------------------------------------------------- denied


async def assert_denied(
    gw: Gateway,
    upstream: RecordingUpstream,
    response: Any,
    status: int,
    reason: Reason,
    challenge: str | None,
) -> None:
    assert response.status_code == status, response.text
    assert response.headers.get("www-authenticate") == challenge
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "error_description"}
    line = gw.audit_lines()[-1]
    assert (line["status"], line["decision"], line["reason"]) == (status, "deny", reason.value)
    assert upstream.seen == []


async def test_missing_token(gw: Gateway, upstream: tuple[RecordingUpstream, str]) -> None:
    async with gw.client() as client:
        response = await client.get("/orders/1")
    await assert_denied(
        gw, upstream[0], response, 401, Reason.TOKEN_MISSING, 'Bearer realm="tokengate"'
    )


async def test_missing_scope(gw: Gateway, upstream: tuple[RecordingUpstream, str]) -> None:
    token = await gw.token()
    async with gw.client() as client:
        response = await client.post("/orders/1", headers=bearer(token))
    await assert_denied(
        gw,
        upstream[0],
        response,
        403,
        Reason.INSUFFICIENT_SCOPE,
        'Bearer realm="tokengate", error="insufficient_scope", '
        'error_description="the token lacks a required scope", scope="orders:write"',
    )


async def test_failed_claim_rule(gw: Gateway, upstream: tuple[RecordingUpstream, str]) -> None:
    token = gw.sign({"tenant": "globex"})
    async with gw.client() as client:
        response = await client.get("/orders/1", headers=bearer(token))
    await assert_denied(
        gw,
        upstream[0],
        response,
        403,
        Reason.CLAIMS_MISMATCH,
        'Bearer realm="tokengate", error="insufficient_scope", '
        'error_description="the token\'s claims do not satisfy this route"',
    )


async def test_route_pinned_to_another_issuer(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    token = await gw.token("admin")  # the default issuer, not partners
    async with gw.client() as client:
        response = await client.get("/partners/x", headers=bearer(token))
    assert response.status_code == 401
    assert gw.audit_lines()[-1]["reason"] == "issuer_unknown"
    assert upstream[0].seen == []


async def test_no_route_is_404_never_forwarded(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    token = await gw.token("admin")
    async with gw.client() as client:
        response = await client.get("/elsewhere", headers=bearer(token))
    await assert_denied(gw, upstream[0], response, 404, Reason.NO_ROUTE, None)
    assert gw.audit_lines()[-1]["route"] == "(none)"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_with_public_key(gw: Gateway) -> str:
    """The classic confusion attack: HMAC keyed with the issuer's public key PEM."""
    key = gw.authserver.services.keyring.current("default").signer
    pem = key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "kid": key.kid, "typ": "at+jwt"}).encode())
    now = int(time.time())
    payload = _b64(
        json.dumps(
            {"iss": ISSUER, "aud": "api://default", "exp": now + 60, "scope": "orders:read"}
        ).encode()
    )
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def _alg_none() -> str:
    header = _b64(b'{"alg":"none","typ":"at+jwt"}')
    payload = _b64(
        json.dumps({"iss": ISSUER, "aud": "api://default", "exp": int(time.time()) + 60}).encode()
    )
    return f"{header}.{payload}."


ATTACKS: list[tuple[str, Any, Reason]] = [
    ("alg-none", lambda gw: _alg_none(), Reason.TOKEN_INVALID),
    ("hs256-with-public-key", _hs256_with_public_key, Reason.TOKEN_INVALID),
    ("unknown-kid", lambda gw: gw.sign({}, kid="no-such-key"), Reason.KEY_UNKNOWN),
    (
        "kid-of-another-issuer",  # partners' real key and kid, claiming the default issuer
        lambda gw: gw.sign({"iss": ISSUER}, server="partners"),
        Reason.KEY_UNKNOWN,
    ),
    ("expired", lambda gw: gw.sign({"exp": int(time.time()) - 120}), Reason.TOKEN_EXPIRED),
    (
        "not-yet-valid",
        lambda gw: gw.sign({"nbf": int(time.time()) + 300}),
        Reason.TOKEN_NOT_YET_VALID,
    ),
    (
        "issued-in-the-future",
        lambda gw: gw.sign({"iat": int(time.time()) + 300}),
        Reason.TOKEN_NOT_YET_VALID,
    ),
    ("no-exp", lambda gw: gw.sign({"exp": None}), Reason.TOKEN_INVALID),
    ("wrong-iss", lambda gw: gw.sign({"iss": "https://evil.example"}), Reason.ISSUER_UNKNOWN),
    ("wrong-aud", lambda gw: gw.sign({"aud": "api://other"}), Reason.AUDIENCE_MISMATCH),
    ("id-token-typ", lambda gw: gw.sign({}, typ="JWT"), Reason.TOKEN_INVALID),
    ("no-typ", lambda gw: gw.sign({}, typ=None), Reason.TOKEN_INVALID),
    ("tampered-claims", lambda gw: _tamper(gw.sign({})), Reason.TOKEN_INVALID),
    ("oversized", lambda gw: gw.sign({"pad": "x" * 9000}), Reason.TOKEN_INVALID),
    ("garbage", lambda gw: "garbage", Reason.TOKEN_INVALID),
    ("empty", lambda gw: "", Reason.TOKEN_INVALID),
    ("space-inside", lambda gw: "abc def", Reason.TOKEN_INVALID),
    ("quote-inside", lambda gw: 'abc"def', Reason.TOKEN_INVALID),
    ("two-segments", lambda gw: "a.b", Reason.TOKEN_INVALID),
    ("not-json", lambda gw: "YWJj.YWJj.YWJj", Reason.TOKEN_INVALID),
    ("kid-is-a-list", lambda gw: gw.sign({}, kid=["a"]), Reason.TOKEN_INVALID),
    (
        "header-injection-in-sub",  # X-Auth-Subject would end and a forged header begin
        lambda gw: gw.sign({"sub": "svc\r\nx-auth-scopes: admin"}),
        Reason.TOKEN_INVALID,
    ),
    # claims of the wrong JSON type, or that an identity header could not carry as they are
    ("iss-is-a-list", lambda gw: gw.sign({"iss": [ISSUER]}), Reason.TOKEN_INVALID),
    ("iss-is-an-object", lambda gw: gw.sign({"iss": {"url": ISSUER}}), Reason.TOKEN_INVALID),
    ("aud-is-a-number", lambda gw: gw.sign({"aud": 5}), Reason.TOKEN_INVALID),
    ("aud-holds-a-number", lambda gw: gw.sign({"aud": ["api://default", 5]}), Reason.TOKEN_INVALID),
    ("sub-is-a-number", lambda gw: gw.sign({"sub": 42}), Reason.TOKEN_INVALID),
    ("client-id-is-an-object", lambda gw: gw.sign({"client_id": {}}), Reason.TOKEN_INVALID),
    ("sub-padded", lambda gw: gw.sign({"sub": " admin"}), Reason.TOKEN_INVALID),
    ("client-id-padded", lambda gw: gw.sign({"client_id": "reporting\t"}), Reason.TOKEN_INVALID),
    ("sub-lone-surrogate", lambda gw: gw.sign({"sub": "\ud800x"}), Reason.TOKEN_INVALID),
    (
        "scp-entry-with-space",
        lambda gw: gw.sign({"scp": ["orders:read admin"]}),
        Reason.TOKEN_INVALID,
    ),
    ("scope-with-tab", lambda gw: gw.sign({"scope": "orders:read\tadmin"}), Reason.TOKEN_INVALID),
    ("scp-is-a-number", lambda gw: gw.sign({"scp": 1}), Reason.TOKEN_INVALID),
    ("exp-is-infinite", lambda gw: gw.sign({"exp": float("inf")}), Reason.TOKEN_INVALID),
    ("exp-is-a-string", lambda gw: gw.sign({"exp": "soon"}), Reason.TOKEN_INVALID),
    ("nested-1100-deep", lambda gw: _signed_text(gw, _deep(1100)), Reason.TOKEN_INVALID),
    ("header-nested-deep", lambda gw: _deep_header(gw), Reason.TOKEN_INVALID),
]


def _deep(depth: int) -> str:
    now = int(time.time())
    return (
        f'{{"iss":"{ISSUER}","aud":"api://default","exp":{now + 300},'
        f'"scope":"orders:read","x":{"[" * depth}{"]" * depth}}}'
    )


def _signed_text(gw: Gateway, payload: str) -> str:
    """A token signed by the issuer's real key over a payload given as JSON text."""
    key = gw.authserver.services.keyring.current("default").signer
    head = _b64(json.dumps({"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}).encode())
    signing_input = f"{head}.{_b64(payload.encode())}".encode()
    from jwt.algorithms import get_default_algorithms

    signature = get_default_algorithms()[key.alg].sign(signing_input, key.private_key)
    return f"{signing_input.decode()}.{_b64(signature)}"


def _deep_header(gw: Gateway) -> str:
    _, payload, signature = gw.sign({}).split(".")
    header = '{"x":' + "[" * 1100 + "]" * 1100 + "}"
    return f"{_b64(header.encode())}.{payload}.{signature}"


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scope"] = "orders:read admin"
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


@pytest.mark.parametrize(
    ("make_token", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
async def test_attack_corpus(
    gw: Gateway,
    upstream: tuple[RecordingUpstream, str],
    make_token: Any,
    reason: Reason,
) -> None:
    token = make_token(gw)
    async with gw.client() as client:
        response = await client.get("/orders/1", headers=bearer(token))
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith(
        'Bearer realm="tokengate", error="invalid_token", error_description="'
    )
    assert response.json()["error"] == "invalid_token"
    line = gw.audit_lines()[-1]
    assert (line["decision"], line["reason"]) == ("deny", reason.value)
    assert upstream[0].seen == []


async def test_token_in_the_query_string_is_not_accepted(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    token = await gw.token()
    async with gw.client() as client:
        response = await client.get("/orders/1", params={"access_token": token})
    await assert_denied(
        gw, upstream[0], response, 401, Reason.TOKEN_MISSING, 'Bearer realm="tokengate"'
    )


# --------------------------------------------------------------------------- paths

PATH_CORPUS = [
    # (raw path, allowed outcomes) -- none may reach /admin without a token
    (b"/public/../admin/secret", {401}),  # CVE-2019-9901: normalized, then matched
    (b"/public/%2e%2e/admin/secret", {401}),
    (b"/public/%2E%2E/admin/secret", {401}),
    (b"/public/.%2e/admin/secret", {401}),
    (b"/public%2F..%2Fadmin/secret", {400}),  # CVE-2021-29492: encoded slash
    (b"/public/..%2Fadmin/secret", {400}),
    (b"/public/..%5Cadmin/secret", {400}),
    (b"/public\\..\\admin/secret", {400}),
    (b"/public/..;/admin/secret", {400}),  # Tomcat ..; bypass
    (b"/admin;x=1/secret", {400}),  # matrix parameters
    (b"/public;/../admin/secret", {400}),
    (b"/admin/secret%00.json", {400}),
    (b"/public/%C0%AE%C0%AE/admin/secret", {400}),  # overlong UTF-8 dots
    (b"/../admin/secret", {400}),
    (b"//admin/secret", {401}),  # merged slashes match the protected route
    (b"/ADMIN/secret", {404}),  # case-sensitive: no route, so not forwarded
    (b"/admin/secret?/public/x", {401}),  # oauth2-proxy CVE-2025-54576: query never matched
    (b"/public/%252e%252e/admin", {200}),  # a literal segment, not a dot segment
]


@pytest.mark.parametrize(
    ("raw", "outcomes"), PATH_CORPUS, ids=[p[0].decode("latin-1") for p in PATH_CORPUS]
)
async def test_path_corpus_never_reaches_a_protected_upstream_without_a_token(
    gw: Gateway, upstream: tuple[RecordingUpstream, str], raw: bytes, outcomes: set[int]
) -> None:
    path, _, query = raw.partition(b"?")
    status, _, _ = await gw.raw("GET", path if not query else raw)
    assert status in outcomes
    if 200 in outcomes:  # forwarded to the public route, as the literal segment it is
        assert upstream[0].seen == [("GET", raw)]
    else:
        assert upstream[0].seen == []


async def test_a_query_that_would_split_the_request_line_is_refused(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    status, _, body = await gw.raw("GET", b"/public/x", query=b"a=1 HTTP/1.1\r\nx-evil: 1")
    assert status == 400 and json.loads(body)["error"] == "invalid_request"
    assert upstream[0].seen == []
    assert gw.audit_lines()[-1]["reason"] == "bad_path"


# --------------------------------------------------------------------------- upstream failures


async def test_upstream_down_is_502(gw: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    async with gw.client() as client:
        response = await client.get("/dead/x")
        for _ in range(3):
            await client.get("/dead/x")
    assert response.status_code == 502
    assert response.json()["error"] == "bad_gateway"
    line = gw.audit_lines()[-1]
    assert (line["decision"], line["reason"]) == ("allow", "upstream_unavailable")
    # why, for operators: once, not once per request
    reports = [
        json.loads(x) for x in capsys.readouterr().err.splitlines() if "upstream_failed" in x
    ]
    assert len(reports) == 1
    assert reports[0]["upstream"] == "http://127.0.0.1:9"
    assert reports[0]["error"].startswith("cannot connect:")


async def test_upstream_timeout_is_504(gw: Gateway) -> None:
    token = await gw.token("admin")
    async with gw.client() as client:
        response = await client.put("/orders/1?delay=3", headers=bearer(token))
    assert response.status_code == 504
    line = gw.audit_lines()[-1]
    assert (line["status"], line["decision"], line["reason"]) == (504, "allow", "upstream_timeout")


# --------------------------------------------------------------------------- caches


async def test_verified_tokens_are_cached_but_never_past_exp(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    authenticator = gw.app.authenticator
    calls = 0
    original = authenticator._verify

    async def counting(token: str) -> Any:
        nonlocal calls
        calls += 1
        return await original(token)

    monkeypatch.setattr(authenticator, "_verify", counting)
    token = gw.sign({"exp": int(time.time()) + 60})
    async with gw.client() as client:
        for _ in range(5):
            assert (await client.get("/orders/1", headers=bearer(token))).status_code == 200
        assert calls == 1
        now = time.time()
        monkeypatch.setattr(authenticator, "clock", lambda: now + 61)
        assert (await client.get("/orders/1", headers=bearer(token))).status_code == 200
        assert calls == 2  # verified again: the cached entry had reached exp


async def test_random_kids_do_not_become_jwks_fetches(gw: Gateway) -> None:
    keys = gw.app.jwks[ISSUER]
    before = sum(keys.fetches.values())
    async with gw.client() as client:
        for _ in range(2000):
            token = gw.sign({}, kid=secrets.token_urlsafe(8))
            response = await client.get("/orders/1", headers=bearer(token))
            assert response.status_code == 401
    assert sum(keys.fetches.values()) - before <= 1
    assert {x["reason"] for x in gw.audit_lines()} == {"key_unknown"}


async def test_a_rotated_key_is_picked_up_on_an_unknown_kid(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = gw.authserver.services
    # an emergency rotation: a new key that signs at once, before any cache could know it
    now = int(gw.authserver.clock.now)
    record = services.keyring.manager._create(services.config.servers[0], activate_at=now)
    services.keyring.reload()
    keys = gw.app.jwks[ISSUER]
    keys._last_attempt -= 60  # the minimum refetch interval has passed
    token = await gw.token()
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"] == record.kid
    async with gw.client() as client:
        assert (await client.get("/orders/1", headers=bearer(token))).status_code == 200


async def test_a_client_leaving_mid_upload_is_499_not_an_upstream_failure(
    gw: Gateway, upstream: tuple[RecordingUpstream, str]
) -> None:
    token = await gw.token("admin")
    scope = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": "/orders/1",
        "raw_path": b"/orders/1",
        "query_string": b"",
        "headers": [
            (b"host", b"api.test"),
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-length", b"1000000"),
        ],
        "client": ("198.51.100.9", 4321),
    }
    messages = [
        {"type": "http.request", "body": b"x" * 1000, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await gw.app(scope, receive, send)
    assert sent == []  # nobody to answer
    line = gw.audit_lines()[-1]
    assert (line["status"], line["decision"], line["reason"], line["bytes_in"]) == (
        499,
        "allow",
        "ok",
        1000,
    )


async def test_a_failure_inside_the_gateway_is_an_audited_500_without_a_traceback(
    gw: Gateway,
    upstream: tuple[RecordingUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    message = "-".join(["secret", "detail"])  # would a traceback's message show it?

    def broken(principal: Any, route: Any, now: float) -> None:
        raise RuntimeError(message)

    monkeypatch.setattr("gateway.app.authorize", broken)
    token = await gw.token()
    async with gw.client() as client:
        response = await client.get("/orders/1", headers=bearer(token))
    assert response.status_code == 500
    assert response.json() == {"error": "server_error", "error_description": "internal error"}
    assert "RuntimeError" not in response.text and "Traceback" not in response.text
    line = gw.audit_lines()[-1]
    assert (line["status"], line["decision"], line["reason"]) == (500, "error", "internal_error")
    assert line["route"] == "orders-read"
    assert upstream[0].seen == []
    events = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    failure = next(e for e in events if e["event"] == "gateway.internal_error")
    assert failure["error"] == "RuntimeError" and "authorize" in failure["traceback"]
    assert "secret-detail" not in json.dumps(events)  # frames only, never the message
    body, _ = gw.app.metrics.exposition()
    assert (
        b'tokengate_gateway_requests_total{code="500",decision="error",method="GET",'
        b'reason="internal_error",route="orders-read"} 1.0'
    ) in body


async def test_a_long_path_is_audited_in_one_line_below_pipe_buf(gw: Gateway) -> None:
    async with gw.client() as client:
        response = await client.get("/nothing/" + "a" * 20000)
    assert response.status_code == 404
    gw.app.audit.sink.flush()
    raw = gw.audit_path.read_bytes().splitlines()[-1]
    assert len(raw) < 4096
    line = json.loads(raw)
    assert line["path"].startswith("/nothing/aaaa") and line["path"].endswith("...[truncated]")
    assert (line["status"], line["reason"]) == (404, "no_route")


async def test_behind_a_trusted_proxy_the_client_is_the_one_it_names(make_gateway: Any) -> None:
    """The test client connects from 198.51.100.9: here, a load balancer."""
    gw: Gateway = await make_gateway(trusted_proxies=["198.51.100.0/24"])
    token = await gw.token()
    async with gw.client() as client:
        response = await client.get(
            "/orders/42",
            headers={
                **bearer(token),
                "X-Forwarded-For": "6.6.6.6, 203.0.113.50",  # the client claimed 6.6.6.6
                "X-Forwarded-Proto": "https",
                "Forwarded": "for=7.7.7.7",
            },
        )
    assert response.status_code == 200
    headers = response.json()["headers"]
    assert headers["x-forwarded-for"] == "203.0.113.50, 198.51.100.9"
    assert headers["x-forwarded-proto"] == "https"
    assert "forwarded" not in headers
    assert gw.audit_lines()[-1]["remote_addr"] == "203.0.113.50"


async def test_an_untrusted_peers_forwarding_headers_are_replaced(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway(trusted_proxies=["10.0.0.0/8"])
    async with gw.client() as client:
        response = await client.get(
            "/public/x",
            headers={"X-Forwarded-For": "10.1.1.1", "X-Forwarded-Proto": "https"},
        )
    headers = response.json()["headers"]
    assert (headers["x-forwarded-for"], headers["x-forwarded-proto"]) == ("198.51.100.9", "http")
    assert gw.audit_lines()[-1]["remote_addr"] == "198.51.100.9"


async def test_a_users_token_names_the_user_and_routes_can_require_a_group(
    make_gateway: Any, upstream: tuple[RecordingUpstream, str]
) -> None:
    """A token issued to a person: sub is the user's stable id, preferred_username the
    name people know. Group membership is a claim rule like any other."""
    team = {
        "name": "team",
        "match": {"path": "/team/**"},
        "upstream": upstream[1],
        "require": {"claims": {"groups": {"contains": "engineering"}}},
    }
    routes = gateway_section(upstream[1])["routes"]
    gw: Gateway = await make_gateway(routes=[team, *routes])
    user = {"sub": "u8Jx2mQ", "preferred_username": "alice", "client_id": "portal"}
    async with gw.client() as client:
        allowed = await client.get(
            "/team/1",
            headers={
                **bearer(gw.sign({**user, "groups": ["engineering", "admins"]})),
                "X-Auth-Username": "root",  # never the client's word
                "x_auth_username": "root",
            },
        )
        assert allowed.status_code == 200
        headers = allowed.json()["headers"]
        assert (headers["x-auth-subject"], headers["x-auth-username"]) == ("u8Jx2mQ", "alice")
        assert "x_auth_username" not in headers
        denied = await client.get("/team/1", headers=bearer(gw.sign({**user, "groups": ["sales"]})))
        assert denied.status_code == 403
        machine = await client.get("/orders/1", headers=bearer(gw.sign({})))
        assert "x-auth-username" not in machine.json()["headers"]
        # a client's own token (sub = client_id) names no user, whatever it carries
        claimed = gw.sign({"preferred_username": "alice"})
        response = await client.get(
            "/orders/1", headers={**bearer(claimed), "Remote-User": "root", "X-Remote-User": "r"}
        )
        headers = response.json()["headers"]
        assert "x-auth-username" not in headers
        assert "remote-user" not in headers and "x-remote-user" not in headers
        for bad in (" alice", "", 7, "al\nice"):
            refused = await client.get(
                "/orders/1", headers=bearer(gw.sign({"preferred_username": bad}))
            )
            assert refused.status_code == 401, bad
