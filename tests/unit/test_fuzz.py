"""Property tests over the parsers that take bytes from the network: whatever arrives,
they answer with their own refusal, never with an unexpected exception."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from authserver.errors import OAuthError
from authserver.forms import parse_form
from gateway.audit import NO_IDENTITY, identity_fields, request_line
from gateway.authn import Authenticator, bearer_token
from gateway.errors import Denied
from gateway.paths import BadPath, canonical_path
from tokengate.config import parse_config
from tokengate.jsonlog import MAX_LINE, fit_line
from tokengate.jwk import PublicKey

ISSUER = "https://idp.example.com/oauth2/default"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
CLAIM_NAMES = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "client_id", "cid", "scope", "scp"]


# --------------------------------------------------------------------------- paths


@FUZZ
@given(st.binary(max_size=200))
@example(b"/%2e%2e/admin")
@example(b"/a/%c0%ae%c0%ae/b")
@example(b"/\xed\xa0\x80")
def test_the_path_canonicalizer_answers_a_path_or_bad_path(raw: bytes) -> None:
    _check_path(raw)


@FUZZ
@given(st.text(alphabet="/.%2eEfF5cC;\\aA\x00", max_size=40))
def test_the_path_canonicalizer_on_dot_and_escape_soup(text: str) -> None:
    _check_path(text.encode())


def _check_path(raw: bytes) -> None:
    try:
        path = canonical_path(raw)
    except BadPath:
        return
    assert path.startswith("/")
    assert "/../" not in path + "/" and "/./" not in path + "/" and "//" not in path
    assert canonical_path(path.encode("utf-8")) == path  # the canonical form is a fixed point


# --------------------------------------------------------------------------- forms


@FUZZ
@given(st.binary(max_size=300))
@example(b"scope=a&scope=b")
@example(b"a=%ED%A0%80")
@example(b"%=%&&=")
def test_the_form_parser_answers_a_form_or_an_oauth_error(body: bytes) -> None:
    try:
        form = parse_form(body)
    except OAuthError as exc:
        assert exc.error == "invalid_request" and exc.status == 400
        return
    for name in ("grant_type", "scope", "client_id"):
        value = form.get(name)
        assert value is None or isinstance(value, str)


# --------------------------------------------------------------------------- tokens


class _Keys:
    """One issuer's keys as the authenticator asks for them: a single Ed25519 key."""

    def __init__(self, key: PublicKey) -> None:
        self._key = key

    async def key(self, kid: str | None) -> PublicKey:
        return self._key

    def has(self, kid: str | None) -> bool:
        return True


class _Jwks:
    def __init__(self, key: PublicKey) -> None:
        self.keys = _Keys(key)

    def __getitem__(self, issuer: str) -> _Keys:
        return self.keys


_PRIVATE = ed25519.Ed25519PrivateKey.generate()
_CONFIG = parse_config(
    f"""
gateway:
  issuers:
    - issuer: {ISSUER}
      audiences: [api://default]
      algorithms: [EdDSA]
  routes:
    - {{name: r, match: {{path: /r}}, upstream: http://127.0.0.1:1}}
""",
    {},
).gateway
assert _CONFIG is not None


def _authenticator() -> Authenticator:
    key = PublicKey("k1", _PRIVATE.public_key(), frozenset({"EdDSA"}))
    return Authenticator(_CONFIG, _Jwks(key))  # type: ignore[arg-type]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _authenticate(token: bytes) -> None:
    try:
        principal = asyncio.run(_authenticator().authenticate(token))
    except Denied:
        return
    # what was accepted can be forwarded and audited as it is
    for _, value in principal.identity_headers:
        assert b"\r" not in value and b"\n" not in value and b"\x00" not in value
    json.loads("{" + principal.audit_identity + "}")


@FUZZ
@given(st.binary(max_size=400))
@example(b"a.b.c")
@example(b"eyJhbGciOiJFZERTQSJ9.e30.")
def test_the_token_parser_on_arbitrary_bytes(token: bytes) -> None:
    _authenticate(token)


@FUZZ
@given(
    header=st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit"]), json_values, max_size=4),
    claims=st.dictionaries(
        st.sampled_from(CLAIM_NAMES) | st.text(max_size=6), json_values, max_size=8
    ),
)
def test_the_token_parser_on_signed_tokens_with_arbitrary_json(
    header: dict[str, Any], claims: dict[str, Any]
) -> None:
    """Validly signed by the trusted key, so every claim check is reached."""
    header = {"alg": "EdDSA", "typ": "at+jwt", **header}
    head = _b64(json.dumps(header).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _PRIVATE.sign(f"{head}.{body}".encode())
    _authenticate(f"{head}.{body}.{_b64(signature)}".encode())


@FUZZ
@given(
    sub=json_values,
    client_id=json_values,
    scope=json_values,
    scp=json_values,
    aud=json_values,
)
def test_the_token_parser_on_valid_tokens_with_arbitrary_identity_claims(
    sub: Any, client_id: Any, scope: Any, scp: Any, aud: Any
) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "exp": now + 60, "sub": sub, "client_id": client_id}
    claims.update(scope=scope, scp=scp, aud=aud)
    token = jwt.encode(claims, _PRIVATE, algorithm="EdDSA", headers={"typ": "at+jwt"})
    _authenticate(token.encode())


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=3))
def test_the_bearer_scheme_parser(values: list[bytes]) -> None:
    with contextlib.suppress(Denied):
        bearer_token(values)


# --------------------------------------------------------------------------- audit lines


@FUZZ
@given(
    path=st.text(max_size=6000),
    method=st.text(max_size=20),
    scopes=st.lists(st.text(max_size=300), max_size=30),
)
def test_every_audit_line_is_one_json_object_below_pipe_buf(
    path: str, method: str, scopes: list[str]
) -> None:
    identity = (
        identity_fields("client", "subject", ISSUER, "jti", scopes) if scopes else NO_IDENTITY
    )
    line = request_line(
        ts="2026-12-04T00:00:00.000Z",
        request_id="rid",
        route='"r"',
        method=method,
        path=path,
        status=200,
        decision="allow",
        reason="ok",
        identity=identity,
        remote_addr="127.0.0.1",
        duration_ms=1.5,
        bytes_in=0,
        bytes_out=0,
    )
    assert len(line) <= MAX_LINE and line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert record["event"] == "gateway.request" and record["status"] == 200


@FUZZ
@given(st.dictionaries(st.text(max_size=10), json_values | st.text(max_size=5000), max_size=12))
def test_fit_line_always_fits(fields: dict[str, Any]) -> None:
    line = fit_line(fields)
    assert len(line) <= MAX_LINE
    assert isinstance(json.loads(line), dict)
