"""RFC 6238 codes against the RFC's own test vectors, the window, the otpauth URI apps
scan, recovery codes, and the sign-on policy's decisions."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from authserver import totp
from authserver.signon import (
    ACR_MFA,
    ACR_PASSWORD,
    SignOnPolicy,
    acr_of,
    needs_mfa,
)

RFC_SECRET = b"12345678901234567890"  # RFC 6238 appendix B, SHA-1


@pytest.mark.parametrize(
    ("at", "eight_digits"),
    [
        (59, "94287082"),
        (1111111109, "07081804"),
        (1111111111, "14050471"),
        (1234567890, "89005924"),
        (2000000000, "69279037"),
        (20000000000, "65353130"),
    ],
)
def test_the_rfc_6238_vectors(at: int, eight_digits: str) -> None:
    assert totp.hotp(RFC_SECRET, totp.step_at(at), digits=8) == eight_digits
    assert totp.code_at(RFC_SECRET, at) == eight_digits[-6:]


def test_a_code_matches_its_step_and_the_ones_either_side_only() -> None:
    now = 1111111111.0
    step = totp.step_at(now)
    for offset, expected in ((-2, None), (-1, step - 1), (0, step), (1, step + 1), (2, None)):
        code = totp.hotp(RFC_SECRET, step + offset)
        assert totp.matching_step(RFC_SECRET, code, now) == expected, offset
    code = totp.code_at(RFC_SECRET, now)
    assert totp.matching_step(RFC_SECRET, f" {code[:3]} {code[3:]} ", now) == step  # as typed
    for junk in (
        "",
        "12345",
        "1234567",
        "abcdef",
        "\uff11\uff12\uff13\uff14\uff15\uff16",
        code + "0",
    ):
        assert totp.matching_step(RFC_SECRET, junk, now) is None


def test_the_uri_an_authenticator_app_scans() -> None:
    uri = totp.otpauth_uri("Acme Corp", "alice@example.com", RFC_SECRET)
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    assert parts.path == "/Acme%20Corp%3Aalice%40example.com"
    assert parse_qs(parts.query) == {
        "secret": ["GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"],
        "issuer": ["Acme Corp"],
        "algorithm": ["SHA1"],
        "digits": ["6"],
        "period": ["30"],
    }
    assert totp.secret_text(RFC_SECRET) == "GEZD GNBV GY3T QOJQ GEZD GNBV GY3T QOJQ"
    assert len(totp.new_secret()) == 20 and totp.new_secret() != totp.new_secret()


def test_recovery_codes_are_unambiguous_and_hash_as_typed() -> None:
    codes = totp.new_recovery_codes()
    assert len(codes) == len(set(codes)) == 10
    for code in codes:
        assert len(code) == 19 and code.count("-") == 3
        assert not set(code) & set("01ilo")
        assert totp.looks_like_recovery_code(code)
        typed = code.upper().replace("-", " ")
        assert totp.recovery_code_hash(typed) == totp.recovery_code_hash(code)
    assert not totp.looks_like_recovery_code("123456")
    assert not totp.looks_like_recovery_code("abcd-efgh-jkmn-pqr")  # one short


@pytest.mark.parametrize(
    ("policy", "groups", "acr_values", "needed"),
    [
        (SignOnPolicy("password"), (), (), False),
        (SignOnPolicy("password+mfa"), (), (), True),
        (SignOnPolicy("password", frozenset({"admins"})), ("admins", "x"), (), True),
        (SignOnPolicy("password", frozenset({"admins"})), ("x",), (), False),
        (SignOnPolicy("password"), (), (ACR_MFA,), True),
        (SignOnPolicy("password"), (), ("urn:other", ACR_MFA), True),
        (SignOnPolicy("password"), (), (ACR_MFA, ACR_PASSWORD), False),  # either will do
        (SignOnPolicy("password"), (), ("urn:other",), False),  # unknown values ignored
        (SignOnPolicy("password+mfa"), (), (ACR_PASSWORD,), True),  # never less than policy
    ],
)
def test_when_a_second_factor_is_needed(
    policy: SignOnPolicy, groups: tuple[str, ...], acr_values: tuple[str, ...], needed: bool
) -> None:
    assert needs_mfa(policy, groups, acr_values) is needed


def test_acr_follows_amr() -> None:
    assert acr_of(["pwd"]) == ACR_PASSWORD
    assert acr_of(["pwd", "otp", "mfa"]) == ACR_MFA


@pytest.mark.parametrize(
    "public_url, rp",
    [
        ("https://auth.example.com", ("auth.example.com", "https://auth.example.com")),
        ("https://auth.example.com:443/base", ("auth.example.com", "https://auth.example.com")),
        ("https://Auth.Example.com:8443", ("auth.example.com", "https://auth.example.com:8443")),
        ("http://localhost:9000", ("localhost", "http://localhost:9000")),
        ("http://id.localhost", ("id.localhost", "http://id.localhost")),
        ("http://127.0.0.1:9000", None),  # an IP address is never an RP id
        ("https://127.0.0.1", None),
        ("https://[::1]:9000", None),
        ("http://auth.example.com", None),  # not a secure context
    ],
)
def test_the_relying_party_is_the_public_url_where_browsers_allow_passkeys(
    public_url: str, rp: tuple[str, str] | None
) -> None:
    from authserver.relyingparty import relying_party

    found = relying_party(public_url, "Acme")
    assert (None if found is None else (found.id, found.origin)) == rp


def test_what_each_sign_on_policy_requires_and_what_meets_it() -> None:
    from authserver.signon import required, satisfies

    assert required(SignOnPolicy("passwordless"), (), ()) == "passkey"
    assert required(SignOnPolicy("password+mfa"), (), ()) == "mfa"
    assert required(SignOnPolicy("password"), (), (ACR_MFA,)) == "mfa"
    assert required(SignOnPolicy("password"), (), ()) == "password"
    for amr, meets in [
        (("pwd",), {"password"}),
        (("pwd", "otp", "mfa"), {"password", "mfa"}),
        (("pwd", "hwk", "mfa"), {"password", "mfa", "passkey"}),
        (("swk", "mfa"), {"password", "mfa", "passkey"}),
    ]:
        assert {r for r in ("password", "mfa", "passkey") if satisfies(amr, r)} == meets  # type: ignore[arg-type]
        assert acr_of(amr) == (ACR_MFA if "mfa" in meets else ACR_PASSWORD)
