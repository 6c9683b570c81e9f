"""Rate limits: GCRA decisions, shared through Redis when configured, else per process.

GCRA (the generic cell rate algorithm) keeps one number per key, the theoretical
arrival time (TAT) of the next request. A rate of ``limit`` per ``period`` gives an
emission interval ``T = period / limit``; ``burst`` requests may arrive at once. A
request at ``now`` is admitted when ``max(TAT, now) + T - now <= burst * T``, and
then the TAT moves to ``max(TAT, now) + T``. :func:`gcra` is that decision, pure.

:class:`RateLimiter` takes it in two places:

* with ``redis:``, one Lua script per decision (:data:`GCRA_LUA`, the same
  arithmetic, on the Redis server's clock so every replica agrees), registered once
  and run by EVALSHA; keys ``tokengate:rl:{scope}:{key}`` expire when the TAT passes.
  For a large burst a process takes a few cells at once (a lease: 1/20 of the burst,
  at most :data:`LEASE_MAX`, or as many as requests are waiting for it) and spends
  them without asking again, for no longer than the cells stand for (their count
  times the interval, between :data:`LEASE_MIN_TTL` and :data:`LEASE_TTL`): every
  admitted request comes out of the one shared budget, so over any window the fleet
  admits at most what GCRA allows plus one lease, or ``rate * LEASE_MIN_TTL`` when
  that is more; what a lease leaves unspent is admitted to no one;
* without Redis, or while Redis is down or slow (over ``timeout`` per decision), in a
  bounded per-process map. Requests are never refused because Redis is down: the
  limit falls back to per process. :class:`~tokengate.redislink.RedisLink` keeps
  that bookkeeping: an episode is said once on stderr
  (``ratelimit.redis_unavailable``), listed as degraded in ``/readyz``, and a
  background task retries with backoff until ``ratelimit.redis_recovered``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from tokengate.redislink import (
    REDIS_TIMEOUT,
    RETRY_FIRST,
    RETRY_MAX,
    RedisLink,
    RedisUnavailable,
)
from tokengate.yamlconf import ConfigError, Node, as_str, positive_int

MICROS = 1_000_000
MAX_LOCAL_KEYS = 100_000  # per-process limiter state; least recently used forgotten first
LEASE_SHARE = 20  # a lease takes at most 1/20 of a key's burst ...
LEASE_MAX = 64  # ... and at most this many cells
LEASE_TTL = 0.5  # seconds a lease's cells may be spent, at most ...
LEASE_MIN_TTL = 0.05  # ... and at least (when their count times the interval is less)
KEY_PREFIX = "tokengate:rl:"
_PERIODS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hour": 3600}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(s|sec|min|m|h|hour)\s*")


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` requests per ``period`` seconds, ``burst`` of them at once."""

    limit: int
    period: int  # seconds: 1, 60 or 3600
    burst: int

    @property
    def interval_us(self) -> int:
        """The emission interval T in microseconds (at least 1)."""
        return max(1, self.period * MICROS // self.limit)

    @property
    def window(self) -> int:
        """Seconds for an empty bucket to refill (the ``w`` of RateLimit-Policy)."""
        return max(1, math.ceil(self.burst * self.interval_us / MICROS))

    def __str__(self) -> str:
        unit = {1: "s", 60: "min", 3600: "h"}[self.period]
        return f"{self.limit}/{unit}"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int  # the burst: requests a fresh key may make at once
    remaining: int  # requests that could be made now, after this one
    retry_after: float  # seconds until one more would be admitted (0 when allowed)
    reset_after: float  # seconds until the key is back to a full burst

    @property
    def retry_after_s(self) -> int:
        """``Retry-After`` in whole seconds, at least 1."""
        return max(1, math.ceil(self.retry_after))

    @property
    def reset_s(self) -> int:
        """``t`` of the RateLimit field: whole seconds until the quota is full again."""
        return max(0, math.ceil(self.reset_after))


def gcra(tat_us: int | None, now_us: int, interval_us: int, burst: int) -> tuple[Decision, int]:
    """Decide one request at ``now_us``; returns the decision and the new TAT.

    ``tat_us``: the key's theoretical arrival time (None: never seen, or expired).
    Times are integer microseconds on any one clock. Refused requests leave the TAT
    as it was. :data:`GCRA_LUA` is the same arithmetic inside Redis."""
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    new_tat = tat + interval_us
    tolerance = burst * interval_us
    if new_tat - now_us > tolerance:
        return outcome(False, tat - now_us, interval_us, burst), tat
    return outcome(True, new_tat - now_us, interval_us, burst), new_tat


def outcome(allowed: bool, ahead_us: int, interval_us: int, burst: int) -> Decision:
    """A decision from how far the key's TAT is ahead of now (after it, when allowed)."""
    tolerance = burst * interval_us
    remaining = max(0, (tolerance - ahead_us) // interval_us)
    retry = 0 if allowed else ahead_us + interval_us - tolerance
    return Decision(allowed, burst, remaining, max(0, retry) / MICROS, max(0, ahead_us) / MICROS)


# KEYS[1] the key; ARGV[1] interval (us), ARGV[2] burst, ARGV[3] cells wanted (default
# 1). Returns {cells admitted, ahead_us}: as many of those wanted as the bucket holds
# (0: refused), and how far the TAT is ahead of the server's now after the decision.
# With one cell wanted this is gcra() exactly. Integers in microseconds stay exact in
# Lua's doubles (below 2^53); string.format keeps them from exponent form.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3] or '1')
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local room = math.floor((burst * interval - (tat - now)) / interval)
local cells = math.min(want, room)
if cells < 1 then
  return {0, tat - now}
end
local new_tat = tat + cells * interval
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {cells, new_tat - now}
"""


_LOCAL = object()  # a lease request's answer to its waiters: Redis failed, decide here


def lease_size(rate: Rate) -> int:
    """Cells a process takes from Redis at once for a key under ``rate``."""
    return max(1, min(LEASE_MAX, rate.burst // LEASE_SHARE))


@dataclass(slots=True)
class Lease:
    """Cells taken from the shared budget, not spent yet; and the decision Redis gave
    when they were taken (its remaining and reset, as of then)."""

    left: int
    until: float  # this process's clock
    taken_at: float
    decision: Decision

    def spend(self, now: float) -> Decision | None:
        if self.left < 1 or now >= self.until:
            return None
        self.left -= 1
        base = self.decision
        return Decision(
            True,
            base.limit,
            base.remaining + self.left,
            0.0,
            max(0.0, base.reset_after - (now - self.taken_at)),
        )


def redis_key(scope: str, key: str) -> str:
    """``tokengate:rl:{scope}:{key}``; a long key (a ``sub``) is hashed to 32 hex digits."""
    if len(key) > 64:
        key = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"{KEY_PREFIX}{scope}:{key}"


class LocalLimiter:
    """GCRA in this process: a bounded map of TATs; an entry leaves when its TAT passes."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_LOCAL_KEYS
    ):
        self.clock = clock
        # an entry is worth keeping for at most an hour (the longest period) past its
        # last update: a TAT never runs further ahead than burst * interval = period
        self.tats: TTLCache[str, int] = TTLCache(maxsize=max_keys, ttl=3600, timer=clock)

    def decide(self, key: str, rate: Rate) -> Decision:
        now = int(self.clock() * MICROS)
        decision, tat = gcra(self.tats.get(key), now, rate.interval_us, rate.burst)
        if decision.allowed:
            self.tats[key] = tat
        return decision


class RateLimiter:
    """Decides rate limits for one process: in Redis when ``redis_url`` is set and
    Redis answers within ``timeout``, else in this process (see the module doc)."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        timeout: float = REDIS_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_LOCAL_KEYS,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
        on_fallback: Callable[[], None] = lambda: None,
    ) -> None:
        self.redis_url = redis_url
        self.clock = clock
        self.local = LocalLimiter(clock=clock, max_keys=max_keys)
        self.leases: TTLCache[str, Lease] = TTLCache(maxsize=max_keys, ttl=LEASE_TTL, timer=clock)
        self.flights: dict[str, asyncio.Future[Decision | object | None]] = {}  # on their way
        self.demand: dict[str, int] = {}  # requests deciding each leased key right now
        self.on_fallback = on_fallback  # a decision made here although Redis is configured
        self.redis = RedisLink(
            redis_url,
            name="ratelimit",
            degraded="ratelimit: redis unavailable, limits hold per process",
            down_action="rate limits hold per process until Redis answers again",
            up_action="rate limits are shared again",
            timeout=timeout,
            clock=clock,
            retry_first=retry_first,
            retry_max=retry_max,
        )

    @property
    def shared(self) -> bool:
        """Whether decisions are cluster-wide right now."""
        return self.redis.shared

    @property
    def redis_down(self) -> bool:
        """An episode of Redis failures is in progress."""
        return self.redis.redis_down

    async def decide(self, scope: str, key: str, rate: Rate) -> Decision:
        """Admit or refuse one request of ``key`` under ``rate``; never raises for Redis."""
        full_key = redis_key(scope, key)
        if self.redis_url is None:
            return self.local.decide(full_key, rate)
        want = lease_size(rate)
        if want == 1:  # a small burst: every decision in Redis, as many at once as come
            return (await self._in_redis(full_key, rate, 1))[0]
        self.demand[full_key] = self.demand.get(full_key, 0) + 1
        try:
            return await self._leased(full_key, rate, want)
        finally:
            left = self.demand[full_key] - 1
            if left:
                self.demand[full_key] = left
            else:
                del self.demand[full_key]

    async def _leased(self, full_key: str, rate: Rate, want: int) -> Decision:
        """One lease request per key at a time; requests meanwhile wait for it, and it
        asks for enough cells for them too."""
        while True:
            lease = self.leases.get(full_key)
            if lease is not None:  # cells this process took before: no round trip
                decision = lease.spend(self.clock())
                if decision is not None:
                    return decision
            flight = self.flights.get(full_key)
            if flight is None:
                break
            answer = await asyncio.shield(flight)
            if answer is _LOCAL:  # Redis failed the leader a moment ago: decide here
                self.on_fallback()
                return self.local.decide(full_key, rate)
            if answer is not None:  # the bucket was empty a moment ago: so it is now
                return answer
        flight: asyncio.Future[Decision | object | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.flights[full_key] = flight
        try:
            cells = min(rate.burst, max(want, self.demand[full_key]))
            decision, local = await self._in_redis(full_key, rate, cells)
            flight.set_result(_LOCAL if local else None if decision.allowed else decision)
            return decision
        finally:
            del self.flights[full_key]
            if not flight.done():
                flight.set_result(None)

    async def _in_redis(self, full_key: str, rate: Rate, want: int) -> tuple[Decision, bool]:
        """Up to ``want`` cells from the shared budget: the first decides this request,
        the others are leased to this process; and whether Redis failed (then it was
        decided here)."""
        try:
            cells, ahead = await self.redis.run(
                GCRA_LUA, [full_key], [rate.interval_us, rate.burst, want]
            )
        except RedisUnavailable:
            self.on_fallback()
            return self.local.decide(full_key, rate), True
        decision = outcome(bool(cells), int(ahead), rate.interval_us, rate.burst)
        extra = int(cells) - 1
        if extra < 1:
            return decision, False
        now = self.clock()
        # spent within the time the cells stand for: the fleet stays within GCRA's bound
        ttl = min(LEASE_TTL, max(LEASE_MIN_TTL, int(cells) * rate.interval_us / MICROS))
        self.leases[full_key] = Lease(extra, now + ttl, now, decision)
        total = decision.remaining + extra
        return Decision(True, decision.limit, total, 0.0, decision.reset_after), False

    def degraded(self) -> list[str]:
        """For ``/readyz``: what is wrong while requests are still served."""
        return self.redis.degraded()

    async def aclose(self) -> None:
        await self.redis.aclose()


# --------------------------------------------------------------------------- headers


def ratelimit_headers(name: str, rate: Rate, decision: Decision) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-10/-11):
    the policy's quota ``q`` (the burst) over window ``w`` (seconds to refill it), and
    what is left now, ``r``, with ``t`` the seconds until the quota is full again. A
    refusal adds ``Retry-After``: whole seconds, at least 1, until one more request is
    admitted."""
    headers = [
        (b"ratelimit-policy", f'"{name}";q={decision.limit};w={rate.window}'.encode()),
        (b"ratelimit", f'"{name}";r={decision.remaining};t={decision.reset_s}'.encode()),
    ]
    if not decision.allowed:
        headers.append((b"retry-after", str(decision.retry_after_s).encode()))
    return headers


def okta_headers(decision: Decision, now: float) -> list[tuple[bytes, bytes]]:
    """Okta's ``X-Rate-Limit-Limit``, ``-Remaining`` and ``-Reset`` (Unix time)."""
    return [
        (b"x-rate-limit-limit", str(decision.limit).encode()),
        (b"x-rate-limit-remaining", str(decision.remaining).encode()),
        (b"x-rate-limit-reset", str(math.ceil(now + decision.reset_after)).encode()),
    ]


# --------------------------------------------------------------------------- config


def parse_rate(text: str, path: str) -> tuple[int, int]:
    """``100/s``, ``600/min``, ``5000/h``: (limit, period in seconds)."""
    m = _RATE.fullmatch(text)
    if m is None or int(m.group(1)) < 1:
        raise ConfigError(path, f"must be a rate like 100/s, 600/min or 5000/h, got {text!r}")
    limit = int(m.group(1))
    if limit > 1_000_000:
        raise ConfigError(path, f"must be at most 1000000 per period, got {limit}")
    return limit, _PERIODS[m.group(2)]


def as_rate(node: Node, burst: Node | None = None) -> Rate:
    """A rate string, with an optional ``burst`` (default: the limit)."""
    limit, period = parse_rate(as_str(node), node.path)
    size = positive_int(burst) if burst is not None else limit
    if size > 1_000_000:
        raise ConfigError(
            burst.path if burst else node.path, f"must be at most 1000000, got {size}"
        )
    return Rate(limit, period, size)


def as_redis_url(node: Node) -> str:
    text = as_str(node)
    if not re.match(r"(rediss?|unix)://", text):
        raise ConfigError(node.path, "must be a redis://, rediss:// or unix:// URL")
    try:
        from redis.asyncio.connection import parse_url

        parse_url(text)
    except (ValueError, TypeError):  # its message could quote a password in the URL
        raise ConfigError(node.path, "is not a valid Redis URL") from None
    return text
