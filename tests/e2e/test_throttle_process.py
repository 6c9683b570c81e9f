"""The failed-authentication throttle in real ``tokengate run`` processes: failures
spread over two workers count once through Redis (client authentication and user
passwords alike), and Redis killed mid-run falls back per process and recovers."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from authserver.passwords import hash_password
from tests.conftest import REPORTING_SECRET
from tests.e2e.conftest import e2e_config, free_port
from tests.e2e.test_rate_limits_process import OwnRedis, own_redis, shared_redis

# a Redis database of this file's own (the rate-limit tests empty theirs)
THROTTLE_REDIS = os.environ.get("TOKENGATE_TEST_REDIS_THROTTLE_E2E", "redis://127.0.0.1:6379/14")

__all__ = ["own_redis"]  # the fixture, for the test below

THROTTLE = {"failures": 3, "ip_failures": 50}  # the 4th failure in a row locks for 1 s
APP_SECRET = "app-secret-0123456789abcdefghijklmnopqrs"
ALICE_PASSWORD = "alice-password"
CALLBACK = "https://portal.example.com/callback"


def throttle_config(tmp_path: Path, port: int, admin: int, redis_url: str) -> dict[str, Any]:
    config = e2e_config(
        tmp_path / "data",
        port,
        client_auth_throttle=THROTTLE,
        users=[{"username": "alice", "password_hash": hash_password(ALICE_PASSWORD)}],
    )
    config["authserver"]["clients"].append(
        {
            "client_id": "app",
            "secret": APP_SECRET,
            "grant_types": ["password"],
            "scopes": ["openid", "orders:read"],
        }
    )
    config.update(redis=redis_url, admin={"listen": f"127.0.0.1:{admin}"})
    return config


def token(port: int, auth: tuple[str, str], **form: str) -> httpx.Response:
    """One token request on a new connection of its own: either worker may answer."""
    with httpx.Client(timeout=10) as client:
        return client.post(
            f"http://127.0.0.1:{port}/oauth2/default/v1/token",
            data=form or {"grant_type": "client_credentials"},
            auth=auth,
        )


def password(port: int, secret: str) -> httpx.Response:
    return token(
        port, ("app", APP_SECRET), grant_type="password", username="alice", password=secret
    )


def at_once(*calls: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """The calls' answers, in order, the calls made together: all within the first lock's
    1 s even on a loaded machine (one after the other, 7 calls have taken 1.2 s)."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_failures_over_two_workers_lock_once_through_redis(tokengate: Any, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    redis_url = shared_redis(THROTTLE_REDIS)
    process = tokengate(throttle_config(tmp_path, port, admin, redis_url), "--workers", "2")
    process.start(f"http://127.0.0.1:{admin}/readyz")

    # client authentication: 3 free failures, the 4th locks; then 429 whichever worker
    # answers (per process, a worker that saw 2 of the 4 would still answer 401)
    wrong = [token(port, ("reporting", "wrong")) for _ in range(4)]
    assert [r.status_code for r in wrong] == [401] * 4
    locked = at_once(
        *[lambda: token(port, ("reporting", "wrong"))] * 6,
        lambda: token(port, ("reporting", REPORTING_SECRET)),  # even the right secret
    )
    assert [r.status_code for r in locked] == [429] * 7
    assert all(r.headers["retry-after"] == "1" for r in locked)
    assert locked[0].json()["error"] == "temporarily_unavailable"
    time.sleep(1.1)  # the lock passes
    assert token(port, ("reporting", REPORTING_SECRET)).status_code == 200

    # a user's password (the password grant, as the sign-in page): the same throttle
    assert [password(port, "wrong").status_code for _ in range(4)] == [400] * 4
    refused = at_once(*[lambda: password(port, ALICE_PASSWORD)] * 6)  # locked: refused unseen
    assert [r.status_code for r in refused] == [400] * 6
    assert {r.json()["error"] for r in refused} == {"invalid_grant"}
    time.sleep(1.1)
    assert password(port, ALICE_PASSWORD).status_code == 200

    client = redis.Redis.from_url(redis_url)
    try:
        keys = {key.decode() for key in client.keys("tokengate:th:*")}
    finally:
        client.close()
    # the address's counts are left: the successes forgot the client_id's and the user's
    assert keys == {"tokengate:th:client:ip:127.0.0.1", "tokengate:th:signin:ip:127.0.0.1"}
    events = [e["event"] for e in process.log_events()]
    assert "throttle.redis_unavailable" not in events


def test_redis_killed_mid_run_falls_back_per_process_and_recovers(
    tokengate: Any, tmp_path: Path, own_redis: OwnRedis
) -> None:
    port, admin = free_port(), free_port()
    process = tokengate(throttle_config(tmp_path, port, admin, own_redis.url))
    process.start(f"http://127.0.0.1:{admin}/readyz")

    def readyz() -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=5).json()  # type: ignore[no-any-return]

    assert [token(port, ("reporting", "wrong")).status_code for _ in range(2)] == [401] * 2
    own_redis.kill()
    # nothing is refused for Redis: the process counts on its own, from nothing
    answers = [token(port, ("reporting", "wrong")).status_code for _ in range(6)]
    assert answers == [401] * 4 + [429] * 2
    assert readyz()["ready"] is True
    assert (
        "throttle: redis unavailable, failed authentications counted per process"
        in (readyz()["degraded"])
    )
    events = [e["event"] for e in process.log_events()]
    assert events.count("throttle.redis_unavailable") == 1  # once per episode

    own_redis.start()  # same port, empty
    deadline = time.monotonic() + 15
    while readyz()["degraded"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert readyz()["degraded"] == []
    events = [e["event"] for e in process.log_events()]
    assert events.count("throttle.redis_recovered") == 1
    # counted in Redis again: its count starts over there (the process's is not copied)
    time.sleep(1.1)  # the process's own lock passes; it no longer decides
    assert [token(port, ("reporting", "wrong")).status_code for _ in range(5)] == [401] * 4 + [429]
    client = redis.Redis(port=own_redis.port)
    try:
        kinds = sorted(key.decode().split(":")[3] for key in client.keys("tokengate:th:client:*"))
    finally:
        client.close()
    assert kinds == ["id", "ip"]


def test_sign_in_page_failures_over_two_workers_lock_once(tokengate: Any, tmp_path: Path) -> None:
    from urllib.parse import urlencode, urljoin

    from tests.asgi.test_signin_flow import Form

    port, admin = free_port(), free_port()
    config = throttle_config(tmp_path, port, admin, shared_redis(THROTTLE_REDIS))
    config["authserver"]["clients"].append(
        {
            "client_id": "portal",
            "secret": APP_SECRET,
            "grant_types": ["authorization_code"],
            "redirect_uris": [CALLBACK],
            "scopes": ["openid", "orders:read"],
        }
    )
    process = tokengate(config, "--workers", "2")
    process.start(f"http://127.0.0.1:{admin}/readyz")
    base = f"http://127.0.0.1:{port}"
    query = urlencode(
        {
            "response_type": "code",
            "client_id": "portal",
            "redirect_uri": CALLBACK,
            "scope": "openid",
            "state": "s",
            "nonce": "n",
            "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            "code_challenge_method": "S256",
        }
    )
    # every request on a new connection (Connection: close): either worker may answer
    with httpx.Client(follow_redirects=False, timeout=10, headers={"connection": "close"}) as b:
        to_page = b.get(f"{base}/oauth2/default/v1/authorize?{query}")
        assert to_page.status_code == 303
        page = b.get(urljoin(base, to_page.headers["location"]))
        assert page.status_code == 200

        def sign_in(secret: str) -> httpx.Response:
            nonlocal page
            form = Form(page.text)
            assert form.action is not None
            answer = b.post(
                urljoin(base, form.action),
                data={**form.fields, "username": "alice", "password": secret},
            )
            if answer.status_code == 401:
                page = answer  # the form again, to try once more
            return answer

        assert [sign_in("wrong").status_code for _ in range(4)] == [401] * 4
        refused = [sign_in(ALICE_PASSWORD) for _ in range(4)]  # locked: refused unseen
        assert [r.status_code for r in refused] == [401] * 4
        time.sleep(1.1)  # the lock passes
        signed_in = sign_in(ALICE_PASSWORD)
        assert signed_in.status_code == 303, signed_in.text
        assert signed_in.headers["location"].startswith(CALLBACK + "?")
