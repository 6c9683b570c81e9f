"""GCRA, the pure decision; the Redis script against the real Redis; the fallback."""

from __future__ import annotations

import asyncio
import os

import pytest

from tokengate.ratelimit import (
    GCRA_LUA,
    MICROS,
    LocalLimiter,
    Rate,
    RateLimiter,
    gcra,
    outcome,
    parse_rate,
    redis_key,
)
from tokengate.yamlconf import ConfigError

REDIS_URL = os.environ.get("TOKENGATE_TEST_REDIS", "redis://127.0.0.1:6379/12")
S = MICROS


def run(arrivals: list[float], rate: Rate) -> list[tuple[bool, int, float]]:
    """Decide requests arriving at these seconds; (allowed, remaining, retry_after)."""
    tat = None
    out = []
    for at in arrivals:
        decision, tat = gcra(tat, int(at * S), rate.interval_us, rate.burst)
        out.append((decision.allowed, decision.remaining, decision.retry_after))
    return out


def test_a_burst_is_admitted_at_once_then_one_per_interval() -> None:
    rate = Rate(limit=10, period=1, burst=3)  # T = 0.1 s
    assert run([0, 0, 0, 0, 0.05, 0.1, 0.1, 0.35], rate) == [
        (True, 2, 0.0),
        (True, 1, 0.0),
        (True, 0, 0.0),
        (False, 0, 0.1),  # the next slot opens when the first of the burst has drained
        (False, 0, 0.05),
        (True, 0, 0.0),
        (False, 0, 0.1),
        (True, 1, 0.0),  # 0.25 s of credit came back: 2.5 slots, one used now
    ]


def test_without_burst_requests_are_spaced_by_the_interval() -> None:
    rate = Rate(limit=2, period=1, burst=1)  # T = 0.5 s
    assert [a for a, _, _ in run([0, 0.2, 0.5, 0.9, 1.0, 5.0], rate)] == [
        True,
        False,
        True,
        False,
        True,
        True,
    ]


def test_the_long_run_rate_is_the_limit_plus_the_burst() -> None:
    rate = Rate(limit=100, period=1, burst=20)
    arrivals = [i / 1000 for i in range(10_000)]  # 1000 requests/s for 10 s
    admitted = sum(a for a, _, _ in run(arrivals, rate))
    assert admitted == 100 * 10 + 20 - 1 or admitted == 100 * 10 + 20


def test_refusals_leave_the_state_alone_and_retry_after_is_exact() -> None:
    rate = Rate(limit=1, period=60, burst=1)  # one a minute
    first, tat = gcra(None, 0, rate.interval_us, 1)
    assert first.allowed and first.reset_after == 60
    refused, same = gcra(tat, 15 * S, rate.interval_us, 1)
    assert not refused.allowed and same == tat
    assert refused.retry_after == 45 and refused.retry_after_s == 45 and refused.reset_s == 45
    assert gcra(tat, 60 * S, rate.interval_us, 1)[0].allowed


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    refused = outcome(False, 100_000, 100_000, 1)  # 0.1 s to wait
    assert refused.retry_after == pytest.approx(0.1) and refused.retry_after_s == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("100/s", (100, 1)), ("600/min", (600, 60)), ("5000/h", (5000, 3600)), ("1 / m", (1, 60))],
)
def test_rates_parse(text: str, expected: tuple[int, int]) -> None:
    assert parse_rate(text, "x") == expected


@pytest.mark.parametrize("text", ["0/s", "100", "10/d", "-1/s", "1.5/s", "abc"])
def test_bad_rates_name_the_path(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^a\.b: must be a rate"):
        parse_rate(text, "a.b")


def test_long_keys_are_hashed_and_namespaced() -> None:
    assert redis_key("route:orders", "reporting") == "tokengate:rl:route:orders:reporting"
    long = redis_key("route:orders", "x" * 500)
    assert long.startswith("tokengate:rl:route:orders:") and len(long) == 26 + 32


def test_the_local_limiter_is_bounded_and_forgets() -> None:
    now = [0.0]
    local = LocalLimiter(clock=lambda: now[0], max_keys=10)
    rate = Rate(1, 1, 1)
    for i in range(100):
        assert local.decide(f"k{i}", rate).allowed
    assert len(local.tats) == 10
    assert not local.decide("k99", rate).allowed
    now[0] = 1.0
    assert local.decide("k99", rate).allowed


# --------------------------------------------------------------------------- Redis


@pytest.fixture
async def redis_client():  # type: ignore[no-untyped-def]
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (OSError, Exception) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis at {REDIS_URL} ({type(exc).__name__})")
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.mark.anyio
async def test_the_script_is_the_same_arithmetic_as_gcra(redis_client) -> None:  # type: ignore[no-untyped-def]
    script = redis_client.register_script(GCRA_LUA)
    rate = Rate(limit=5, period=1, burst=3)
    answers = [
        await script(keys=["tokengate:rl:t:a"], args=[rate.interval_us, 3]) for _ in range(5)
    ]
    assert [a for a, _ in answers] == [1, 1, 1, 0, 0]
    decisions = [outcome(bool(a), int(ahead), rate.interval_us, 3) for a, ahead in answers]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    assert 0 < decisions[3].retry_after <= 0.2
    ttl = await redis_client.pttl("tokengate:rl:t:a")
    assert 0 < ttl <= 601  # the key expires when its TAT passes


@pytest.mark.anyio
async def test_concurrent_decisions_never_admit_more_than_the_limit(redis_client) -> None:  # type: ignore[no-untyped-def]
    limiters = [RateLimiter(REDIS_URL, timeout=2.0) for _ in range(4)]  # 4 "processes"
    rate = Rate(limit=50, period=60, burst=50)  # nothing drains during the test
    try:
        decisions = await asyncio.gather(
            *(limiters[i % 4].decide("route:r", "k", rate) for i in range(400))
        )
    finally:
        for limiter in limiters:
            await limiter.aclose()
    assert sum(d.allowed for d in decisions) == 50
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))


@pytest.mark.anyio
async def test_an_unreachable_redis_falls_back_to_the_process_and_says_so_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fallbacks = []
    limiter = RateLimiter(  # port 9: nothing there
        "redis://127.0.0.1:9/0", retry_first=60, on_fallback=lambda: fallbacks.append(1)
    )
    rate = Rate(2, 60, 2)
    try:
        decisions = [await limiter.decide("route:r", "k", rate) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, False, False]
        assert len(fallbacks) == 4
        assert limiter.degraded() == ["ratelimit: redis unavailable, limits hold per process"]
    finally:
        await limiter.aclose()
    assert capsys.readouterr().err.count("ratelimit.redis_unavailable") == 1


# --------------------------------------------------------------------------- config

CONFIG = """
redis: redis://127.0.0.1:6379/10
authserver:
  servers: [{name: default, audience: api://default}]
  rate_limits: {token: {per_client: 600/min, burst: 50}}
gateway:
  issuers: [{issuer: http://127.0.0.1:9000/oauth2/default, audiences: [api://default]}]
  routes:
    - name: a
      match: {path: /a}
      upstream: http://127.0.0.1:7000
      rate_limit: {per: client_id, limit: 100/s, burst: 200}
    - name: b
      match: {path: /b}
      upstream: http://127.0.0.1:7000
      public: true
      rate_limit: {per: remote_addr, limit: 5/min}
"""


def test_rate_limit_config_parses_into_frozen_values() -> None:
    from gateway.config import RouteRateLimit
    from tokengate.config import parse_config

    config = parse_config(CONFIG)
    assert config.redis == "redis://127.0.0.1:6379/10"
    assert config.authserver is not None and config.gateway is not None
    assert config.authserver.rate_limits.token_per_client == Rate(600, 60, 50)
    a, b = config.gateway.routes
    assert a.rate_limit == RouteRateLimit("client_id", Rate(100, 1, 200))
    assert b.rate_limit == RouteRateLimit("remote_addr", Rate(5, 60, 5))  # burst: the limit


def test_rate_limit_config_errors_name_their_paths() -> None:
    from tokengate.config import parse_config
    from tokengate.yamlconf import ConfigErrors

    bad = (
        CONFIG.replace("redis://127.0.0.1:6379/10", "http://x")
        .replace("600/min", "600/day")
        .replace("per: remote_addr", "per: sub")
        .replace("burst: 200", "burst: 0")
        .replace("per: client_id", "per: user")
    )
    with pytest.raises(ConfigErrors) as caught:
        parse_config(bad)
    assert {e.path for e in caught.value.errors} == {
        "redis",
        "authserver.rate_limits.token.per_client",
        "gateway.routes[0].rate_limit.per",
        "gateway.routes[0].rate_limit.burst",
        "gateway.routes[1].rate_limit.per",  # a public route has no client_id or sub
    }


def test_a_reload_that_changes_redis_says_it_needs_a_restart() -> None:
    from tokengate.config import parse_config
    from tokengate.serve import applier

    before = parse_config(CONFIG)
    after = parse_config(CONFIG.replace("6379/10", "6380/10"))
    restart = asyncio.run(applier(before, {})(after))
    assert restart == ["redis: changing the Redis URL needs a restart"]


@pytest.mark.anyio
async def test_the_script_takes_as_many_cells_as_the_bucket_holds(redis_client) -> None:  # type: ignore[no-untyped-def]
    script = redis_client.register_script(GCRA_LUA)
    rate = Rate(limit=10, period=60, burst=10)  # nothing drains during the test
    key = ["tokengate:rl:t:lease"]
    taken = [await script(keys=key, args=[rate.interval_us, 10, 4]) for _ in range(4)]
    assert [cells for cells, _ in taken] == [4, 4, 2, 0]  # the last: refused, none taken
    assert outcome(False, int(taken[3][1]), rate.interval_us, 10).retry_after > 0


@pytest.mark.anyio
async def test_a_large_burst_is_leased_a_few_cells_at_a_time_and_never_exceeded(
    redis_client,  # type: ignore[no-untyped-def]
) -> None:
    from tokengate.ratelimit import LEASE_MAX, lease_size

    assert lease_size(Rate(20, 1, 20)) == 1  # small bursts: every decision in Redis
    assert lease_size(Rate(100, 60, 100)) == 5
    assert lease_size(Rate(1_000_000, 1, 1_000_000)) == LEASE_MAX
    limiters = [RateLimiter(REDIS_URL, timeout=2.0) for _ in range(4)]  # 4 "processes"
    calls = 0
    for limiter in limiters:
        run = limiter.redis.run

        async def counted(*args: object, run=run) -> object:  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return await run(*args)

        limiter.redis.run = counted  # type: ignore[method-assign]
    rate = Rate(limit=100, period=60, burst=100)  # leases of 5; nothing drains meanwhile
    try:
        decisions = await asyncio.gather(
            *(limiters[i % 4].decide("route:r", "k", rate) for i in range(400))
        )
    finally:
        for limiter in limiters:
            await limiter.aclose()
    assert sum(d.allowed for d in decisions) == 100  # the whole budget, and not one more
    assert calls <= 100 // 5 + 4 * 2  # about one round trip a lease, not one a request
    assert all(0 <= d.remaining < 100 for d in decisions if d.allowed)


@pytest.mark.anyio
async def test_a_lease_is_spent_only_for_a_moment(redis_client) -> None:  # type: ignore[no-untyped-def]
    now = [100.0]
    limiter = RateLimiter(REDIS_URL, timeout=2.0, clock=lambda: now[0])
    rate = Rate(limit=1000, period=1, burst=1000)  # leases of 1000 / 20 = 50 cells
    try:
        assert (await limiter.decide("route:r", "k", rate)).allowed
        [(key, lease)] = list(limiter.leases.items())
        # spent within the time 50 cells stand for at 1000/s: 50 ms
        assert lease.left == 49 and lease.until == pytest.approx(100.05)
        assert (await limiter.decide("route:r", "k", rate)).remaining == 950 + 48
        now[0] += 0.05  # past the lease: its cells are spent by no one
        assert (await limiter.decide("route:r", "k", rate)).allowed
        assert limiter.leases[key].left == 49  # a new lease
    finally:
        await limiter.aclose()


@pytest.mark.anyio
async def test_leases_taken_before_a_refill_do_not_add_to_it(redis_client) -> None:  # type: ignore[no-untyped-def]
    """Eight processes each hold a lease, the bucket refills, and a flood comes: the
    fleet admits at most what GCRA allows since the leases were taken, plus a lease."""
    import time

    from tokengate.ratelimit import lease_size

    rate = Rate(limit=1000, period=1, burst=1000)
    limiters = [RateLimiter(REDIS_URL, timeout=2.0) for _ in range(8)]
    try:
        started = time.monotonic()
        for limiter in limiters:
            assert (await limiter.decide("route:r", "k", rate)).allowed
        await asyncio.sleep(0.3)  # the bucket refills; the leases are past their time
        decisions = await asyncio.gather(
            *(limiters[i % 8].decide("route:r", "k", rate) for i in range(4000))
        )
        elapsed = time.monotonic() - started
    finally:
        for limiter in limiters:
            await limiter.aclose()
    admitted = 8 + sum(d.allowed for d in decisions)
    assert admitted <= rate.burst + 1000 * elapsed + lease_size(rate), (admitted, elapsed)
    assert admitted >= rate.burst * 0.5  # and the budget is used, not lost to leases


@pytest.mark.anyio
async def test_requests_waiting_for_a_lease_are_counted_into_it(redis_client) -> None:  # type: ignore[no-untyped-def]
    limiter = RateLimiter(REDIS_URL, timeout=2.0)
    calls = 0
    run = limiter.redis.run

    async def counted(*args: object) -> object:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)  # a distant Redis
        return await run(*args)

    limiter.redis.run = counted  # type: ignore[method-assign]
    rate = Rate(limit=100_000, period=1, burst=40)  # leases of 2: smaller than the crowd
    try:
        decisions = await asyncio.gather(*(limiter.decide("route:r", "k", rate) for _ in range(30)))
    finally:
        await limiter.aclose()
    assert all(d.allowed for d in decisions)
    assert calls <= 3  # one lease for the whole crowd, not one round trip per 2 requests
