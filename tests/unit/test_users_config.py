"""``authserver.users``: every problem named by its key path, passwords only from the
environment, and never a password or a hash in a config object's repr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authserver.config import UserConfig
from authserver.passwords import hash_password, verify_password
from tokengate.config import parse_config
from tokengate.yamlconf import ConfigErrors

HASH = hash_password("alice-password")
LITERAL = "hunter2-literal-password"

BASE = """
authserver:
  servers: [{name: default, audience: api://default}]
  users:
"""


def users(text: str, environ: dict[str, str] | None = None) -> tuple[UserConfig, ...]:
    config = parse_config(BASE + text, environ or {})
    assert config.authserver is not None
    return config.authserver.users


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(BASE + text, environ or {})
    return [str(e) for e in info.value.errors]


def test_users_are_typed_and_frozen() -> None:
    (alice, bob) = users(
        f"""
    - username: Alice
      password_hash: "{HASH}"
      profile: {{email: alice@example.com, email_verified: true, name: Alice Doe,
                given_name: Alice, family_name: Doe, address: {{country: FR}},
                department: R&D, cost_center: 42, tags: [a, b]}}
      groups: [engineering, admins]
    - username: bob
      password: ${{BOB_PASSWORD}}
      disabled: true
""",
        {"BOB_PASSWORD": "bob-password-from-env"},
    )
    assert (alice.username, alice.username_key, alice.password_hash) == ("Alice", "alice", HASH)
    assert alice.password is None and not alice.disabled
    assert alice.groups == ("admins", "engineering")
    assert alice.profile["email_verified"] is True and alice.profile["cost_center"] == 42
    assert alice.profile["address"] == {"country": "FR"}
    with pytest.raises(TypeError):
        alice.profile["email"] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        alice.username = "x"  # type: ignore[misc]
    assert bob.password_hash is None and bob.password is not None and bob.disabled
    assert bob.password.variable == "BOB_PASSWORD"
    assert bob.password.reveal() == "bob-password-from-env"
    text = repr((alice, bob))
    assert HASH not in text and "bob-password-from-env" not in text and "$argon2" not in text


def test_the_same_password_from_the_environment_compares_equal() -> None:
    one = users("    - {username: b, password: '${P}'}\n", {"P": "same-password"})
    two = users("    - {username: b, password: '${P}'}\n", {"P": "same-password"})
    three = users("    - {username: b, password: '${P}'}\n", {"P": "other-password"})
    assert one == two and one != three


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (
            f"{{username: a, password: {LITERAL}}}",
            "authserver.users[0].password: must be a ${NAME} environment variable reference",
        ),
        (
            "{username: a, password: 'x${P}'}",
            "authserver.users[0].password: must be a ${NAME} environment variable reference",
        ),
        (
            "{username: a, password: 12345678}",
            "authserver.users[0].password: must be a ${NAME} environment variable reference",
        ),
        (
            "{username: a, password: '${UNSET}'}",
            "authserver.users[0].password: environment variable UNSET is not set",
        ),
        (
            "{username: a, password: '${SHORT}'}",
            "authserver.users[0].password: the password in ${SHORT} must be at least 8",
        ),
        ("{username: a}", "authserver.users[0]: needs exactly one of password_hash"),
        (
            f"{{username: a, password: '${{P}}', password_hash: '{HASH}'}}",
            "authserver.users[0]: needs exactly one of password_hash",
        ),
        ("{password_hash: x}", "authserver.users[0].username: is required"),
        (
            "{username: a, password_hash: 'sha256:00'}",
            "authserver.users[0].password_hash: must be an argon2id PHC string",
        ),
        (
            "{username: ' a', password: '${P}'}",
            "authserver.users[0].username: must not start or end with whitespace",
        ),
        (
            "{username: \"a\\u200bb\", password: '${P}'}",
            "authserver.users[0].username: must not hold control, format",
        ),
        (
            f"{{username: '{'x' * 129}', password: '${{P}}'}}",
            "authserver.users[0].username: must be at most 128 characters",
        ),
        (
            "{username: a, password: '${P}', profile: {email: 3}}",
            "authserver.users[0].profile.email: must be a non-empty string",
        ),
        (
            "{username: a, password: '${P}', profile: {email: alice}}",
            "authserver.users[0].profile.email: must be an email address",
        ),
        (
            "{username: a, password: '${P}', profile: {email_verified: 'yes'}}",
            "authserver.users[0].profile.email_verified: must be true or false",
        ),
        (
            "{username: a, password: '${P}', profile: {phone_number_verified: 1}}",
            "authserver.users[0].profile.phone_number_verified: must be true or false",
        ),
        (
            "{username: a, password: '${P}', profile: {address: Paris}}",
            "authserver.users[0].profile.address: must be a mapping of strings",
        ),
        (
            "{username: a, password: '${P}', profile: {updated_at: 1}}",
            "authserver.users[0].profile.updated_at: is set by tokengate",
        ),
        (
            "{username: a, password: '${P}', profile: {sub: x}}",
            "authserver.users[0].profile.sub: is the user's id",
        ),
        (
            "{username: a, password: '${P}', profile: {groups: [x]}}",
            "authserver.users[0].profile.groups: is the user's groups",
        ),
        (
            "{username: a, password: '${P}', profile: [email]}",
            "authserver.users[0].profile: must be a mapping, got a list",
        ),
        (
            "{username: a, password: '${P}', groups: [x, x]}",
            "authserver.users[0].groups[1]: duplicate value 'x'",
        ),
        (
            "{username: a, password: '${P}', groups: ['']}",
            "authserver.users[0].groups[0]: must not be empty",
        ),
        (
            "{username: a, password: '${P}', disabled: 'no'}",
            "authserver.users[0].disabled: must be true or false",
        ),
        (
            "{username: a, password: '${P}', admin: true}",
            "authserver.users[0].admin: unknown key",
        ),
    ],
)
def test_problems_name_the_key_path(user: str, expected: str) -> None:
    found = problems(f"    - {user}\n", {"P": "a-long-password", "SHORT": "short"})
    assert any(p.startswith(expected) for p in found), found
    assert not any(LITERAL in p or "a-long-password" in p for p in found)


@pytest.mark.parametrize("other", ["ALICE", "\uff41\uff4c\uff49\uff43\uff45", "Alice"])
def test_duplicate_usernames_ignore_case_and_width(other: str) -> None:
    found = problems(
        f"    - {{username: alice, password_hash: '{HASH}'}}\n"
        f"    - {{username: bob, password_hash: '{HASH}'}}\n"
        f"    - {{username: '{other}', password_hash: '{HASH}'}}\n"
    )
    assert found == [
        f"authserver.users[2].username: duplicate username {other!r}: "
        "authserver.users[0].username is the same user (usernames are compared ignoring "
        "case and Unicode compatibility forms)"
    ]


def test_the_demo_user_signs_in_with_its_documented_password() -> None:
    root = Path(__file__).resolve().parents[2]
    config = parse_config((root / "config/tokengate.yaml").read_text(), {})
    assert config.authserver is not None
    (alice,) = config.authserver.users
    assert alice.username == "alice" and alice.groups == ("engineering",)
    assert alice.password_hash is not None
    assert verify_password(alice.password_hash, "alice-demo-password")
    assert "alice-demo-password" in (root / "docs/users.md").read_text()


def test_check_never_prints_a_literal_password(tmp_path: Path) -> None:
    path = tmp_path / "tokengate.yaml"
    path.write_text(BASE + f"    - {{username: a, password: '{LITERAL}'}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "tokengate", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("authserver.users[0].password: must be a ${NAME}")
    assert LITERAL not in result.stdout + result.stderr
