"""PKCE (RFC 7636): S256 only, challenges checked at the authorization endpoint,
verifiers at the token endpoint, downgrades refused."""

from __future__ import annotations

import secrets

import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from authserver.errors import OAuthError
from authserver.pkce import METHODS, parse_challenge, s256, verifier_matches

# RFC 7636 appendix B
RFC_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_s256_is_the_rfc_example_and_agrees_with_authlib() -> None:
    assert s256(RFC_VERIFIER) == RFC_CHALLENGE
    for _ in range(50):
        verifier = secrets.token_urlsafe(48)
        assert s256(verifier) == create_s256_code_challenge(verifier)
        assert parse_challenge(s256(verifier), "S256", required=True) == s256(verifier)


def test_only_s256_is_offered() -> None:
    assert METHODS == ("S256",)


@pytest.mark.parametrize(
    ("challenge", "method", "required", "words"),
    [
        (None, None, True, "code_challenge is required"),
        (RFC_CHALLENGE, "plain", True, "must be S256"),
        (RFC_CHALLENGE, "plain", False, "must be S256"),  # plain never, whatever the policy
        (RFC_CHALLENGE, "s256", True, "must be S256"),
        (RFC_CHALLENGE, None, True, "code_challenge_method is required"),  # default: plain
        (RFC_CHALLENGE, None, False, "code_challenge_method is required"),
        (None, "S256", True, "without code_challenge"),
        (None, "S256", False, "without code_challenge"),
        (RFC_CHALLENGE[:-1], "S256", True, "43 characters"),
        (RFC_CHALLENGE + "A", "S256", True, "43 characters"),
        (RFC_CHALLENGE[:-1] + "N", "S256", True, "43 characters"),  # not a canonical encoding
        (RFC_CHALLENGE[:-1] + "=", "S256", True, "43 characters"),
        ("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw+cM", "S256", True, "43 characters"),
        (RFC_VERIFIER + "x", "S256", True, "43 characters"),  # a verifier sent as challenge
    ],
)
def test_authorization_requests_that_are_refused(
    challenge: str | None, method: str | None, required: bool, words: str
) -> None:
    with pytest.raises(OAuthError) as caught:
        parse_challenge(challenge, method, required=required)
    assert caught.value.error == "invalid_request"
    assert words in caught.value.description


def test_no_challenge_is_allowed_only_when_the_policy_says_so() -> None:
    assert parse_challenge(None, None, required=False) is None
    with pytest.raises(OAuthError):
        parse_challenge(None, None, required=True)


def test_the_right_verifier_passes() -> None:
    verifier_matches(RFC_CHALLENGE, RFC_VERIFIER)
    verifier_matches(None, None)  # a code issued without PKCE, redeemed without it
    longest = "~" * 128
    verifier_matches(s256(longest), longest)
    shortest = "a" * 43
    verifier_matches(s256(shortest), shortest)


@pytest.mark.parametrize(
    ("challenge", "verifier", "words"),
    [
        (RFC_CHALLENGE, None, "is required"),
        (RFC_CHALLENGE, RFC_VERIFIER[:-1] + "j", "does not match"),
        (RFC_CHALLENGE, RFC_CHALLENGE, "does not match"),  # the challenge is no verifier
        (s256("a" * 42), "a" * 42, "43-128"),
        (s256("a" * 129), "a" * 129, "43-128"),
        (s256("a" * 42 + "+"), "a" * 42 + "+", "43-128"),
        (RFC_CHALLENGE, "a" * 42 + "é", "43-128"),
        (s256("a" * 42 + " "), "a" * 42 + " ", "43-128"),
        (None, RFC_VERIFIER, "without PKCE"),  # downgrade: RFC 9700 2.1.1
    ],
)
def test_token_requests_that_are_refused(
    challenge: str | None, verifier: str | None, words: str
) -> None:
    with pytest.raises(OAuthError) as caught:
        verifier_matches(challenge, verifier)
    assert caught.value.error == "invalid_grant"
    assert words in caught.value.description
