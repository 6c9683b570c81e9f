"""What a running server signs and verifies with, per authorization server.

A :class:`KeyRing` holds one immutable :class:`KeySet` per server, rebuilt when the
store's key records change (``keys rotate`` from another process) or when the
schedule crosses a boundary (a next key activates, a retired key leaves).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from authserver.config import ServerConfig
from authserver.keys import KeyManager, SigningKey, key_schedule, next_change
from authserver.store import KeyRecord
from tokengate.asgi import json_bytes


@dataclass(frozen=True, slots=True)
class KeySet:
    signer: SigningKey
    published: dict[str, SigningKey]  # kid -> key, every key in the JWKS
    jwks_body: bytes
    records: tuple[KeyRecord, ...]
    valid_until: float


class KeyRing:
    def __init__(
        self,
        manager: KeyManager,
        servers: tuple[ServerConfig, ...],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manager = manager
        self.servers = {s.name: s for s in servers}
        self.clock = clock
        self._sets: dict[str, KeySet] = {}
        self.read_at = float("-inf")  # when the store's key records were last read

    def start(self) -> list[KeyRecord]:
        """Ensure every server has a key (first start) and load them all."""
        created = [r for s in self.servers.values() if (r := self.manager.ensure(s))]
        self.reload()
        return created

    def reload(self) -> list[str]:
        """Re-read key records; rebuild the servers whose keys changed. Names them."""
        changed = []
        self.read_at = self.clock()
        for name, server in self.servers.items():
            records = tuple(self.manager.store.keys(name))
            current = self._sets.get(name)
            if current is None or current.records != records:
                self._sets[name] = self._build(server, records)
                changed.append(name)
        return changed

    def missing(self) -> list[str]:
        """Servers without loaded keys (before the first start, or never)."""
        return [name for name in self.servers if name not in self._sets]

    def current(self, name: str) -> KeySet:
        keys = self._sets[name]
        if self.clock() >= keys.valid_until:
            keys = self._sets[name] = self._build(self.servers[name], keys.records)
        return keys

    def _build(self, server: ServerConfig, records: tuple[KeyRecord, ...]) -> KeySet:
        now = self.clock()
        statuses = key_schedule(
            records, now, token_ttl=server.access_token_ttl, leeway=self.manager.leeway
        )
        published = {
            s.record.kid: self.manager.signing_key(s.record) for s in statuses if s.published
        }
        active = next((s.record for s in statuses if s.state == "active"), None)
        if active is None:
            raise RuntimeError(f"authorization server {server.name!r} has no active key")
        return KeySet(
            signer=published[active.kid],
            published=published,
            jwks_body=json_bytes({"keys": [k.jwk for k in published.values()]}),
            records=records,
            valid_until=next_change(statuses, now),
        )
