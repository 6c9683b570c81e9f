"""Revocation reaches the gateway: real processes on loopback. A token revoked at the
authorization server is refused by every gateway worker within seconds; a feed outage
leaves the gateway serving (``/readyz`` says degraded), and it resumes afterwards; a
restarted gateway knows what was revoked while it was down."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ADMIN_SECRET, REPORTING_SECRET
from tests.e2e.conftest import Tokengate, e2e_config, free_port
from tests.e2e.test_workers import wait_for
from tests.e2e.test_workers import workers_stack as workers_stack  # a fixture

FEED = {"client_id": "admin", "secret": ADMIN_SECRET, "degraded_after": "2s"}
ROUND = 8  # requests per check, each on a new connection: the kernel spreads them


def revoke(issuer: str, token: str) -> None:
    response = httpx.post(
        f"{issuer}/v1/revoke", data={"token": token}, auth=("reporting", REPORTING_SECRET)
    )
    assert response.status_code == 200, response.text


def token_of(issuer: str) -> str:
    response = httpx.post(
        f"{issuer}/v1/token",
        data={"grant_type": "client_credentials"},
        auth=("reporting", REPORTING_SECRET),
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]  # type: ignore[no-any-return]


def answers(gateway: str, token: str, n: int = ROUND) -> list[tuple[int, str]]:
    """n requests, a new connection each: (status, WWW-Authenticate)."""
    out = []
    for _ in range(n):
        r = httpx.get(f"{gateway}/orders/1", headers={"Authorization": f"Bearer {token}"})
        out.append((r.status_code, r.headers.get("www-authenticate", "")))
    return out


def all_revoked(found: list[tuple[int, str]]) -> bool:
    return all(
        status == 401 and 'error="invalid_token"' in challenge and "revoked" in challenge
        for status, challenge in found
    )


def test_every_worker_refuses_a_revoked_token_within_two_seconds(
    workers_stack: Any, tmp_path: Path
) -> None:
    stack = workers_stack(revocations=FEED)
    token = token_of(stack.issuer)
    assert {s for s, _ in answers(stack.gateway, token)} == {200}
    revoke(stack.issuer, token)
    revoked_at = time.monotonic()
    assert wait_for(lambda: all_revoked(answers(stack.gateway, token)), 5, every=0.02)
    delay = time.monotonic() - revoked_at
    print(f"\nrevoke-to-refusal on every worker: {delay * 1000:.0f} ms")
    assert delay < 2.0
    assert all_revoked(answers(stack.gateway, token, 2 * ROUND))  # and it stays so
    audit = (tmp_path / "main" / "audit.log").read_text()
    assert '"reason":"token_revoked"' in audit.replace(" ", "")
    assert token not in audit
    metrics = httpx.get(f"{stack.admin}/metrics").text
    assert 'tokengate_gateway_revoked_tokens{issuer="' + stack.issuer + '"} 1.0' in metrics
    assert "tokengate_gateway_revocation_feed_errors_total" in metrics


def test_feed_outage_recovery_and_gateway_restart(tmp_path: Path, tokengate: Any) -> None:
    auth_port, gw_port, admin_port, up_port = free_port(), free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{auth_port}/oauth2/default"
    gateway, admin = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{admin_port}"
    for name in ("auth", "gw", "echo"):
        (tmp_path / name).mkdir()
    auth_config = e2e_config(tmp_path / "auth" / "data", auth_port)
    auth_config["audit"] = {"path": str(tmp_path / "auth" / "audit.log")}
    gw_config = {
        "gateway": {
            "listen": f"127.0.0.1:{gw_port}",
            "issuers": [{"issuer": issuer, "audiences": ["api://default"], "revocations": FEED}],
            "routes": [
                {
                    "name": "orders",
                    "match": {"path": "/orders/**"},
                    "upstream": f"http://127.0.0.1:{up_port}",
                    "require": {"scopes": ["orders:read"]},
                }
            ],
        },
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "audit": {"path": str(tmp_path / "gw" / "audit.log")},
    }
    echo = Tokengate(tmp_path / "echo", {"echo": {"listen": f"127.0.0.1:{up_port}"}})
    auth = Tokengate(tmp_path / "auth", auth_config)
    gw = Tokengate(tmp_path / "gw", gw_config)
    started = [echo, auth, gw]
    try:
        echo.start(f"http://127.0.0.1:{up_port}/")
        auth.start(f"{issuer}/.well-known/openid-configuration")
        gw.start(f"{admin}/readyz")
        first, second, third = token_of(issuer), token_of(issuer), token_of(issuer)
        assert {s for s, _ in answers(gateway, first, 2)} == {200}
        revoke(issuer, first)
        assert wait_for(lambda: all_revoked(answers(gateway, first, 2)), 3, every=0.02)

        # the feed goes away: the gateway keeps serving, and says so once past the limit
        auth.stop()
        assert {s for s, _ in answers(gateway, second, 2)} == {200}
        assert all_revoked(answers(gateway, first, 2))  # what it knew, it still knows

        def degraded() -> list[str]:
            readyz = httpx.get(f"{admin}/readyz")
            assert readyz.status_code == 200
            return readyz.json()["degraded"]  # type: ignore[no-any-return]

        assert degraded() == []
        assert wait_for(lambda: any("revocation feed" in d for d in degraded()), 6, every=0.2)
        assert {s for s, _ in answers(gateway, second, 2)} == {200}

        # back again: the follower resumes from its cursor
        auth.proc = None
        auth.start(f"{issuer}/.well-known/openid-configuration")
        revoke(issuer, second)
        assert wait_for(lambda: all_revoked(answers(gateway, second, 2)), 12, every=0.05)
        assert wait_for(lambda: degraded() == [], 3, every=0.1)
        events = [e["event"] for e in gw.log_events()]
        assert "gateway.revocation_feed_failed" in events
        assert "gateway.revocation_feed_recovered" in events

        # a restarted gateway learns what was revoked while it was down
        assert {s for s, _ in answers(gateway, third, 1)} == {200}
        gw.stop()
        revoke(issuer, third)
        gw.proc = None
        gw.start(f"{admin}/readyz")
        assert all_revoked(answers(gateway, third, 2))
        assert all_revoked(answers(gateway, first, 1) + answers(gateway, second, 1))
    finally:
        for process in started:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
