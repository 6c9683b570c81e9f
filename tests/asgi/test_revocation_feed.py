"""The revocation feed ({issuer}/v1/revocations): revoked jtis after a cursor, for
gateways to follow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import jwt
import pytest

from tests.asgi.test_introspect_revoke import ADMIN, REPORTING, REVOKE, issue
from tests.asgi.test_token_endpoint import assert_oauth_error
from tests.conftest import ISSUER, AuthServer

pytestmark = pytest.mark.anyio

FEED = f"{ISSUER}/v1/revocations"


@pytest.fixture
def authserver(make_authserver: Callable[..., AuthServer]) -> AuthServer:
    def admin_is_a_resource_server(data: dict) -> None:  # type: ignore[type-arg]
        data["authserver"]["clients"][1]["introspect"] = "any"

    return make_authserver(admin_is_a_resource_server)


def jti_of(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["jti"]  # type: ignore[no-any-return]


async def revoke(http: httpx.AsyncClient, token: str) -> None:
    response = await http.post(REVOKE, data={"token": token}, auth=REPORTING)
    assert response.status_code == 200, response.text


async def test_the_feed_pages_revocations_after_a_cursor(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        first, second = await issue(http, REPORTING), await issue(http, REPORTING)
        empty = await http.get(FEED, auth=ADMIN)
        assert empty.status_code == 200
        assert empty.headers["cache-control"] == "no-store"
        assert empty.json() == {"revocations": [], "cursor": "0"}
        await revoke(http, first)
        page = (await http.get(FEED, auth=ADMIN)).json()
        exp = int(authserver.clock.now) + 3600
        assert page["revocations"] == [{"jti": jti_of(first), "exp": exp}]
        await revoke(http, second)
        await revoke(http, first)  # again: already in the feed, not twice
        after = (await http.post(FEED, data={"cursor": page["cursor"]}, auth=ADMIN)).json()
        assert after["revocations"] == [{"jti": jti_of(second), "exp": exp}]
        same = (await http.get(FEED, params={"cursor": after["cursor"]}, auth=ADMIN)).json()
        assert same == {"revocations": [], "cursor": after["cursor"]}
        everything = (await http.get(FEED, auth=ADMIN)).json()
        assert [e["jti"] for e in everything["revocations"]] == [jti_of(first), jti_of(second)]
        authserver.clock.advance(3601)  # past their exp: gone from the feed
        assert (await http.get(FEED, auth=ADMIN)).json()["revocations"] == []


async def test_a_long_poll_wakes_on_a_new_revocation(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        token = await issue(http, REPORTING)
        cursor = (await http.get(FEED, auth=ADMIN)).json()["cursor"]
        started = time.monotonic()
        waiting = asyncio.ensure_future(
            http.get(FEED, params={"cursor": cursor, "wait": "10"}, auth=ADMIN)
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await revoke(http, token)
        answer = await waiting
        assert time.monotonic() - started < 2
        assert [e["jti"] for e in answer.json()["revocations"]] == [jti_of(token)]
        started = time.monotonic()
        quiet = await http.get(
            FEED, params={"cursor": answer.json()["cursor"], "wait": "1"}, auth=ADMIN
        )
        assert 0.9 < time.monotonic() - started < 3
        assert quiet.json()["revocations"] == []


async def test_the_feed_is_for_authenticated_resource_servers(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        anonymous = await http.get(FEED)
        wrong = await http.get(FEED, auth=("admin", "nope"))
        not_any = await http.get(FEED, auth=REPORTING)
        bad_cursor = await http.get(FEED, params={"cursor": "x1"}, auth=ADMIN)
        bad_wait = await http.get(FEED, params={"wait": "31"}, auth=ADMIN)
        secret_in_url = await http.get(
            FEED, params={"client_id": "admin", "client_secret": ADMIN[1]}
        )
        put = await http.put(FEED, auth=ADMIN)
    assert_oauth_error(anonymous, 401, "invalid_client")
    assert_oauth_error(wrong, 401, "invalid_client", 'Basic realm="tokengate"')
    assert_oauth_error(not_any, 403, "unauthorized_client")
    assert_oauth_error(bad_cursor, 400, "invalid_request")
    assert_oauth_error(bad_wait, 400, "invalid_request")
    assert_oauth_error(secret_in_url, 400, "invalid_request")
    assert put.status_code == 405


async def test_discovery_names_the_feed(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        document = (await http.get(f"{ISSUER}/.well-known/oauth-authorization-server")).json()
    assert document["revocation_feed_endpoint"] == FEED


async def test_a_drain_answers_held_requests_at_once(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        started = time.monotonic()
        waiting = asyncio.ensure_future(http.get(FEED, params={"wait": "20"}, auth=ADMIN))
        await asyncio.sleep(0.2)
        authserver.services.endpoints.drain()
        answer = await waiting
    assert answer.status_code == 200 and answer.json()["revocations"] == []
    assert time.monotonic() - started < 2


async def test_a_revocation_made_during_a_held_request_s_store_read_wakes_it(
    authserver: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a store with several threads (PostgreSQL), a revocation can commit, and wake
    the waiting requests, while a held request's read is still out: that request must
    wake too, not sleep until its next poll (made 30 s long here)."""
    from authserver import endpoints as endpoints_module

    monkeypatch.setattr(endpoints_module, "FEED_POLL", 30.0)
    endpoints = authserver.services.endpoints
    store = authserver.services.store
    loop = asyncio.get_running_loop()
    real_read = store.revocations_after
    calls: list[float] = []

    def read_then_revoke_meanwhile(*args: object) -> object:
        answer = real_read(*args)  # type: ignore[arg-type]
        if not calls:  # the first read found nothing; now another request revokes
            store.revoke("jti-late", "default", int(authserver.clock.now) + 60)
            woken = asyncio.run_coroutine_threadsafe(notify(), loop)
            woken.result(timeout=5)
        calls.append(time.monotonic())
        return answer

    async def notify() -> None:
        endpoints.wake_feed()

    monkeypatch.setattr(store, "revocations_after", read_then_revoke_meanwhile)
    async with authserver.client() as http:
        started = time.monotonic()
        answer = await http.get(FEED, params={"wait": "20"}, auth=ADMIN)
    assert [e["jti"] for e in answer.json()["revocations"]] == ["jti-late"]
    assert len(calls) == 2 and time.monotonic() - started < 5
