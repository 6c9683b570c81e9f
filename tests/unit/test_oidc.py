"""Tokens for a signed-in user: the access token's user claims, the ID token's claims,
at_hash, and ID tokens that verify with PyJWT and Authlib's OIDC validator."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import jwt
import pytest
from authlib.oidc.core import CodeIDToken
from authlib.oidc.core.util import create_half_hash
from joserfc.errors import InvalidClaimError

from authserver.config import ClientConfig, ServerConfig, UserClaim
from authserver.keys import SigningKey, generate_private_key, public_members, thumbprint
from authserver.oidc import (
    CLAIMS_SUPPORTED,
    SignIn,
    at_hash,
    id_token_claims,
    user_access_token_claims,
    user_claim_values,
)
from authserver.users import User

NOW = 1_800_000_000
ISSUER = "https://id.example.com/oauth2/default"
ALICE = User(
    id="uAbC123",
    username="alice",
    profile=MappingProxyType(
        {
            "email": "alice@example.com",
            "email_verified": True,
            "name": "Alice Doe",
            "given_name": "Alice",
            "family_name": "Doe",
            "department": "finance",  # a custom key: in no scope's claims
        }
    ),
    groups=("admins",),
    disabled=False,
    source="config",
    created_at=NOW - 1000,
    updated_at=NOW - 500,
)
SIGN_IN = SignIn(user=ALICE, auth_time=NOW - 30, session_id="sid-abc")


def server(alg: str = "RS256") -> ServerConfig:
    return ServerConfig("default", ISSUER, "api://default", alg, 600, ("orders:read",), 300)  # type: ignore[arg-type]


def client() -> ClientConfig:
    return ClientConfig(
        client_id="portal",
        auth_methods=frozenset({"client_secret_basic"}),
        secret_digest=b"x" * 32,
        jwks=(),
        jwks_uri=None,
        grant_types=frozenset({"client_credentials"}),
        scopes=None,
        servers=frozenset({"default"}),
        claims=MappingProxyType({"tenant": "acme"}),
    )


def test_the_access_token_speaks_for_the_user_by_id() -> None:
    claims = user_access_token_claims(
        server(), client(), SIGN_IN, ("openid", "orders:read"), NOW, "jti-1"
    )
    assert claims == {
        "tenant": "acme",
        "iss": ISSUER,
        "sub": "uAbC123",  # never the username
        "aud": "api://default",
        "exp": NOW + 600,
        "iat": NOW,
        "jti": "jti-1",
        "client_id": "portal",
        "scope": "openid orders:read",
        "auth_time": NOW - 30,
        "amr": ["pwd"],
        "acr": "urn:tokengate:loa:1fa",
        "preferred_username": "alice",
    }


def test_an_id_token_with_openid_only_names_no_one_beyond_sub() -> None:
    claims = id_token_claims(server(), "portal", SIGN_IN, ("openid",), None, NOW, "at")
    assert claims == {
        "iss": ISSUER,
        "sub": "uAbC123",
        "aud": "portal",
        "exp": NOW + 300,  # id_token_ttl, not the access token's
        "iat": NOW,
        "auth_time": NOW - 30,
        "amr": ["pwd"],
        "acr": "urn:tokengate:loa:1fa",
        "sid": "sid-abc",
        "at_hash": at_hash("at", "RS256"),
    }


def test_profile_and_email_add_their_claims_and_nothing_else() -> None:
    claims = id_token_claims(
        server(), "portal", SIGN_IN, ("openid", "profile", "email"), "n-1", NOW, "at"
    )
    assert claims["nonce"] == "n-1"
    assert {k: claims[k] for k in ("name", "given_name", "family_name")} == {
        "name": "Alice Doe",
        "given_name": "Alice",
        "family_name": "Doe",
    }
    assert claims["preferred_username"] == "alice"
    assert claims["updated_at"] == NOW - 500
    assert (claims["email"], claims["email_verified"]) == ("alice@example.com", True)
    assert "department" not in claims and "groups" not in claims
    only_email = id_token_claims(server(), "portal", SIGN_IN, ("openid", "email"), None, NOW, "t")
    assert "name" not in only_email and "preferred_username" not in only_email
    assert only_email["email"] == "alice@example.com"
    assert "nonce" not in only_email
    assert set(claims) <= set(CLAIMS_SUPPORTED)


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_id_tokens_verify_and_pass_authlibs_oidc_checks(alg: str) -> None:
    private_key = generate_private_key(alg)
    key = SigningKey.load(thumbprint(public_members(private_key)), alg, private_key)
    access_token = key.sign({"sub": "uAbC123"})
    claims = id_token_claims(
        server(alg), "portal", SIGN_IN, ("openid", "profile"), "n-1", NOW, access_token
    )
    token = key.sign_id_token(claims)
    assert jwt.get_unverified_header(token)["typ"] == "JWT"  # never at+jwt
    assert jwt.get_unverified_header(access_token)["typ"] == "at+jwt"
    decoded = jwt.decode(
        token,
        jwt.PyJWK(key.jwk).key,
        algorithms=[alg],
        audience="portal",
        issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert decoded == claims
    assert decoded["at_hash"] == create_half_hash(access_token, alg).decode()
    checked = CodeIDToken(
        decoded,
        {"alg": alg},
        options={"iss": {"value": ISSUER}, "aud": {"values": ["portal"]}},
        params={"nonce": "n-1", "access_token": access_token, "client_id": "portal"},
    )
    checked.validate(now=NOW)  # iss, sub, aud, exp, iat, auth_time, nonce, at_hash
    tampered = CodeIDToken(decoded, {"alg": alg}, params={"access_token": access_token + "x"})
    with pytest.raises(InvalidClaimError, match="at_hash"):
        tampered.validate(now=NOW)


def test_a_wrong_at_hash_is_caught_by_a_relying_party() -> None:
    assert at_hash("token-a", "RS256") != at_hash("token-b", "RS256")
    assert at_hash("token-a", "RS256") != at_hash("token-a", "EdDSA")
    assert len(at_hash("x", "RS256")) == 22 and len(at_hash("x", "EdDSA")) == 43


def test_user_claims_go_into_the_tokens_and_scopes_they_name() -> None:
    """``user_claims``: the source (groups, username, profile.<key>), the token kinds
    (``into``) and the scope condition; a profile key the user lacks is left out."""
    claims = (
        UserClaim("groups", "groups", frozenset({"access_token", "id_token"})),
        UserClaim("login", "username", frozenset({"id_token"})),
        UserClaim("dept", "profile.department", frozenset({"access_token"}), scope="profile"),
        UserClaim("cost_center", "profile.cost_center", frozenset({"access_token"})),
    )
    assert user_claim_values(claims, ALICE, ("openid",), "access_token") == {"groups": ["admins"]}
    assert user_claim_values(claims, ALICE, ("openid", "profile"), "access_token") == {
        "groups": ["admins"],
        "dept": "finance",
    }
    assert user_claim_values(claims, ALICE, ("openid",), "id_token") == {
        "groups": ["admins"],
        "login": "alice",
    }
    configured = dataclasses.replace(server(), user_claims=claims)
    access = user_access_token_claims(
        configured, client(), SIGN_IN, ("openid", "profile"), NOW, "jti-1"
    )
    assert access["dept"] == "finance" and "login" not in access
    id_token = id_token_claims(configured, "portal", SIGN_IN, ("openid",), None, NOW, None)
    assert id_token["login"] == "alice" and "dept" not in id_token and "at_hash" not in id_token
