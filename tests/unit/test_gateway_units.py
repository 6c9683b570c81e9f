"""Gateway policy pieces, all pure: paths, routes, claim rules, headers, config."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from gateway.authn import Principal, bearer_token
from gateway.authz import authorize, claim_satisfies
from gateway.config import ClaimRule, IssuerConfig
from gateway.errors import Denied, Reason, denial_response
from gateway.headers import RequestIds, downstream_headers, upstream_headers
from gateway.paths import BadPath, canonical_path
from gateway.routing import RouteTable, request_host
from tokengate.config import parse_config
from tokengate.yamlconf import ConfigErrors

# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (b"/", "/"),
        (b"/orders/42", "/orders/42"),
        (b"/orders//42/", "/orders/42/"),
        (b"/a/./b/../c", "/a/c"),
        (b"/a/b/..", "/a/"),
        (b"/%6Frders/%34%32", "/orders/42"),  # unreserved characters are decoded
        (b"/a/%2e%2E/b", "/b"),  # encoded dot segments are dot segments
        (b"/x%20y/caf%c3%a9", "/x%20y/caf%C3%A9"),  # the rest stays encoded, hex uppercased
        (b"/caf\xc3\xa9", "/caf%C3%A9"),
        (b"/%252e%252e/x", "/%252e%252e/x"),  # decoded once, never twice
        (b"/ADMIN", "/ADMIN"),  # case-sensitive
    ],
)
def test_canonical_paths(raw: bytes, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        b"/..",
        b"/a/../..",
        b"/%2e%2e/admin",
        b"/.%2E/admin",
        b"/public%2F..%2Fadmin",  # CVE-2021-29492 style
        b"/public%2f..%2fadmin",
        b"/public%5C..%5Cadmin",
        b"/public\\..\\admin",
        b"/public/..;/admin",  # Tomcat reads ..; as ..
        b"/admin;jsessionid=x",
        b"/admin%3Bx",
        b"/a%00b",
        b"/a\x00b",
        b"/a\rb",
        b"/a%0Ab",
        b"/a\x7fb",
        b"/%C0%AE%C0%AE/admin",  # overlong UTF-8 for ..
        b"/%c0%af",  # overlong /
        b"/%ED%A0%80",  # a UTF-16 surrogate
        b"/%ff",
        b"/a%2",
        b"/a%g0",
        b"*",
        b"admin",
    ],
)
def test_refused_paths(raw: bytes) -> None:
    with pytest.raises(BadPath):
        canonical_path(raw)


def test_path_parameters_can_be_allowed_but_never_with_dot_segments() -> None:
    assert canonical_path(b"/a;v=1/b", allow_path_parameters=True) == "/a;v=1/b"
    with pytest.raises(BadPath):
        canonical_path(b"/a/..;/b", allow_path_parameters=True)


# --------------------------------------------------------------------------- config

GATEWAY = """
gateway:
  issuers:
    - issuer: https://idp.example.com/oauth2/default
      audiences: [api://default]
  routes:
    - name: orders-read
      match: {path: /orders/**, methods: [GET, HEAD]}
      upstream: http://orders.internal:7000/api
      strip_prefix: /orders
      require:
        scopes: [orders:read]
        claims:
          tenant: acme
          groups: {contains: admins}
          email: {matches: '.*@acme\\.com'}
          region: [eu, us]
          contractor: {exists: false}
    - name: items
      match: {path: /items/*/detail, host: "*.example.com"}
      upstream: https://items.internal
      public: true
"""


def gateway(text: str = GATEWAY) -> Any:
    config = parse_config(text, {})
    assert config.gateway is not None
    return config.gateway


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, {})
    return [str(e) for e in info.value.errors]


def test_gateway_config_is_typed() -> None:
    g = gateway()
    route = g.routes[0]
    assert route.methods == {"GET", "HEAD"}
    assert route.upstream == "http://orders.internal:7000/api"
    assert route.timeout == 30 and route.forward_token is False and route.public is False
    assert [(c.claim, c.op) for c in route.require.claims] == [
        ("tenant", "equals"),
        ("groups", "contains"),
        ("email", "matches"),
        ("region", "any_of"),
        ("contractor", "exists"),
    ]
    assert g.issuers[0].algorithms == ("RS256",)
    assert g.max_token_bytes == 8192
    assert parse_config(GATEWAY, {}).warnings == ()


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "upstream: http://orders.internal:7000/api",
            "upstream: orders.internal:7000",
            "gateway.routes[0].upstream: scheme must be http or https, got 'orders.internal:7000'",
        ),
        (
            "name: items",
            "name: orders-read",
            "gateway.routes[1].name: duplicate route name 'orders-read' (also routes[0])",
        ),
        (
            "        scopes: [orders:read]",
            "        issuer: https://other.example.com\n        scopes: [orders:read]",
            "gateway.routes[0].require.issuer: no issuer 'https://other.example.com' under "
            "gateway.issuers",
        ),
        (
            "match: {path: /orders/**, methods: [GET, HEAD]}",
            "match: {path: /orders/**/x}",
            "gateway.routes[0].match.path: ** may only be the last segment",
        ),
        (
            "match: {path: /orders/**, methods: [GET, HEAD]}",
            "match: {path: /orders/../x}",
            "gateway.routes[0].match.path: segment '..' is not canonical (no empty, dot or "
            "partial-* segments)",
        ),
        (
            "methods: [GET, HEAD]",
            "methods: [GET, FETCH]",
            "gateway.routes[0].match.methods[1]: must be one of GET, HEAD, POST, PUT, PATCH, "
            "DELETE, OPTIONS, TRACE, CONNECT; got 'FETCH'",
        ),
        (
            "      audiences: [api://default]",
            "      audiences: [api://default]\n      algorithms: [HS256]",
            "gateway.issuers[0].algorithms[0]: must be one of RS256, RS384, RS512, PS256, PS384, "
            "PS512, ES256, ES384, ES512, EdDSA; got 'HS256'",
        ),
        (
            "email: {matches: '.*@acme\\.com'}",
            "email: {matches: '(['}",
            "gateway.routes[0].require.claims.email.matches: is not a valid regular expression "
            "(unterminated character set at position 1)",
        ),
        (
            "groups: {contains: admins}",
            "groups: {has: admins}",
            "gateway.routes[0].require.claims.groups: must be a value, a list of values, or one "
            "of {contains|matches|exists: ...}",
        ),
        (
            "strip_prefix: /orders",
            "strip_prefix: /items",
            "gateway.routes[0].strip_prefix: is not a prefix of match.path '/orders/**'",
        ),
        (
            "      public: true",
            "      public: true\n      require: {scopes: [x]}",
            "gateway.routes[1].require: a public route takes no token, so it cannot require one",
        ),
    ],
)
def test_gateway_problems_name_the_key_path(old: str, new: str, expected: str) -> None:
    assert old in GATEWAY
    assert expected in problems(GATEWAY.replace(old, new))


def test_routes_needing_tokens_need_an_issuer() -> None:
    text = "gateway:\n  routes:\n    - {name: a, match: {path: /a}, upstream: http://x}\n"
    assert problems(text) == ["gateway.issuers: routes need tokens but no issuer is configured"]


def test_shadowed_routes_are_warnings() -> None:
    text = GATEWAY + (
        "    - name: order-42\n"
        "      match: {path: /orders/42, methods: [GET]}\n"
        "      upstream: http://x\n"
        "    - name: order-42-post\n"
        "      match: {path: /orders/42, methods: [POST]}\n"
        "      upstream: http://x\n"
    )
    assert parse_config(text, {}).warnings == (
        "gateway.routes[2]: never matches; routes[0] (orders-read) matches everything it does",
    )


# --------------------------------------------------------------------------- routes


def test_first_match_wins_with_methods_hosts_and_segments() -> None:
    table = RouteTable(gateway().routes)
    assert table.match("GET", None, "/orders").name == "orders-read"  # type: ignore[union-attr]
    assert table.match("HEAD", None, "/orders/1/x").name == "orders-read"  # type: ignore[union-attr]
    assert table.match("POST", None, "/orders/1") is None
    assert table.match("GET", None, "/ordersx") is None
    assert table.match("GET", "a.example.com", "/items/7/detail").name == "items"  # type: ignore[union-attr]
    assert table.match("GET", "example.com", "/items/7/detail") is None
    assert table.match("GET", "a.example.com", "/items/7/8/detail") is None
    assert table.match("GET", None, "/items/7/detail") is None


def test_strip_prefix() -> None:
    route = RouteTable(gateway().routes).routes[0]
    assert route.upstream_path("/orders/42") == "/42"
    assert route.upstream_path("/orders") == "/"


@pytest.mark.parametrize(
    ("header", "host"),
    [
        (b"API.Example.com:8443", "api.example.com"),
        (b"[::1]:80", "[::1]"),
        (None, None),
        (b"admin.example.com.", "admin.example.com"),
        (b"Admin.Example.COM.:443", "admin.example.com"),
    ],
)
def test_request_host(header: bytes | None, host: str | None) -> None:
    assert request_host(header) == host


# --------------------------------------------------------------------------- authz

ISSUER = IssuerConfig(
    "https://idp.example.com/oauth2/default",
    ("api://default",),
    None,
    ("RS256",),
    30,
    False,
    30,
    3600,
    300,
    86400,
)


def principal(**claims: Any) -> Principal:
    scopes = tuple(claims.get("scope", "").split())
    aud = claims.get("aud", "api://default")
    return Principal(
        issuer=ISSUER,
        sub="svc",
        client_id="svc",
        scopes=frozenset(scopes),
        scope_list=scopes,
        audiences=(aud,),
        jti="j",
        kid="k",
        exp=2e9,
        claims=claims,
    )


GOOD = {
    "scope": "orders:read other",
    "tenant": "acme",
    "groups": ["ops", "admins"],
    "email": "a@acme.com",
    "region": "eu",
}


def test_authorize_allows_a_principal_meeting_every_rule() -> None:
    route = RouteTable(gateway().routes).routes[0]
    authorize(principal(**GOOD), route, 0.0)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"scope": "other"}, Reason.INSUFFICIENT_SCOPE),
        ({"aud": "api://other"}, Reason.AUDIENCE_MISMATCH),
        ({"tenant": "globex"}, Reason.CLAIMS_MISMATCH),
        ({"groups": ["ops"]}, Reason.CLAIMS_MISMATCH),
        ({"groups": "admins"}, Reason.CLAIMS_MISMATCH),  # contains needs an array
        ({"email": "a@acme.com.evil.io"}, Reason.CLAIMS_MISMATCH),  # full match only
        ({"region": "apac"}, Reason.CLAIMS_MISMATCH),
        ({"contractor": False}, Reason.CLAIMS_MISMATCH),  # exists: false
        ({"tenant": None}, Reason.CLAIMS_MISMATCH),
    ],
)
def test_authorize_denies(change: dict[str, Any], reason: Reason) -> None:
    route = RouteTable(gateway().routes).routes[0]
    with pytest.raises(Denied) as info:
        authorize(principal(**{**GOOD, **change}), route, 0.0)
    assert info.value.reason is reason
    if reason is Reason.INSUFFICIENT_SCOPE:
        assert info.value.scope == "orders:read"


@pytest.mark.parametrize(
    ("rule", "claims", "ok"),
    [
        (ClaimRule("n", "equals", 1), {"n": 1}, True),
        (ClaimRule("n", "equals", 1), {"n": True}, False),
        (ClaimRule("n", "equals", "1"), {"n": 1}, False),
        (
            ClaimRule("realm_access.roles", "contains", "admin"),
            {"realm_access": {"roles": ["admin"]}},
            True,
        ),
        (ClaimRule("https://x.io/role", "equals", "a"), {"https://x.io/role": "a"}, True),
        (ClaimRule("e", "matches", re.compile("a.*")), {"e": ["abc"]}, False),
        (ClaimRule("e", "exists", True), {}, False),
    ],
)
def test_claim_rules(rule: ClaimRule, claims: dict[str, Any], ok: bool) -> None:
    assert claim_satisfies(claims, rule) is ok


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([], Reason.TOKEN_MISSING),
        ([b"Basic abc"], Reason.TOKEN_MISSING),
        ([b"Bearer a.b.c", b"Bearer d.e.f"], Reason.TOKEN_INVALID),
    ],
)
def test_bearer_extraction(headers: list[bytes], reason: Reason) -> None:
    with pytest.raises(Denied) as info:
        bearer_token(headers)
    assert info.value.reason is reason


def test_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token([b"bearer abc.def.ghi"]) == b"abc.def.ghi"


def test_upstream_headers_strip_spoofable_and_hop_by_hop() -> None:
    incoming = [
        (b"host", b"api.example.com"),
        (b"authorization", b"Bearer t"),
        (b"x-auth-subject", b"admin"),
        (b"X-AUTH-SCOPES".lower(), b"everything"),
        (b"x_auth_client_id", b"spoof"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x_forwarded_host", b"evil"),
        (b"forwarded", b"for=1.2.3.4"),
        (b"x-real-ip", b"1.2.3.4"),
        (b"connection", b"keep-alive, x-private"),
        (b"x-private", b"hop"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"content-length", b"3"),
        (b"accept", b"application/json"),
        (b"x-request-id", b"abc-123"),
    ]
    out = upstream_headers(
        incoming,
        forwarded_for="198.51.100.9",
        scheme="https",
        host=b"api.example.com",
        request_id=RequestIds().pick(dict(incoming)[b"x-request-id"]),
        identity=principal(scope="orders:read").identity_headers,
        forward_token=False,
    )
    assert out == [
        (b"accept", b"application/json"),
        (b"x-request-id", b"abc-123"),
        (b"x-forwarded-for", b"198.51.100.9"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"api.example.com"),
        (b"x-auth-subject", b"svc"),
        (b"x-auth-client-id", b"svc"),
        (b"x-auth-scopes", b"orders:read"),
        (b"x-auth-issuer", b"https://idp.example.com/oauth2/default"),
    ]


@pytest.mark.parametrize(
    "name",
    [
        b"x-real-ip",
        b"x_real_ip",
        b"true-client-ip",
        b"true_client_ip",
        b"x-client-ip",
        b"cf-connecting-ip",
        b"forwarded",
        b"x-original-url",
        b"x_original_url",
        b"x-rewrite-url",
        b"x-http-method-override",
        b"x_http_method_override",
        b"x-http-method",
        b"x-method-override",
        b"x_request_id",
        b"x-forwarded-prefix",
        b"x_forwarded_for",
        b"x-auth-groups",
        b"x_auth_subject",
        b"transfer_encoding",
        b"x-forwarded",
        b"x-original-forwarded-for",
        b"x-host",
        b"x_remote_addr",
        b"x-originating-ip",
        b"x-envoy-external-address",
    ],
)
def test_headers_an_upstream_might_trust_are_never_forwarded(name: bytes) -> None:
    out = upstream_headers(
        [(b"host", b"a"), (name, b"spoofed"), (b"accept", b"*/*")],
        forwarded_for=None,
        scheme="http",
        host=b"a",
        request_id="rid",
        identity=(),
        forward_token=False,
    )
    assert b"spoofed" not in dict(out).values()
    assert (b"accept", b"*/*") in out


def test_configured_headers_are_stripped_too() -> None:
    config = gateway(
        GATEWAY.replace("  routes:", "  strip_headers: [X-Tenant-Override, x_debug]\n  routes:")
    )
    assert config.strip_headers == ("x-tenant-override", "x-debug")
    from gateway.headers import SPOOFABLE

    strip = SPOOFABLE | {n.encode() for n in config.strip_headers}
    incoming = [(b"x-tenant-override", b"1"), (b"x_tenant_override", b"2"), (b"x-debug", b"3")]
    out = upstream_headers(
        incoming,
        forwarded_for=None,
        scheme="http",
        host=None,
        request_id="rid",
        identity=(),
        forward_token=False,
        strip=strip,
    )
    assert [name for name, _ in out] == [b"x-request-id", b"x-forwarded-proto"]


def test_request_id_is_generated_when_missing_or_malformed() -> None:
    ids = RequestIds()
    first, second = ids.pick(None), ids.pick(b"bad id\xff")
    assert re.fullmatch(r"[0-9a-f]{24}", first) and re.fullmatch(r"[0-9a-f]{24}", second)
    assert first != second and first[:16] == second[:16]


def test_downstream_headers() -> None:
    raw = [
        (b"Content-Type", b"text/plain"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Set-Cookie", b"a=1"),
        (b"X-Request-Id", b"upstream-id"),
    ]
    assert downstream_headers(raw, b"rid") == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"x-request-id", b"rid"),
    ]


def test_denial_responses_follow_rfc6750() -> None:
    status, headers, body = denial_response(
        Denied(Reason.INSUFFICIENT_SCOPE, "the token lacks a required scope", scope="a b")
    )
    assert status == 403
    assert dict(headers)[b"www-authenticate"] == (
        b'Bearer realm="tokengate", error="insufficient_scope", '
        b'error_description="the token lacks a required scope", scope="a b"'
    )
    assert yaml.safe_load(body) == {
        "error": "insufficient_scope",
        "error_description": "the token lacks a required scope",
    }


def test_check_prints_shadowing_warnings_and_exits_0(tmp_path: Any) -> None:
    import subprocess
    import sys

    path = tmp_path / "shadow.yaml"
    path.write_text(
        GATEWAY + "    - name: order-42\n      match: {path: /orders/42, methods: [GET]}\n"
        "      upstream: http://x\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "tokengate", "check", "-c", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "warning: gateway.routes[2]: never matches; routes[0] (orders-read) matches everything "
        "it does",
        f"{path}: ok",
    ]
