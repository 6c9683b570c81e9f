"""The demo portal's pure parts: sealed cookies, PKCE, ID-token checks, the discovery
document's use, what a session keeps, and the portal's config section."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tokengate.config import parse_config
from tokengate.portal.api import StepUp, step_up_of
from tokengate.portal.cookies import (
    MAX_COOKIE,
    CookieTooLarge,
    Sealer,
    cookie_name,
    read_cookies,
    set_cookie,
)
from tokengate.portal.idtoken import (
    Expected,
    IdTokenError,
    UnknownKey,
    accepted_algorithms,
    at_hash,
    validate_id_token,
)
from tokengate.portal.issuer import IssuerUnavailable, Metadata, TokenResponse, basic_auth
from tokengate.portal.state import (
    PendingLogin,
    Profile,
    Session,
    Tokens,
    new_verifier,
    pkce_challenge,
)
from tokengate.yamlconf import ConfigErrors, Listen

ISSUER = "http://auth.test/oauth2/default"
NOW = 1_800_000_000.0

# --------------------------------------------------------------------------- cookies


def test_a_sealed_value_opens_with_the_same_secret_and_name() -> None:
    sealer = Sealer("s" * 40)
    value = sealer.seal("portal_session", {"a": 1, "b": ["plain-text"]}, NOW + 60)
    assert Sealer("s" * 40).open("portal_session", value, NOW) == {"a": 1, "b": ["plain-text"]}
    assert b"plain-text" not in base64.urlsafe_b64decode(value + "==")  # not readable
    assert sealer.seal("portal_session", {"a": 1}, NOW + 60) != sealer.seal(
        "portal_session", {"a": 1}, NOW + 60
    )  # a fresh nonce each time


def test_a_sealed_value_is_refused_altered_renamed_rekeyed_or_expired() -> None:
    sealer = Sealer("s" * 40)
    value = sealer.seal("portal_session", {"a": 1}, NOW + 60)
    flipped = value[:20] + ("A" if value[20] != "A" else "B") + value[21:]
    assert sealer.open("portal_session", flipped, NOW) is None
    assert sealer.open("portal_session", value[:-2], NOW) is None
    assert sealer.open("portal_login", value, NOW) is None  # another cookie's
    assert Sealer("t" * 40).open("portal_session", value, NOW) is None  # another secret
    assert sealer.open("portal_session", value, NOW + 60) is None  # expired
    assert sealer.open("portal_session", value, NOW + 59) == {"a": 1}
    for junk in ("", "!!!", "a", "A" * 5000, None):
        assert sealer.open("portal_session", junk, NOW) is None


def test_a_value_too_large_for_a_cookie_is_refused_when_sealed() -> None:
    sealer = Sealer("s" * 40)
    with pytest.raises(CookieTooLarge, match="portal_session would be"):
        sealer.seal("portal_session", {"t": "x" * 3100}, NOW + 60)
    fits = sealer.seal("portal_session", {"t": "x" * 2900}, NOW + 60)
    assert len("portal_session=" + fits) <= MAX_COOKIE


def test_cookie_headers() -> None:
    assert set_cookie("portal_login", "v", secure=False, max_age=600) == (
        b"portal_login=v; Path=/; HttpOnly; SameSite=Lax; Max-Age=600"
    )
    assert set_cookie(cookie_name("portal_session", True), "v", secure=True) == (
        b"__Host-portal_session=v; Path=/; HttpOnly; SameSite=Lax; Secure"
    )
    assert cookie_name("portal_session", False) == "portal_session"
    headers = [(b"cookie", b"a=1; portal_session=x=y; a=2"), (b"cookie", b"b=3"), (b"x", b"c=4")]
    assert read_cookies(headers) == {"a": "1", "portal_session": "x=y", "b": "3"}


# --------------------------------------------------------------------------- PKCE, state


def test_pkce_s256_is_rfc_7636s_example() -> None:
    # RFC 7636 appendix B
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    fresh = {new_verifier() for _ in range(20)}
    assert len(fresh) == 20
    assert all(len(v) == 43 and v.replace("-", "").replace("_", "").isalnum() for v in fresh)


def test_a_pending_login_is_fresh_each_time_and_round_trips() -> None:
    one, two = PendingLogin.new(), PendingLogin.new()
    assert len({one.state, one.nonce, one.verifier, two.state, two.nonce, two.verifier}) == 6
    assert PendingLogin.load(one.dump()) == one


def test_profile_takes_userinfo_over_the_id_token() -> None:
    claims = {"sub": "u1", "name": "Alice", "email": "old@example.com", "aud": "portal"}
    info = {"sub": "u1", "email": "alice@example.com", "groups": ["eng", 3, "ops"]}
    profile = Profile.from_claims(claims, info)
    assert profile == Profile(
        sub="u1",
        name="Alice",
        email="alice@example.com",
        username=None,
        groups=("eng", "ops"),
        sources=("ID token", "userinfo"),
    )
    assert Profile.from_claims(claims, {}).sources == ("ID token",)


def test_a_real_sized_session_fits_in_one_cookie() -> None:
    """Tokens as tokengate issues them with RS256 (2048-bit keys), a profile, groups."""
    signature = "s" * 342  # a 2048-bit RSA signature, base64url
    access = "h" * 100 + "." + "c" * 560 + "." + signature
    id_token = "h" * 100 + "." + "c" * 600 + "." + signature
    profile = Profile("0" * 26, "Alice Doe", "alice@example.com", "alice", ("engineering",))
    session = Session(
        Tokens(access, int(NOW) + 3600, "r" * 43, id_token), profile, "c" * 43, int(NOW)
    )
    value = Sealer("s" * 40).seal("portal_session", session.dump(), NOW + 60)
    assert len("portal_session=" + value) < MAX_COOKIE
    opened = Sealer("s" * 40).open("portal_session", value, NOW)
    assert opened is not None and Session.load(opened) == session


# --------------------------------------------------------------------------- ID tokens


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: Any, kid: str, alg: str | None, family: str | None = None) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(family or alg or "RS256")
    jwk = json.loads(algorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, use="sig")
    if alg is not None:
        jwk["alg"] = alg
    return jwk


def claims(**changes: Any) -> dict[str, Any]:
    base = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": "portal",
        "exp": int(NOW) + 3600,
        "iat": int(NOW),
        "nonce": "n-1",
        "at_hash": at_hash("access-token", "RS256"),
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


EXPECTED = Expected(ISSUER, "portal", ("RS256",), "n-1")


def sign(key: Any, payload: dict[str, Any], alg: str = "RS256", **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": "k1", **headers})


def check(token: str, keys: dict[str, Any], expected: Expected = EXPECTED, **kw: Any) -> Any:
    kw.setdefault("access_token", "access-token")
    return validate_id_token(token, keys, expected, now=NOW, **kw)


def test_a_good_id_token_passes(rsa_key: rsa.RSAPrivateKey) -> None:
    keys = {"k1": public_jwk(rsa_key, "k1", "RS256")}
    assert check(sign(rsa_key, claims()), keys) == claims()
    assert check(sign(rsa_key, claims(at_hash=None)), keys)["sub"] == "user-1"  # optional
    refreshed = sign(rsa_key, claims(nonce=None))  # on refresh no nonce is expected
    assert check(refreshed, keys, Expected(ISSUER, "portal", ("RS256",), None))["sub"]
    aud_list = sign(rsa_key, claims(aud=["portal", "api"], azp="portal"))
    assert check(aud_list, keys)["azp"] == "portal"


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (claims(iss="http://evil.test/oauth2/default"), "Invalid issuer"),
        (claims(aud="other-client"), "Audience doesn't match"),
        (claims(nonce="n-2"), "nonce is not the one sent"),
        (claims(nonce=None), "nonce is not the one sent"),
        (claims(exp=int(NOW) - 31), "expired"),
        (claims(iat=int(NOW) + 120), "issued in the future"),
        (claims(nbf=int(NOW) + 120), "not valid yet"),
        (claims(at_hash=at_hash("another-token", "RS256")), "at_hash does not match"),
        (claims(sub=None), 'Token is missing the "sub" claim'),
        (claims(exp=None), 'Token is missing the "exp" claim'),
        (claims(aud=["portal", "api"]), "several audiences and no azp"),
        (claims(azp="other-client"), "azp is another client"),
    ],
)
def test_a_wrong_id_token_is_refused(
    rsa_key: rsa.RSAPrivateKey, payload: dict[str, Any], problem: str
) -> None:
    keys = {"k1": public_jwk(rsa_key, "k1", "RS256")}
    with pytest.raises(IdTokenError, match=problem):
        check(sign(rsa_key, payload), keys)


def test_an_expired_token_within_the_leeway_passes(rsa_key: rsa.RSAPrivateKey) -> None:
    keys = {"k1": public_jwk(rsa_key, "k1", "RS256")}
    assert check(sign(rsa_key, claims(exp=int(NOW) - 29)), keys)["sub"] == "user-1"


def test_unsigned_and_confused_algorithms_are_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    jwk = public_jwk(rsa_key, "k1", "RS256")
    keys = {"k1": jwk}
    unsigned = jwt.encode(claims(), None, algorithm="none", headers={"kid": "k1"})
    with pytest.raises(IdTokenError, match="signed with 'none'"):
        check(unsigned, keys)
    # HS256 with the public key as the HMAC secret: the classic confusion
    pem = rsa_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","kid":"k1"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    mac = hmac.new(pem, header + b"." + body, hashlib.sha256).digest()
    confused = b".".join([header, body, base64.urlsafe_b64encode(mac).rstrip(b"=")]).decode()
    with pytest.raises(IdTokenError, match="signed with 'HS256'"):
        check(confused, keys)
    # an algorithm this portal accepts, but the issuer does not advertise for ID tokens
    with pytest.raises(IdTokenError, match="signed with 'RS256'; accepted: ES256"):
        check(sign(rsa_key, claims()), keys, Expected(ISSUER, "portal", ("ES256",), "n-1"))


def test_a_token_that_does_not_fit_its_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(IdTokenError, match="its key is for 'PS256'"):
        check(sign(rsa_key, claims()), {"k1": public_jwk(rsa_key, "k1", "PS256")})
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(IdTokenError, match="Signature verification failed"):
        check(sign(other, claims()), {"k1": public_jwk(rsa_key, "k1", "RS256")})
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(IdTokenError):  # an EC key for an RS256 token
        check(sign(rsa_key, claims()), {"k1": public_jwk(ec_key, "k1", None, "ES256")})


def test_an_access_token_is_not_an_id_token(rsa_key: rsa.RSAPrivateKey) -> None:
    keys = {"k1": public_jwk(rsa_key, "k1", "RS256")}
    with pytest.raises(IdTokenError, match="an access token"):
        check(sign(rsa_key, claims(), typ="at+jwt"), keys)


def test_an_unknown_kid_says_so(rsa_key: rsa.RSAPrivateKey) -> None:
    keys = {"k1": public_jwk(rsa_key, "k1", "RS256")}
    with pytest.raises(UnknownKey):
        check(sign(rsa_key, claims(), kid="k2"), keys)
    with pytest.raises(IdTokenError, match="not a signed JWT"):
        check("not.a.jwt", keys)


@pytest.mark.parametrize(
    ("alg", "key"),
    [
        ("PS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate),
    ],
)
def test_every_accepted_algorithm(alg: str, key: Any) -> None:
    private = key()
    payload = claims(at_hash=at_hash("access-token", alg))
    token = sign(private, payload, alg)
    keys = {"k1": public_jwk(private, "k1", alg)}
    assert check(token, keys, Expected(ISSUER, "portal", (alg,), "n-1")) == payload


def test_accepted_algorithms_are_the_advertised_ones_the_portal_knows() -> None:
    assert accepted_algorithms(["HS256", "ES256", "RS256", "none"]) == ("RS256", "ES256")
    assert accepted_algorithms(["HS256"]) == ()
    assert accepted_algorithms("RS256") == ()


# --------------------------------------------------------------------------- issuer documents


def discovery(**changes: Any) -> dict[str, Any]:
    document = {
        "issuer": ISSUER,
        "authorization_endpoint": f"{ISSUER}/v1/authorize",
        "token_endpoint": f"{ISSUER}/v1/token",
        "jwks_uri": f"{ISSUER}/v1/keys",
        "id_token_signing_alg_values_supported": ["RS256"],
        "authorization_response_iss_parameter_supported": True,
    }
    document.update(changes)
    return {k: v for k, v in document.items() if v is not None}


def test_the_discovery_document_is_checked() -> None:
    metadata = Metadata.parse(discovery(), ISSUER)
    assert metadata.token_endpoint == f"{ISSUER}/v1/token"
    assert metadata.userinfo_endpoint is None and metadata.iss_parameter is True
    for document, problem in [
        (discovery(issuer="http://evil.test"), "issuer is 'http://evil.test'"),
        (discovery(id_token_signing_alg_values_supported=["HS256"]), "no ID token algorithm"),
        (discovery(token_endpoint=None), "token_endpoint is not an http"),
        (discovery(jwks_uri="file:///etc/passwd"), "jwks_uri is not an http"),
        (discovery(userinfo_endpoint=7), "userinfo_endpoint is not an http"),
        ([], "not a JSON object"),
    ]:
        with pytest.raises(IssuerUnavailable, match=problem):
            Metadata.parse(document, ISSUER)


def test_token_responses_are_checked() -> None:
    answer = {"access_token": "a", "token_type": "bearer", "expires_in": 60, "id_token": "i"}
    assert TokenResponse.parse(answer) == TokenResponse("a", 60, None, "i")
    for bad in ({**answer, "token_type": "DPoP"}, {**answer, "access_token": ""}, "x"):
        with pytest.raises(IssuerUnavailable):
            TokenResponse.parse(bad)
    assert TokenResponse.parse({**answer, "expires_in": True}).expires_in is None


def test_client_secret_basic_form_encodes_first() -> None:
    """RFC 6749 section 2.3.1: a ':' in the secret cannot end the client_id."""
    header = basic_auth("portal", "a:b c")
    assert base64.b64decode(header.removeprefix("Basic ")) == b"portal:a%3Ab%20c"


# --------------------------------------------------------------------------- config


PORTAL = """
portal:
  listen: 127.0.0.1:7100
  issuer: http://127.0.0.1:9000/oauth2/default
  client_id: portal
  client_secret: ${PORTAL_SECRET}
  api_url: http://127.0.0.1:8080/orders/42
"""


def test_the_portal_section() -> None:
    config = parse_config(PORTAL, {"PORTAL_SECRET": "from-the-environment"})
    portal = config.portal
    assert portal is not None
    assert portal.listen == Listen("127.0.0.1", 7100)
    assert portal.client_secret == "from-the-environment"
    assert "from-the-environment" not in repr(portal)
    assert portal.public_url == "http://127.0.0.1:7100"
    assert portal.redirect_uri == "http://127.0.0.1:7100/callback"
    assert portal.post_logout_redirect_uri == "http://127.0.0.1:7100/"
    assert portal.scopes == ("openid", "profile", "email", "offline_access", "orders:read")
    auth0 = parse_config(
        PORTAL.replace("http://127.0.0.1:9000/oauth2/default", "https://a.test/"),
        {"PORTAL_SECRET": "x"},
    )
    assert auth0.portal is not None and auth0.portal.issuer == "https://a.test/"  # kept exactly


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("listen: 127.0.0.1:7100", "listen: nowhere"), "portal.listen: must be host:port"),
        (("issuer: http:", "issuer: ftp:"), "portal.issuer: scheme must be http or https"),
        (("  client_id: portal\n", ""), "portal.client_id: is required"),
        (("${PORTAL_SECRET}", "${UNSET}"), "portal.client_secret: environment variable UNSET"),
        (("api_url: http://127.0.0.1:8080", "api_url: 127.0.0.1:8080"), "portal.api_url: scheme"),
        (("listen:", "scopes: [profile]\n  listen:"), "portal.scopes: must include openid"),
        (("listen:", "scopes: [openid, 'a b']\n  listen:"), "portal.scopes[1]: is not a valid"),
        (("listen:", "public_url: portal\n  listen:"), "portal.public_url: scheme"),
        (("listen:", "lisen: x\n  listen:"), "portal.lisen: unknown key (did you mean 'listen'?)"),
    ],
)
def test_portal_config_errors_name_the_key(change: tuple[str, str], problem: str) -> None:
    with pytest.raises(ConfigErrors) as caught:
        parse_config(PORTAL.replace(*change), {"PORTAL_SECRET": "x"})
    assert any(line.startswith(problem) for line in str(caught.value).splitlines()), str(
        caught.value
    )


def test_a_portal_listen_shared_with_the_echo_is_refused() -> None:
    text = PORTAL + "echo: {listen: 127.0.0.1:7100}\n"
    with pytest.raises(ConfigErrors) as caught:
        parse_config(text, {"PORTAL_SECRET": "x"})
    assert str(caught.value) == "portal.listen: 127.0.0.1:7100 is also echo.listen"


def test_the_portal_uses_nothing_of_the_authorization_server_or_the_gateway() -> None:
    code = (
        "import sys, tokengate.portal.app; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'authserver', 'gateway'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("challenge", "expected"),
    [
        (
            'Bearer realm="tokengate", error="insufficient_user_authentication", '
            'error_description="a \\"stronger\\" sign-in, please", '
            'acr_values="urn:a urn:b", max_age="600"',
            StepUp(("urn:a", "urn:b"), 600),
        ),
        ("Bearer error=insufficient_user_authentication, max_age=0", StepUp((), 0)),
        ('bearer error="insufficient_user_authentication", acr_values="x"', StepUp(("x",), None)),
        # the first of a repeated parameter counts
        (
            'Bearer error="insufficient_user_authentication", acr_values="a", acr_values="b"',
            StepUp(("a",), None),
        ),
        # odd values are left out; with nothing left, no step-up
        ('Bearer error="insufficient_user_authentication", acr_values="a\\"b", max_age="-1"', None),
        ('Bearer error="insufficient_user_authentication", max_age="1e9"', None),
        ('Bearer error="insufficient_user_authentication", max_age="9999999999"', None),
        ('Bearer error="insufficient_user_authentication"', None),
        ('Bearer error="invalid_token", acr_values="a"', None),
        ('Basic realm="x", error="insufficient_user_authentication", acr_values="a"', None),
        ("", None),
        (None, None),
        ('Bearer error="insufficient_user_authentication", acr_values="' + "a" * 5000 + '"', None),
        ('Bearer ,,,=,"",error', None),
    ],
)
def test_a_step_up_challenge_is_read_and_nothing_odd_passes(
    challenge: str | None, expected: StepUp | None
) -> None:
    assert step_up_of(challenge) == expected
