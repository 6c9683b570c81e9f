"""The gateway's revocation-feed follower: its bounded map of revoked jtis, and how it
follows the feed (cursor, failures, degraded)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from gateway.config import IssuerConfig, RevocationsConfig
from gateway.revocations import FeedError, IssuerRevocations, Revocations
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0
URL = "http://auth.test/oauth2/default"


def issuer(**feed: Any) -> IssuerConfig:
    return IssuerConfig(
        issuer=URL,
        audiences=("api://default",),
        jwks_uri=None,
        algorithms=("RS256",),
        leeway=30,
        allow_jwt_typ=False,
        jwks_cache_min=30,
        jwks_cache_max=3600,
        jwks_cache_default=300,
        jwks_max_stale=86400,
        revocations=RevocationsConfig("gateway", "gw-secret", **feed),
    )


def follower(
    handler: Any = None, clock: FakeClock | None = None, **kwargs: Any
) -> IssuerRevocations:
    config = issuer()
    assert config.revocations is not None
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler or (lambda r: None)))
    clock = clock or FakeClock(NOW)
    return IssuerRevocations(
        config, config.revocations, http, clock=clock, monotonic=clock, **kwargs
    )


def test_entries_leave_once_their_token_could_no_longer_pass() -> None:
    clock = FakeClock(NOW)
    f = follower(clock=clock)
    f.add([("a", NOW + 10), ("b", NOW + 100), ("old", NOW - 31)])
    assert f.is_revoked("a") and f.is_revoked("b") and not f.is_revoked("old")
    clock.advance(10 + 29)  # past exp, within the leeway: a token could still pass
    assert f.is_revoked("a")
    clock.advance(2)
    assert not f.is_revoked("a")
    f.sweep(clock())
    assert set(f.revoked) == {"b"}


def test_the_map_is_bounded_and_drops_the_soonest_to_expire() -> None:
    f = follower(max_entries=3)
    f.add([(f"j{i}", NOW + 100 - i) for i in range(5)])
    assert set(f.revoked) == {"j0", "j1", "j2"}
    assert f.evicted == 2


async def test_polls_carry_the_cursor_and_resume_from_it_after_errors() -> None:
    seen: list[dict[str, list[str]]] = []
    answers = [
        httpx.Response(200, json={"revocations": [{"jti": "a", "exp": NOW + 60}], "cursor": "7"}),
        httpx.Response(503),
        httpx.Response(200, content=b"not json"),
        httpx.Response(200, json={"revocations": [], "cursor": "7"}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(parse_qs(request.content.decode()))
        assert request.headers["authorization"].startswith("Basic ")
        return answers.pop(0)

    clock = FakeClock(NOW)
    f = follower(handler, clock)
    assert await f.poll(0) == 1
    assert f.is_revoked("a") and f.cursor == "7"
    for _ in range(2):
        with pytest.raises(FeedError) as failed:
            await f.poll(25)
        f._failed(failed.value)  # what run() does
    assert f.failures == 2 and f.cursor == "7"
    clock.advance(61)
    feeds = Revocations((), httpx.AsyncClient())
    feeds.followers[URL] = f
    assert feeds.degraded() and "failing for 61s" in feeds.degraded()[0]
    assert await f.poll(25) == 0
    assert f.failures == 0 and feeds.degraded() == []
    assert [s.get("cursor") for s in seen] == [None, ["7"], ["7"], ["7"]]
    assert [s["wait"] for s in seen] == [["0"], ["25"], ["25"], ["25"]]


async def test_client_secret_post_sends_the_credentials_in_the_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        assert form["client_id"] == ["gateway"] and form["client_secret"] == ["gw-secret"]
        assert "authorization" not in request.headers
        return httpx.Response(200, content=json.dumps({"revocations": [], "cursor": "0"}))

    config = issuer(auth_method="client_secret_post")
    assert config.revocations is not None
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    f = IssuerRevocations(config, config.revocations, http)
    assert await f.poll(0) == 0
    assert f.loaded.is_set()
