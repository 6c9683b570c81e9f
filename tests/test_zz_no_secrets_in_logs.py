"""Runs last: every log line the suite's traffic produced, searched for credentials.

Audit files and the stdout/stderr of every tokengate process the tests started are
under pytest's base temp directory, or under ``TOKENGATE_TEST_LOGS`` when the suite ran
before in processes of its own (``make test``: pytest-xdist, then this file). No access
token, client assertion (both JWTs), client secret, user password or argon2 password
hash may appear in any of them, nor any authorization code, session cookie value,
authenticator secret or recovery code the sign-in tests saw issued.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.asgi.test_signin_flow import ISSUED_SECRETS_FILE
from tests.conftest import ADMIN_SECRET, REPORTING_SECRET

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
ARGON2 = re.compile(r"\$argon2(?:id|i|d)\$")  # a password hash, whatever its parameters
SECRETS = (
    REPORTING_SECRET,
    ADMIN_SECRET,
    "demo-secret-do-not-use-in-production",
    "newcomer-secret-0123456789abcdefghijklm",
    "hashed-secret-0123456789abcdefghijklmnopqr",
    "s3cr%t+with/odd=chars&0123456789abcdefghij",
    # user passwords the suite signs in with or sets (tests/*/test_users*.py)
    "alice-demo-password",
    "alice-password",
    "bob-password",
    "carol-pw-1",
    "erin-env-password-1",
    "erin-password",
    "pw-pw-pw-pw",
    "new-password",
)


@pytest.mark.last
def test_no_token_secret_or_assertion_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    ran = os.environ.get("TOKENGATE_TEST_LOGS")
    base = Path(ran).resolve() if ran else tmp_path_factory.getbasetemp()
    logs = [p for p in base.rglob("*.log*") if p.is_file()]  # audit files, process output
    # codes and session ids (test_signin_flow.py), one file in each process's directory
    issued = tuple(
        secret for path in base.rglob(ISSUED_SECRETS_FILE) for secret in path.read_text().split()
    )
    lines = 0
    leaks: list[str] = []
    for path in logs:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            lines += 1
            found = (
                JWT.search(line)
                or ARGON2.search(line)
                or next((s for s in SECRETS if s in line), None)
                or next((s for s in issued if s in line), None)
            )
            if found:
                leaks.append(f"{path.relative_to(base)}:{number}: {line[:200]}")
    assert leaks == []
    # the search saw the suite's traffic; on its own it checks nothing
    assert len(logs) >= 20 and lines >= 500, (len(logs), lines)


def test_the_pattern_finds_a_real_token() -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    assert JWT.search(f'{{"note":"{token}"}}')
    assert not JWT.search('{"jti":"NVBpyB3XqLmO7YES45GZVg"}')


def test_the_pattern_finds_a_password_hash() -> None:
    from authserver.passwords import hash_password

    assert ARGON2.search(f'{{"user":"{hash_password("x" * 8)}"}}')
    assert ARGON2.search("$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA")
    assert not ARGON2.search('{"event":"users.password_rehashed","user_id":"uAbc"}')
