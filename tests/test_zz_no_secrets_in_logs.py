"""Runs last: every log line the suite's traffic produced, searched for credentials.

Audit files and the stdout/stderr of every tokengate process the tests started are
under pytest's base temp directory. No access token, client assertion (both JWTs)
or client secret may appear in any of them.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import ADMIN_SECRET, REPORTING_SECRET

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
SECRETS = (
    REPORTING_SECRET,
    ADMIN_SECRET,
    "demo-secret-do-not-use-in-production",
    "newcomer-secret-0123456789abcdefghijklm",
    "hashed-secret-0123456789abcdefghijklmnopqr",
    "s3cr%t+with/odd=chars&0123456789abcdefghij",
)


@pytest.mark.last
def test_no_token_secret_or_assertion_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()
    logs = [p for p in base.rglob("*.log*") if p.is_file()]  # audit files, process output
    lines = 0
    leaks: list[str] = []
    for path in logs:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            lines += 1
            found = JWT.search(line) or next((s for s in SECRETS if s in line), None)
            if found:
                leaks.append(f"{path.relative_to(base)}:{number}: {line[:200]}")
    assert leaks == []
    # the search saw the suite's traffic; on its own it checks nothing
    assert len(logs) >= 20 and lines >= 500, (len(logs), lines)


def test_the_pattern_finds_a_real_token() -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    assert JWT.search(f'{{"note":"{token}"}}')
    assert not JWT.search('{"jti":"NVBpyB3XqLmO7YES45GZVg"}')
