"""The store off the event loop: a slow store never stalls the loop, and a failing
one (a full disk) is a 503 to retry, with nothing reported done that was not stored."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from typing import Any

import pytest

from tests.asgi.test_introspect_revoke import INTROSPECT, REPORTING, REVOKE, issue
from tests.conftest import AuthServer

pytestmark = pytest.mark.anyio


async def loop_stalls_during(work: Any) -> tuple[Any, float]:
    """Run ``work`` while a ticker measures the longest the event loop went unserved."""
    worst = 0.0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal worst
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            worst = max(worst, now - last - 0.01)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        result = await work
    finally:
        done.set()
        await ticker
    return result, worst


async def test_a_slow_store_never_stalls_the_event_loop(authserver: AuthServer) -> None:
    store = authserver.services.store
    revoke = store.revoke
    entered = threading.Event()

    def slow_revoke(*args: Any) -> None:  # an outside lock held for a second
        entered.set()
        time.sleep(1.0)
        revoke(*args)

    store.revoke = slow_revoke  # type: ignore[method-assign]
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        response, stall = await loop_stalls_during(
            http.post(REVOKE, data={"token": token}, auth=REPORTING)
        )
        assert response.status_code == 200
        assert entered.is_set()
        assert stall < 0.2  # the loop served the ticker all along
        assert (await http.post(INTROSPECT, data={"token": token}, auth=REPORTING)).json() == {
            "active": False
        }


async def test_a_full_disk_at_revocation_is_a_503_and_nothing_reported_done(
    authserver: AuthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    store = authserver.services.store

    def full(*args: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    store.revoke = full  # type: ignore[method-assign]
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        response = await http.post(REVOKE, data={"token": token}, auth=REPORTING)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.headers["cache-control"] == "no-store"
        assert response.json() == {
            "error": "server_error",
            "error_description": "the authorization server cannot reach its store; retry later",
        }
        # not revoked, and not said to be
        assert (await http.post(INTROSPECT, data={"token": token}, auth=REPORTING)).json()["active"]
    line = [x for x in authserver.audit_lines() if x["event"] == "token.revoked"][-1]
    assert (line["outcome"], line["reason"]) == ("error", "store_unavailable")
    events = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    failed = [e for e in events if e["event"] == "authserver.store_unavailable"]
    assert failed and "database or disk is full" in failed[0]["error"]
    assert not [e for e in events if e["event"] in ("log", "authserver.internal_error")]


async def test_a_failing_store_at_introspection_is_a_503_not_active(
    authserver: AuthServer,
) -> None:
    def locked(jti: str) -> bool:
        raise sqlite3.OperationalError("database is locked")

    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        authserver.services.store.is_revoked = locked  # type: ignore[method-assign]
        response = await http.post(INTROSPECT, data={"token": token}, auth=REPORTING)
    assert response.status_code == 503
    assert response.json()["error"] == "server_error"
