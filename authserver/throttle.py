"""Throttling of failed client authentication, per presented client_id and per IP.

Addresses are counted per IPv4 address and per IPv6 /64. After a few free
failures, each further failure locks the key for a time that
doubles from 1 s up to ``max_lock``; while either key of a request is locked, the
request is refused before its credentials are looked at. Any presented client_id is
a key, configured or not, so throttling does not tell which ids exist. A success
clears the client_id's failures (never the IP's: one good client must not launder
an address that sprays guesses).

:class:`MemoryThrottle` keeps the counts in this process, in two bounded TTL maps;
a shared implementation (Redis) can replace it behind :class:`AuthThrottle`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cachetools import TTLCache

from authserver.config import ClientAuthThrottle

FIRST_LOCK = 1.0  # seconds; doubles with every further failure up to max_lock
MAX_TRACKED = 50_000  # keys per map; the least recently failed are forgotten first


class AuthThrottle(Protocol):
    policy: ClientAuthThrottle

    def retry_after(self, client_id: str | None, ip: str | None) -> int | None:
        """Whole seconds until neither key is locked; None when neither is."""
        ...

    def failed(self, client_id: str | None, ip: str | None) -> None: ...

    def succeeded(self, client_id: str) -> None: ...


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
        locked_until = 0.0
        if count > self.free:
            exponent = min(count - self.free - 1, 32)
            locked_until = now + min(FIRST_LOCK * 2**exponent, self.max_lock)
        self.entries[key] = _Failures(count, locked_until)

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

    def retry_after(self, client_id: str | None, ip: str | None) -> int | None:
        wait = 0.0
        if client_id is not None and self.policy.failures:
            wait = self._clients.locked_for(_client_key(client_id))
        if ip is not None and self.policy.ip_failures:
            wait = max(wait, self._ips.locked_for(address_key(ip)))
        return max(1, math.ceil(wait)) if wait > 0 else None

    def failed(self, client_id: str | None, ip: str | None) -> None:
        if client_id is not None and self.policy.failures:
            self._clients.failed(_client_key(client_id))
        if ip is not None and self.policy.ip_failures:
            self._ips.failed(address_key(ip))

    def succeeded(self, client_id: str) -> None:
        self._clients.forget(_client_key(client_id))


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
