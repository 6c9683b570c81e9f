"""The failed-authentication throttle in Redis: the same arithmetic as in memory (one
sequence of failures, the same locks), keys that expire, and the per-process fallback
while Redis is unreachable."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from authserver.config import ClientAuthThrottle
from authserver.throttle import (
    CHECK_LUA,
    CLEAR_MEMORY,
    FAIL_LUA,
    FORGET_LUA,
    MemoryThrottle,
    RedisThrottle,
    lock_after,
    make_throttle,
    throttle_link,
)
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

# a database of its own; only this test's keys (a scope of their own) are removed
REDIS_URL = os.environ.get("TOKENGATE_TEST_REDIS_THROTTLE", "redis://127.0.0.1:6379/11")
IP = "198.51.100.7"


def test_lock_after_doubles_from_one_second_up_to_max_lock() -> None:
    assert [lock_after(n, 3, 60) for n in range(1, 11)] == [0, 0, 0, 1, 2, 4, 8, 16, 32, 60]
    assert lock_after(1, 0, 300) == 1
    assert lock_after(10_000, 0, 10**12) == 2**32  # the exponent stops at 32


@pytest.fixture
async def redis_client() -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis at {REDIS_URL} ({type(exc).__name__})")
    yield client
    await client.aclose()


@pytest.fixture
async def shared(redis_client: Any) -> AsyncIterator[tuple[Any, Any, str]]:
    """A link to the test Redis, a scope of this test's own, and the Redis client;
    the scope's keys are deleted afterwards."""
    link = throttle_link(REDIS_URL, timeout=2.0)
    scope = f"test-{uuid.uuid4().hex}"
    yield link, redis_client, scope
    await link.aclose()
    keys = [key async for key in redis_client.scan_iter(match=f"tokengate:th:{scope}:*")]
    if keys:
        await redis_client.delete(*keys)


async def server_now_us(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


@pytest.mark.parametrize(("free", "max_lock"), [(0, 60.0), (3, 60.0), (5, 300.0)])
async def test_the_script_locks_as_lock_after_says(
    redis_client: Any, free: int, max_lock: float
) -> None:
    key = f"tokengate:th:test-{uuid.uuid4().hex}:id:k"
    script = redis_client.register_script(FAIL_LUA)
    try:
        for count in range(1, 16):
            await redis_client.hset(key, "u", 0)  # the last lock has run out
            assert await script(keys=[key], args=[free, int(max_lock * 1_000_000), 900_000]) == 1
            now = await server_now_us(redis_client)
            stored_count, until = await redis_client.hmget(key, "c", "u")
            assert int(stored_count) == count
            expected = lock_after(count, free, max_lock)
            if expected == 0:
                assert int(until) == 0
            else:
                assert abs((int(until) - now) / 1e6 - expected) < 0.05
        assert 0 < await redis_client.pttl(key) <= 900_000  # reset_after the last failure
    finally:
        await redis_client.delete(key)


async def test_a_locked_key_is_left_as_it_is(redis_client: Any) -> None:
    key = f"tokengate:th:test-{uuid.uuid4().hex}:id:k"
    fail = redis_client.register_script(FAIL_LUA)
    check = redis_client.register_script(CHECK_LUA)
    args = [1, 60_000_000, 900_000]
    try:
        assert await fail(keys=[key], args=args) == 1
        assert [int(v) for v in await check(keys=[key], args=[])] == [0, 1, 1]
        assert await fail(keys=[key], args=args) == 1  # the lock: 1 s
        wait = int((await check(keys=[key], args=[]))[0])
        assert 900_000 < wait <= 1_000_000
        assert await fail(keys=[key], args=args) == 0  # while locked: not counted
        assert await redis_client.hget(key, "c") == b"2"
    finally:
        await redis_client.delete(key)


async def test_memory_and_redis_give_the_same_locks_for_the_same_failures(
    shared: tuple[Any, Any, str],
) -> None:
    """One sequence of failures, some while locked, some after a lock ran out (in
    Redis: its lock field cleared, as time would), answered alike by both throttles."""
    link, client, scope = shared
    policy = ClientAuthThrottle(failures=3, ip_failures=5, max_lock=30, reset_after=600)
    clock = FakeClock()
    memory = MemoryThrottle(policy, clock=clock)
    redis = RedisThrottle(policy, link, scope)
    steps = ["fail", "fail", "fail", "fail", "fail", "wait", "fail", "wait", "fail"]
    steps += ["wait", "fail", "fail", "wait", "fail", "wait", "fail", "wait", "fail", "wait"]
    steps += ["fail", "wait", "fail", "succeed", "fail", "fail"]
    for step in steps:
        if step == "fail":
            await memory.failed("cli", IP)
            await redis.failed("cli", IP)
        elif step == "succeed":
            await memory.succeeded("cli")
            await redis.succeeded("cli")
        else:  # every lock runs out
            clock.advance(policy.max_lock + 1)
            for key in (redis.client_key("cli"), redis.ip_key(IP)):
                if await client.exists(key):
                    await client.hset(key, "u", 0)
        for client_id, ip in (("cli", None), (None, IP), ("cli", IP)):
            assert await redis.retry_after(client_id, ip) == await memory.retry_after(
                client_id, ip
            ), (step, client_id, ip)
        clients = memory._clients.entries
        ips = memory._ips.entries
        for key, entries, memory_key in (
            (redis.client_key("cli"), clients, next(iter(clients), None)),
            (redis.ip_key(IP), ips, next(iter(ips), None)),
        ):
            count = await client.hget(key, "c")
            expected = entries[memory_key].count if memory_key is not None else None
            assert (int(count) if count is not None else None) == expected, step
    assert link.shared  # every answer came from Redis


async def test_keys_are_prefixed_hashed_and_expire_after_reset_after(
    shared: tuple[Any, Any, str],
) -> None:
    link, client, scope = shared
    policy = ClientAuthThrottle(failures=2, ip_failures=2, max_lock=60, reset_after=120)
    throttle = RedisThrottle(policy, link, scope)
    await throttle.failed("x" * 1000, "2001:db8:1:2::1")
    keys = sorted([key.decode() async for key in client.scan_iter(match=f"tokengate:th:{scope}:*")])
    assert keys == [
        f"tokengate:th:{scope}:id:{keys[0].rsplit(':', 1)[1]}",
        f"tokengate:th:{scope}:ip:2001:db8:1:2::/64",
    ]
    assert len(keys[0].rsplit(":", 1)[1]) == 32  # a client_id is hashed
    for key in keys:
        assert 119_000 < await client.pttl(key) <= 120_000


async def test_a_success_forgets_the_client_id_not_the_address(
    shared: tuple[Any, Any, str],
) -> None:
    link, _, scope = shared
    policy = ClientAuthThrottle(failures=1, ip_failures=1, max_lock=60, reset_after=600)
    throttle = RedisThrottle(policy, link, scope)
    await throttle.failed("cli", IP)
    await throttle.failed("cli", IP)
    assert await throttle.retry_after("cli", None) == 1
    await throttle.succeeded("cli")
    assert await throttle.retry_after("cli", None) is None
    assert await throttle.retry_after(None, IP) == 1


async def test_a_success_costs_one_round_trip_unless_there_are_failures_to_clear(
    shared: tuple[Any, Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check tells whether the client has failures; only then does a success
    clear them, also when another process counted them. A check that found none is
    trusted for CLEAR_MEMORY."""
    link, _, scope = shared
    policy = ClientAuthThrottle(failures=3, ip_failures=0, max_lock=60, reset_after=600)
    clock = FakeClock()
    here = RedisThrottle(policy, link, scope, clock=clock)
    elsewhere = RedisThrottle(policy, link, scope)
    scripts: list[str] = []
    real_run = link.run

    async def counting(script: str, keys: list[str], args: list[Any]) -> Any:
        scripts.append(
            "check" if script == CHECK_LUA else "forget" if script == FORGET_LUA else "fail"
        )
        return await real_run(script, keys, args)

    monkeypatch.setattr(link, "run", counting)
    for _ in range(3):  # a client that never fails: asked about once a second
        assert await here.retry_after("cli", IP) is None
        await here.succeeded("cli")
    assert scripts == ["check"]
    clock.advance(CLEAR_MEMORY)
    assert await here.retry_after("cli", IP) is None
    assert scripts == ["check"] * 2
    scripts.clear()
    await elsewhere.failed("cli", IP)
    await elsewhere.failed("cli", IP)
    clock.advance(CLEAR_MEMORY)
    assert await here.retry_after("cli", IP) is None  # two of three free failures used
    await here.succeeded("cli")  # seen by the check: cleared, for every process
    assert scripts == ["fail", "fail", "check", "forget"]
    await elsewhere.failed("cli", IP)
    await elsewhere.failed("cli", IP)
    await elsewhere.failed("cli", IP)
    clock.advance(CLEAR_MEMORY)
    assert await here.retry_after("cli", IP) is None  # the old two were cleared: 3 free


async def test_a_failure_here_makes_the_next_check_ask_redis(
    shared: tuple[Any, Any, str],
) -> None:
    """A remembered "no failures" never outlives a failure in this process: a guesser
    gets no run of unasked tries."""
    link, _, scope = shared
    policy = ClientAuthThrottle(failures=1, ip_failures=0, max_lock=60, reset_after=600)
    throttle = RedisThrottle(policy, link, scope, clock=FakeClock())
    assert await throttle.retry_after("cli", IP) is None  # remembered as clear
    await throttle.failed("cli", IP)
    assert await throttle.retry_after("cli", IP) is None  # asked: one free failure used
    await throttle.failed("cli", IP)
    assert await throttle.retry_after("cli", IP) == 1  # asked: locked


async def test_two_processes_share_one_count(shared: tuple[Any, Any, str]) -> None:
    link, _, scope = shared
    other = throttle_link(REDIS_URL, timeout=2.0)
    policy = ClientAuthThrottle(failures=3, ip_failures=0)
    first, second = RedisThrottle(policy, link, scope), RedisThrottle(policy, other, scope)
    try:
        for throttle in (first, second, first):
            assert await throttle.retry_after("cli", IP) is None
            await throttle.failed("cli", IP)
        assert await second.retry_after("cli", IP) is None  # three free failures
        await second.failed("cli", IP)
        assert await first.retry_after("cli", IP) == 1  # the fourth, in either, locks
    finally:
        await other.aclose()


async def test_an_unreachable_redis_falls_back_to_the_process_and_says_so_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    link = throttle_link("redis://127.0.0.1:9/0", retry_first=60)  # port 9: nothing there
    throttle = make_throttle(ClientAuthThrottle(failures=1), link, "client")
    assert isinstance(throttle, RedisThrottle)
    try:
        for _ in range(2):
            assert await throttle.retry_after("cli", IP) is None  # never refused for Redis
            await throttle.failed("cli", IP)
        assert await throttle.retry_after("cli", IP) == 1  # held in this process
        assert link.degraded() == [
            "throttle: redis unavailable, failed authentications counted per process"
        ]
        await throttle.succeeded("cli")
        assert await throttle.retry_after("cli", None) is None
    finally:
        await link.aclose()
    assert capsys.readouterr().err.count("throttle.redis_unavailable") == 1


def test_without_redis_the_throttle_is_per_process() -> None:
    policy = ClientAuthThrottle()
    assert isinstance(make_throttle(policy, None, "client"), MemoryThrottle)
    assert isinstance(make_throttle(policy, throttle_link(None), "client"), MemoryThrottle)
