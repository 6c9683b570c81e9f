"""Throttling of failed client authentication, per presented client_id and per IP.

Addresses are counted per IPv4 address and per IPv6 /64. After a few free
failures, each further failure locks the key for a time that
doubles from 1 s up to ``max_lock``; while either key of a request is locked, the
request is refused before its credentials are looked at. Any presented client_id is
a key, configured or not, so throttling does not tell which ids exist. A success
clears the client_id's failures (never the IP's: one good client must not launder
an address that sprays guesses).

:class:`MemoryThrottle` keeps the counts in this process, in two bounded TTL maps.
:class:`RedisThrottle` keeps them in the shared Redis when ``redis:`` is configured,
so that every replica and worker counts the same failures: one Lua script per
operation (:data:`CHECK_LUA`, :data:`FAIL_LUA`, :data:`FORGET_LUA`), atomic and on
the Redis server's clock, keys ``tokengate:th:{scope}:{kind}:{key}`` that expire
``reset_after`` the last failure. While Redis is down or slow it falls back to a
:class:`MemoryThrottle` of its own (see :mod:`tokengate.redislink`): a request is
never refused because Redis is down. :func:`lock_after` is the arithmetic of both.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import TTLCache

from authserver.config import ClientAuthThrottle
from tokengate.redislink import RedisLink, RedisUnavailable

MICROS = 1_000_000
FIRST_LOCK = 1.0  # seconds; doubles with every further failure up to max_lock
MAX_TRACKED = 50_000  # keys per map; the least recently failed are forgotten first


class AuthThrottle(Protocol):
    policy: ClientAuthThrottle

    async def retry_after(self, client_id: str | None, ip: str | None) -> int | None:
        """Whole seconds until neither key is locked; None when neither is."""
        ...

    async def failed(self, client_id: str | None, ip: str | None) -> None: ...

    async def succeeded(self, client_id: str) -> None: ...


def lock_after(count: int, free: int, max_lock: float) -> float:
    """Seconds a key is locked for after its ``count``-th failure in a row: none for
    the ``free`` first, then 1 s, doubling up to ``max_lock``. :data:`FAIL_LUA` is the
    same arithmetic inside Redis (in microseconds)."""
    if count <= free:
        return 0.0
    return min(FIRST_LOCK * 2 ** min(count - free - 1, 32), max_lock)


def wait_s(wait: float) -> int | None:
    """``Retry-After``: whole seconds, at least 1, of a wait; None when there is none."""
    return max(1, math.ceil(wait)) if wait > 0 else None


@dataclass(frozen=True, slots=True)
class _Failures:
    count: int
    locked_until: float


class _Counter:
    """Failures per key: a bounded map whose entries expire ``reset_after`` the last one."""

    def __init__(
        self, free: int, policy: ClientAuthThrottle, clock: Callable[[], float], max_tracked: int
    ) -> None:
        self.free = free
        self.max_lock = policy.max_lock
        self.clock = clock
        self.entries: TTLCache[bytes | str, _Failures] = TTLCache(
            maxsize=max_tracked, ttl=policy.reset_after, timer=clock
        )

    def locked_for(self, key: bytes | str) -> float:
        entry = self.entries.get(key)
        return 0.0 if entry is None else max(0.0, entry.locked_until - self.clock())

    def failed(self, key: bytes | str) -> None:
        now = self.clock()
        entry = self.entries.get(key)
        if entry is not None and entry.locked_until > now:
            return  # refused unseen while locked; a lock is never extended by waiting it out
        count = 1 if entry is None else entry.count + 1
        lock = lock_after(count, self.free, self.max_lock)
        self.entries[key] = _Failures(count, now + lock if lock else 0.0)

    def forget(self, key: bytes | str) -> None:
        self.entries.pop(key, None)


class MemoryThrottle:
    """:class:`AuthThrottle` for one process; memory bounded by ``max_tracked`` keys."""

    def __init__(
        self,
        policy: ClientAuthThrottle,
        *,
        clock: Callable[[], float] = time.time,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.policy = policy
        self._clients = _Counter(policy.failures, policy, clock, max_tracked)
        self._ips = _Counter(policy.ip_failures, policy, clock, max_tracked)

    async def retry_after(self, client_id: str | None, ip: str | None) -> int | None:
        wait = 0.0
        if client_id is not None and self.policy.failures:
            wait = self._clients.locked_for(_client_key(client_id))
        if ip is not None and self.policy.ip_failures:
            wait = max(wait, self._ips.locked_for(address_key(ip)))
        return wait_s(wait)

    async def failed(self, client_id: str | None, ip: str | None) -> None:
        if client_id is not None and self.policy.failures:
            self._clients.failed(_client_key(client_id))
        if ip is not None and self.policy.ip_failures:
            self._ips.failed(address_key(ip))

    async def succeeded(self, client_id: str) -> None:
        self._clients.forget(_client_key(client_id))


# The scripts keep, per key, a hash {c: failures in a row, u: locked until (us on the
# server's clock, 0 when not locked)}. Integers in microseconds stay exact in Lua's
# doubles; string.format keeps them from being printed in exponent form.

# KEYS: the request's keys. Returns the longest wait of them, in microseconds (>= 0),
# whether KEYS[1] holds failures (1 or 0), and how many of KEYS do.
CHECK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
for i = 1, #KEYS do
  local u = tonumber(redis.call('HGET', KEYS[i], 'u') or 0)
  if u - now > wait then wait = u - now end
end
local first, counted = redis.call('EXISTS', KEYS[1]), redis.call('EXISTS', unpack(KEYS))
return {string.format('%.0f', wait), first, counted}
"""

# KEYS: the keys that failed; ARGV[i]: the free failures of KEYS[i]; then max_lock (us),
# reset_after (ms). A locked key is left as it is (a lock is never extended by
# failures while it holds). Returns the number of keys counted.
FAIL_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local max_lock = tonumber(ARGV[n + 1])
local reset_ms = tonumber(ARGV[n + 2])
local counted = 0
for i = 1, n do
  local entry = redis.call('HMGET', KEYS[i], 'c', 'u')
  local u = tonumber(entry[2] or 0)
  if u <= now then
    local count = tonumber(entry[1] or 0) + 1
    local free = tonumber(ARGV[i])
    local until_us = 0
    if count > free then
      local lock = 1000000 * 2 ^ math.min(count - free - 1, 32)
      if lock > max_lock then lock = max_lock end
      until_us = now + lock
    end
    redis.call('HSET', KEYS[i], 'c', count, 'u', string.format('%.0f', until_us))
    redis.call('PEXPIRE', KEYS[i], reset_ms)
    counted = counted + 1
  end
end
return counted
"""

# KEYS[1]: a client_id's key, forgotten after a success.
FORGET_LUA = "return redis.call('DEL', KEYS[1])"

TH_PREFIX = "tokengate:th:"
CLEAR_MEMORY = 1.0  # seconds a process trusts Redis's "no failures" for one request's keys


class RedisThrottle:
    """:class:`AuthThrottle` shared through Redis; ``scope`` tells apart throttles
    that count different failures (client authentication, sign-in) on one Redis."""

    def __init__(
        self,
        policy: ClientAuthThrottle,
        link: RedisLink,
        scope: str,
        *,
        clock: Callable[[], float] = time.time,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.policy = policy
        self.link = link
        self.scope = scope
        self.local = MemoryThrottle(policy, clock=clock, max_tracked=max_tracked)
        # client keys with failures in Redis, as this process last saw: only those
        # cost a success a round trip to clear (most successes have none to clear)
        self._counted: TTLCache[str, bool] = TTLCache(
            maxsize=max_tracked, ttl=policy.reset_after, timer=clock
        )
        # requests whose keys Redis said hold no failures at all, for CLEAR_MEMORY:
        # a busy, well-behaved client is not asked about every second; any failure
        # here forgets its entry, so a guesser gets at most one unasked try a second
        self._clear: TTLCache[tuple[str, ...], bool] = TTLCache(
            maxsize=max_tracked, ttl=CLEAR_MEMORY, timer=clock
        )

    def client_key(self, client_id: str) -> str:
        return f"{TH_PREFIX}{self.scope}:id:{_client_key(client_id).hex()}"

    def ip_key(self, ip: str) -> str:
        key = address_key(ip)
        if len(key) > 64:  # not an address: whatever a trusted proxy passed on
            key = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return f"{TH_PREFIX}{self.scope}:ip:{key}"

    def _keys(self, client_id: str | None, ip: str | None) -> tuple[list[str], list[int]]:
        """The request's throttled keys and the free failures of each."""
        keys, free = [], []
        if client_id is not None and self.policy.failures:
            keys.append(self.client_key(client_id))
            free.append(self.policy.failures)
        if ip is not None and self.policy.ip_failures:
            keys.append(self.ip_key(ip))
            free.append(self.policy.ip_failures)
        return keys, free

    async def retry_after(self, client_id: str | None, ip: str | None) -> int | None:
        keys, _ = self._keys(client_id, ip)
        if not keys:
            return None
        request = tuple(keys)
        if request in self._clear:
            return None
        try:
            wait_us, first_counted, counted = await self.link.run(CHECK_LUA, keys, [])
        except RedisUnavailable:
            return await self.local.retry_after(client_id, ip)
        if first_counted and client_id is not None and self.policy.failures:
            self._counted[keys[0]] = True
        if not counted:
            self._clear[request] = True
        return wait_s(int(wait_us) / MICROS)

    async def failed(self, client_id: str | None, ip: str | None) -> None:
        keys, free = self._keys(client_id, ip)
        if not keys:
            return
        max_lock_us = round(self.policy.max_lock * MICROS)
        reset_ms = max(1, math.ceil(self.policy.reset_after * 1000))
        self._clear.pop(tuple(keys), None)
        if client_id is not None and self.policy.failures:
            self._counted[keys[0]] = True
        try:
            await self.link.run(FAIL_LUA, keys, [*free, max_lock_us, reset_ms])
        except RedisUnavailable:
            await self.local.failed(client_id, ip)

    async def succeeded(self, client_id: str) -> None:
        """Clear the client's failures: in Redis only when its check (or a failure
        here) saw some, so a client that never fails costs one round trip, not two."""
        key = self.client_key(client_id)
        if self._counted.pop(key, False):
            with contextlib.suppress(RedisUnavailable):
                await self.link.run(FORGET_LUA, [key], [])
        await self.local.succeeded(client_id)  # failures counted here while Redis was down


def throttle_link(redis_url: str | None, **kwargs: Any) -> RedisLink:
    """The link the throttles of one process share (``redis_url`` None: none shared)."""
    return RedisLink(
        redis_url,
        name="throttle",
        degraded="throttle: redis unavailable, failed authentications counted per process",
        down_action="failed authentications are counted per process until Redis answers again",
        up_action="failed authentications are counted across processes again",
        **kwargs,
    )


def make_throttle(
    policy: ClientAuthThrottle,
    link: RedisLink | None,
    scope: str,
    *,
    clock: Callable[[], float] = time.time,
) -> AuthThrottle:
    """Shared through Redis when it is configured, else per process."""
    if link is not None and link.configured:
        return RedisThrottle(policy, link, scope, clock=clock)
    return MemoryThrottle(policy, clock=clock)


def address_key(ip: str) -> str:
    """What counts as one address: an IPv4 address, or an IPv6 /64 (one host's
    interface usually holds a whole /64, so single IPv6 addresses cost nothing)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


def _client_key(client_id: str) -> bytes:
    """A fixed-size key: a presented client_id may be any string up to the body limit."""
    return hashlib.blake2b(client_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
