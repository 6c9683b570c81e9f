"""Malformed input is a 400 or 401 with the standard JSON error, never an exception;
and an exception that does happen is a logged, audited 500 without a traceback."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import jwt
import pytest

from authserver.keys import b64url
from tests.asgi.test_token_endpoint import (
    BASIC_CHALLENGE,
    CC,
    CLIENT_AUTH_FAILED,
    FORM,
    GOOD_BASIC,
    assert_oauth_error,
    assert_token_response,
    post_assertion,
)
from tests.conftest import ISSUER, REPORTING_SECRET, TOKEN_URL, AuthServer

pytestmark = pytest.mark.anyio

NESTED = "[" * 1100 + "]" * 1100


def raw_jwt(header: Any, claims: Any, signature: bytes = b"sig") -> str:
    """A JWT from any JSON (or JSON-ish text), unsigned: for what is checked before the
    signature."""
    parts = [v if isinstance(v, str) else json.dumps(v) for v in (header, claims)]
    return (
        ".".join(b64url(p.encode("utf-8", "surrogatepass")) for p in parts)
        + "."
        + b64url(signature)
    )


def good_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "billing",
        "sub": "billing",
        "aud": TOKEN_URL,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return claims


def signed(key: Any, **overrides: Any) -> str:
    """Signed with the billing client's own key: for what is checked after the signature."""
    return jwt.encode(
        good_claims(**overrides), key, algorithm="ES256", headers={"kid": "billing-1"}
    )


UNSIGNED_ASSERTIONS = {
    "alg-list": ({"alg": ["ES256"], "kid": "billing-1"}, good_claims()),
    "alg-object": ({"alg": {"x": "ES256"}, "kid": "billing-1"}, good_claims()),
    "alg-number": ({"alg": 256, "kid": "billing-1"}, good_claims()),
    "alg-null": ({"alg": None, "kid": "billing-1"}, good_claims()),
    "kid-list": ({"alg": "ES256", "kid": ["billing-1"]}, good_claims()),
    "kid-object": ({"alg": "ES256", "kid": {"id": "billing-1"}}, good_claims()),
    "kid-number": ({"alg": "ES256", "kid": 1}, good_claims()),
    "header-list": (["ES256"], good_claims()),
    "iss-sub-list": ({"alg": "ES256"}, good_claims(iss=["billing"], sub=["billing"])),
    "iss-sub-object": ({"alg": "ES256"}, good_claims(iss={"a": 1}, sub={"a": 1})),
    "sub-number": ({"alg": "ES256"}, good_claims(iss=1, sub=1)),
    "claims-list": ({"alg": "ES256"}, ["billing"]),
    "claims-string": ({"alg": "ES256"}, '"billing"'),
    "header-nested": ('{"alg":' + NESTED + "}", good_claims()),
    "claims-nested": ({"alg": "ES256"}, '{"sub":' + NESTED + "}"),
    "sub-lone-surrogate": (
        {"alg": "ES256", "kid": "billing-1"},
        good_claims(iss="\ud800x", sub="\ud800x"),
    ),
    "sub-raw-lone-surrogate": ({"alg": "ES256"}, '{"iss":"\ud800x","sub":"\ud800x"}'),
    "not-utf8": ({"alg": "ES256"}, '{"sub":"\udcff"}'),
}


@pytest.mark.parametrize(
    ("header", "claims"), UNSIGNED_ASSERTIONS.values(), ids=UNSIGNED_ASSERTIONS.keys()
)
async def test_malformed_assertions_are_invalid_client(
    authserver: AuthServer, header: Any, claims: Any
) -> None:
    response = await post_assertion(authserver, raw_jwt(header, claims))
    assert_oauth_error(response, 401, "invalid_client")
    assert response.content == CLIENT_AUTH_FAILED
    line = authserver.audit_lines()[-1]
    assert (line["event"], line["reason"]) == ("token.denied", "invalid_client")
    assert line["client_id"] in (None, "billing")  # only ever a configured client
    assert line["detail"].startswith("assertion_") or line["detail"] == "unknown_client"


SIGNED_CLAIMS = {
    "exp-string": {"exp": "soon"},
    "exp-numeric-string": {"exp": str(int(time.time()) + 300)},
    "exp-object": {"exp": {"at": 1}},
    "exp-list": {"exp": [1]},
    "exp-bool": {"exp": True},
    "exp-infinity": {"exp": float("inf")},
    "exp-nan": {"exp": float("nan")},
    "exp-huge": {"exp": 10**400},
    "aud-number": {"aud": 7},
    "aud-object": {"aud": {"x": TOKEN_URL}},
    "aud-list-of-lists": {"aud": [[TOKEN_URL]]},
    "iat-string": {"iat": "now"},
    "nbf-object": {"nbf": {}},
    "jti-list": {"jti": ["a"]},
    "jti-huge": {"jti": "j" * 1000},
}


@pytest.mark.parametrize("overrides", SIGNED_CLAIMS.values(), ids=SIGNED_CLAIMS.keys())
async def test_signed_assertions_with_odd_claims_are_invalid_client(
    authserver: AuthServer, billing_key: Any, overrides: dict[str, Any]
) -> None:
    response = await post_assertion(authserver, signed(billing_key[0], **overrides))
    assert_oauth_error(response, 401, "invalid_client")
    assert response.content == CLIENT_AUTH_FAILED
    line = authserver.audit_lines()[-1]
    assert (line["client_id"], line["reason"]) == ("billing", "invalid_client")
    assert line["detail"].startswith("assertion_")


async def test_the_signed_helper_makes_a_good_assertion(
    authserver: AuthServer, billing_key: Any
) -> None:
    assert_token_response(await post_assertion(authserver, signed(billing_key[0])))


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


BAD_AUTHORIZATION = {
    "not-utf8": b"Basic " + b64(b"rep\xff:x"),
    "lone-surrogate-utf8": b"Basic " + b64(b"\xed\xa0\x80x:" + REPORTING_SECRET.encode()),
    "lone-surrogate-percent": b"Basic " + b64(b"%ED%A0%80x:" + REPORTING_SECRET.encode()),
    "bad-percent": b"Basic " + b64(b"%ff:%fe"),
    "raw-high-bytes": b"Basic \xff\xfe\xfd",
    "raw-nul": b"Basic \x00\x00",
    "only-scheme": b"Basic",
    "empty-credentials": b"Basic ",
    "empty-client-id": b"Basic " + b64(b":secret"),
    "scheme-only-spaces": b"   ",
    "latin1-scheme": b"B\xe4sic abc",
}


@pytest.mark.parametrize("value", BAD_AUTHORIZATION.values(), ids=BAD_AUTHORIZATION.keys())
async def test_malformed_basic_credentials_are_invalid_client(
    authserver: AuthServer, value: bytes
) -> None:
    async with authserver.client() as http:
        response = await http.post(
            TOKEN_URL,
            content=CC,
            headers=[(b"content-type", FORM["content-type"].encode()), (b"authorization", value)],
        )
    assert_oauth_error(response, 401, "invalid_client", BASIC_CHALLENGE)
    assert response.content == CLIENT_AUTH_FAILED
    assert authserver.audit_lines()[-1]["client_id"] is None


BAD_BODIES = {
    "nul-and-high-bytes": (b"\x00\xff\xfe", "invalid_request"),
    "latin1": (CC + b"&scope=caf\xe9", "invalid_request"),
    "lone-surrogate": (CC + b"&scope=%ED%A0%80", "invalid_request"),
    "overlong-utf8": (CC + b"&scope=%C0%AF", "invalid_request"),
    "bad-percent-utf8": (b"grant_type=%ff", "invalid_request"),
    "only-separators": (b"&&&===&&&", "invalid_request"),
    "repeated-unknown": (b"\x01=1&\x01=2", "invalid_request"),
    "utf8-bom": (b"\xef\xbb\xbfgrant_type=client_credentials", "invalid_request"),
    "nul-grant-type": (b"grant_type=%00", "unsupported_grant_type"),
    "percent-scope": (CC + b"&scope=%", "invalid_scope"),  # "%" is a valid scope token
    "nul-scope": (CC + b"&scope=%00", "invalid_request"),
}


@pytest.mark.parametrize(("body", "error"), BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_malformed_form_bodies_are_400(
    authserver: AuthServer, body: bytes, error: str
) -> None:
    async with authserver.client() as http:
        response = await http.post(TOKEN_URL, content=body, headers=GOOD_BASIC)
    assert_oauth_error(response, 400, error)
    assert len(response.json()["error_description"]) < 100


@pytest.mark.parametrize(
    "token",
    [
        raw_jwt('{"alg":' + NESTED + "}", {}),
        raw_jwt({"alg": "RS256", "typ": "at+jwt", "kid": "k"}, '{"a":' + NESTED + "}"),
        raw_jwt({"alg": "RS256", "kid": {"a": 1}}, {}),
        raw_jwt({"alg": "RS256"}, '{"sub":"\ud800"}'),
        "\x00.\x00.\x00",
    ],
    ids=["header-nested", "claims-nested", "kid-object", "lone-surrogate", "nul"],
)
async def test_malformed_tokens_at_introspection_and_revocation(
    authserver: AuthServer, token: str
) -> None:
    async with authserver.client() as http:
        introspected = await http.post(
            f"{ISSUER}/v1/introspect", data={"token": token}, auth=("reporting", REPORTING_SECRET)
        )
        revoked = await http.post(
            f"{ISSUER}/v1/revoke", data={"token": token}, auth=("reporting", REPORTING_SECRET)
        )
    assert introspected.status_code == 200
    assert introspected.json() == {"active": False}
    assert revoked.status_code == 200


# --------------------------------------------------------------------------- the safety net


def boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(f"bug while handling {REPORTING_SECRET}")


def internal_errors(stderr: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in events if e["event"] == "authserver.internal_error"]


@pytest.mark.parametrize(
    ("path", "target", "event"),
    [
        ("token", "authserver.endpoints.access_token_claims", "token.denied"),
        ("introspect", "verifier.verify", "token.introspected"),
        ("revoke", "verifier.verify", "token.revoked"),
    ],
)
async def test_an_unexpected_exception_is_a_logged_audited_500(
    authserver: AuthServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    path: str,
    target: str,
    event: str,
) -> None:
    if target.startswith("authserver."):
        monkeypatch.setattr(target, boom)
    else:
        monkeypatch.setattr(authserver.services.endpoints.verifier, "verify", boom)
    capsys.readouterr()
    async with authserver.client() as http:
        response = await http.post(
            f"{ISSUER}/v1/{path}",
            data={"grant_type": "client_credentials", "token": "a.b.c"},
            auth=("reporting", REPORTING_SECRET),
        )
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.content == b'{"error":"server_error","error_description":"internal error"}'
    stderr = capsys.readouterr().err
    [logged] = internal_errors(stderr)
    assert logged["server"] == "default"
    assert logged["path"] == f"/oauth2/default/v1/{path}"
    assert logged["error"] == "RuntimeError"
    assert logged["traceback"].startswith("Traceback (most recent call last):\n")
    assert "in boom" in logged["traceback"]
    assert logged["traceback"].endswith("RuntimeError")
    assert REPORTING_SECRET not in stderr  # the exception's message is never logged
    line = authserver.audit_lines()[-1]
    assert (line["event"], line["outcome"], line["reason"]) == (event, "error", "internal_error")
    registry = authserver.services.metrics.registry
    assert registry is not None
    errors = registry.get_sample_value(
        "tokengate_authserver_token_errors_total", {"server": "default", "error": "server_error"}
    )
    assert errors == (1 if path == "token" else 0)
    counted = {
        name: registry.get_sample_value(
            f"tokengate_authserver_{name}_total", {"server": "default", "outcome": "error"}
        )
        for name in ("introspections", "revocations")
    }
    assert counted == {
        "introspections": 1 if path == "introspect" else 0,
        "revocations": 1 if path == "revoke" else 0,
    }


async def test_a_failure_after_the_response_started_is_not_answered_twice(
    authserver: AuthServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def half_sent(send: Any, status: int, body: bytes, headers: Any = ()) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        raise RuntimeError("the body could not be sent")

    monkeypatch.setattr("authserver.endpoints.send_bytes", half_sent)
    async with authserver.client() as http:
        with pytest.raises(RuntimeError):  # re-raised: the server ends the connection
            await http.post(
                TOKEN_URL,
                data={"grant_type": "client_credentials"},
                auth=("reporting", REPORTING_SECRET),
            )
    assert len(internal_errors(capsys.readouterr().err)) == 1
    assert authserver.audit_lines()[-1]["reason"] == "internal_error"


async def test_the_keys_endpoint_is_covered_too(
    authserver: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(authserver.services.endpoints.keyring, "current", boom)
    async with authserver.client() as http:
        response = await http.get(f"{ISSUER}/v1/keys")
    assert response.status_code == 500
    assert response.json() == {"error": "server_error", "error_description": "internal error"}
    assert authserver.audit_lines() == []  # no audit event for public documents
