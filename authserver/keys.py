"""Signing keys: generation, storage, RFC 7638 thumbprints, and the rotation schedule.

A key's private part is sealed into the store under the key encryption key when one
is configured (required with PostgreSQL: every replica reads the same keys), else kept
as a file of the data dir (the SQLite default).

A key's state is derived from times alone, so every worker process agrees on it
without coordination:

- ``next``: published in the JWKS, not yet signing (``activate_at`` in the future).
  ``keys rotate`` schedules it one JWKS cache lifetime (plus the reload interval)
  ahead, so every cache holds it before the first token it signs.
- ``active``: the newest key whose ``activate_at`` has passed; it signs.
- ``retired``: superseded; still published until every token it signed has expired
  (``retired_at + access_token_ttl + leeway``).
- ``expired``: no longer published; removed at the next rotation.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from authserver import keyseal
from authserver.config import ServerConfig
from authserver.store import KeyRecord, Store
from tokengate.jsonlog import rfc3339

# How often a running server re-reads key records; `keys rotate` from another process
# takes effect within this many seconds.
RELOAD_INTERVAL = 2
RSA_BITS = 2048

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
KeyState = Literal["next", "active", "retired", "expired"]
_ALGORITHMS = get_default_algorithms()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_b64(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8 or 1, "big"))


# --------------------------------------------------------------------------- keys


def generate_private_key(alg: str) -> PrivateKey:
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported signing algorithm {alg!r}")


def public_members(private_key: PrivateKey) -> dict[str, str]:
    """The RFC 7638 required members of the public JWK, nothing else."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        numbers = private_key.public_key().public_numbers()
        return {"e": _int_b64(numbers.e), "kty": "RSA", "n": _int_b64(numbers.n)}
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        point = private_key.public_key().public_numbers()
        return {
            "crv": "P-256",
            "kty": "EC",
            "x": b64url(point.x.to_bytes(32, "big")),
            "y": b64url(point.y.to_bytes(32, "big")),
        }
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}


def thumbprint(members: dict[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, no whitespace."""
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode()).digest())


class KeyFiles:
    """Private keys as PKCS#8 PEM files, mode 0600, under ``data_dir/keys/<server>/``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "keys"

    def path(self, server: str, kid: str) -> Path:
        return self.root / server / f"{kid}.pem"

    def write(self, server: str, kid: str, private_key: PrivateKey) -> None:
        target = self.path(server, kid)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)

    def read(self, server: str, kid: str) -> PrivateKey:
        data = self.path(server, kid).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, PrivateKey):
            raise ValueError(f"unsupported key type in {self.path(server, kid)}")
        return key

    def delete(self, server: str, kid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(server, kid).unlink()


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True, slots=True)
class KeyStatus:
    record: KeyRecord
    state: KeyState
    retired_at: int | None = None
    unpublish_at: int | None = None

    @property
    def published(self) -> bool:
        return self.state != "expired"


def key_schedule(
    records: Iterable[KeyRecord], now: float, *, token_ttl: int, leeway: int
) -> list[KeyStatus]:
    """Each key's state at ``now``, oldest first. Pure."""
    ordered = sorted(records, key=lambda r: (r.activate_at, r.seq))
    live = [r for r in ordered if r.activate_at <= now]
    out: list[KeyStatus] = []
    for i, record in enumerate(live):
        if i == len(live) - 1:
            out.append(KeyStatus(record, "active"))
            continue
        retired_at = live[i + 1].activate_at
        unpublish_at = retired_at + token_ttl + leeway
        state: KeyState = "retired" if now < unpublish_at else "expired"
        out.append(KeyStatus(record, state, retired_at, unpublish_at))
    out.extend(KeyStatus(r, "next") for r in ordered if r.activate_at > now)
    return out


def next_change(statuses: Iterable[KeyStatus], now: float) -> float:
    """When the schedule next changes state by the passing of time alone."""
    times = [s.record.activate_at for s in statuses if s.state == "next"]
    times += [s.unpublish_at for s in statuses if s.state == "retired" and s.unpublish_at]
    return min((t for t in times if t > now), default=float("inf"))


# --------------------------------------------------------------------------- signing


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A loaded key: signs compact JWS with a precomputed header, and verifies."""

    kid: str
    alg: str
    private_key: PrivateKey = field(repr=False)
    jwk: dict[str, str] = field(compare=False)
    _prefix: bytes = field(repr=False, compare=False)  # access tokens: typ at+jwt
    _id_prefix: bytes = field(default=b"", repr=False, compare=False)  # ID tokens: typ JWT

    @classmethod
    def load(cls, kid: str, alg: str, private_key: PrivateKey) -> SigningKey:
        members = public_members(private_key)
        jwk = {**members, "use": "sig", "alg": alg, "kid": kid}
        return cls(
            kid=kid,
            alg=alg,
            private_key=private_key,
            jwk=jwk,
            _prefix=_header_prefix({"alg": alg, "kid": kid, "typ": "at+jwt"}),
            _id_prefix=_header_prefix({"alg": alg, "kid": kid, "typ": "JWT"}),
        )

    @property
    def public_key(self) -> Any:
        return self.private_key.public_key()

    def sign(self, claims: dict[str, Any]) -> str:
        """An RFC 9068 access token (``typ: at+jwt``)."""
        return self._sign(self._prefix, claims)

    def sign_id_token(self, claims: dict[str, Any]) -> str:
        """An OpenID Connect ID token (``typ: JWT``): never mistaken for an access token
        by a resource server that requires ``at+jwt`` (RFC 9068 section 4)."""
        return self._sign(self._id_prefix, claims)

    def _sign(self, prefix: bytes, claims: dict[str, Any]) -> str:
        payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode()
        signing_input = prefix + b64url(payload).encode()
        signature = _ALGORITHMS[self.alg].sign(signing_input, self.private_key)  # type: ignore[arg-type]
        return f"{signing_input.decode()}.{b64url(signature)}"


def _header_prefix(header: dict[str, str]) -> bytes:
    return b64url(json.dumps(header, separators=(",", ":")).encode()).encode() + b"."


# --------------------------------------------------------------------------- manager


class KeyManager:
    """Creates, rotates, prunes and loads one store's keys (I/O lives here)."""

    def __init__(
        self,
        store: Store,
        files: KeyFiles,
        *,
        jwks_max_age: int,
        leeway: int,
        clock: Callable[[], float] = time.time,
        kek: bytes | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.kek = kek
        self.jwks_max_age = jwks_max_age
        self.leeway = leeway
        self.clock = clock
        self._loaded: dict[tuple[str, str], SigningKey] = {}

    @property
    def rotation_lead(self) -> int:
        """How far ahead of signing a next key is published."""
        return self.jwks_max_age + RELOAD_INTERVAL

    def schedule(self, server: ServerConfig) -> list[KeyStatus]:
        return key_schedule(
            self.store.keys(server.name),
            self.clock(),
            token_ttl=server.access_token_ttl,
            leeway=self.leeway,
        )

    def ensure(self, server: ServerConfig) -> KeyRecord | None:
        """Give ``server`` a key of its configured algorithm, once, across processes.

        Returns the record it created, or None when a fitting key already exists.
        """
        with self.store.exclusive():
            for status in self.schedule(server):
                if status.state in ("active", "next") and status.record.alg == server.signing_alg:
                    return None
            return self._create(server, activate_at=int(self.clock()))

    def rotate(self, server: ServerConfig) -> KeyRecord:
        """Publish a next key now; it starts signing after ``rotation_lead`` seconds."""
        with self.store.exclusive():
            self.ensure(server)  # a first rotation on a fresh data dir needs an active key
            pending = [s for s in self.schedule(server) if s.state == "next"]
            if pending:
                raise RotationPending(server.name, pending[0].record)
            self.prune(server)
            return self._create(server, activate_at=int(self.clock()) + self.rotation_lead)

    def rotate_if_due(self, server: ServerConfig, every: int) -> KeyRecord | None:
        """Scheduled rotation: publish the next key ``rotation_lead`` seconds before the
        active one has signed for ``every`` seconds. Under the store's lock, so of all
        replicas checking at once exactly one publishes it; None when nothing was due."""
        if not rotation_due(self.schedule(server), self.clock(), every, self.rotation_lead):
            return None
        with self.store.exclusive():
            if not rotation_due(self.schedule(server), self.clock(), every, self.rotation_lead):
                return None  # another replica published it meanwhile
            self.prune(server)
            return self._create(server, activate_at=int(self.clock()) + self.rotation_lead)

    def prune(self, server: ServerConfig) -> list[KeyRecord]:
        """Forget keys that have left the JWKS for good."""
        removed = []
        with self.store.exclusive():
            for status in self.schedule(server):
                if status.state == "expired":
                    self.store.remove_key(server.name, status.record.kid)
                    self.files.delete(server.name, status.record.kid)
                    removed.append(status.record)
        return removed

    def _create(self, server: ServerConfig, *, activate_at: int) -> KeyRecord:
        private_key = generate_private_key(server.signing_alg)
        kid = thumbprint(public_members(private_key))
        record = KeyRecord(server.name, kid, server.signing_alg, int(self.clock()), activate_at)
        if self.kek is None:
            self.files.write(server.name, kid, private_key)
            self.store.add_key(record)
        else:
            self._check_kek()
            der = private_key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            self.store.add_key(record, keyseal.seal(self.kek, server.name, kid, der))
        return record

    def _check_kek(self) -> None:
        """KeyUnsealError unless the key encryption key opens the newest key already
        sealed in the store: a key sealed under another one would be published, and
        then stop every replica from loading the keys (and from starting)."""
        assert self.kek is not None
        for record in reversed(self.store.keys()):
            sealed = self.store.private_key(record.server, record.kid)
            if sealed is not None:
                keyseal.unseal(self.kek, record.server, record.kid, sealed)
                return

    def signing_key(self, record: KeyRecord) -> SigningKey:
        """The loaded key for ``record``, read once per process: from the store,
        unsealed, or from its file. A key that does not open is KeyUnsealError, never
        replaced by a new one."""
        cache_key = (record.server, record.kid)
        key = self._loaded.get(cache_key)
        if key is None:
            key = SigningKey.load(record.kid, record.alg, self._private_key(record))
            self._loaded[cache_key] = key
        return key

    def _private_key(self, record: KeyRecord) -> PrivateKey:
        sealed = self.store.private_key(record.server, record.kid)
        if sealed is None:
            return self.files.read(record.server, record.kid)
        if self.kek is None:
            raise keyseal.KeyUnsealError(
                f"signing key {record.kid} of server {record.server!r} is sealed in the "
                "store: set authserver.key_encryption_key to the key it was sealed with"
            )
        der = keyseal.unseal(self.kek, record.server, record.kid, sealed)
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, PrivateKey):
            raise keyseal.KeyUnsealError(f"unsupported key type in signing key {record.kid}")
        return key


def rotation_due(statuses: Iterable[KeyStatus], now: float, every: int, lead: int) -> bool:
    """Whether the next key should be published now: the active key will have signed
    for ``every`` seconds within ``lead``, and no next key is waiting. Pure."""
    statuses = list(statuses)
    if any(s.state == "next" for s in statuses):
        return False
    active = next((s.record for s in statuses if s.state == "active"), None)
    return active is not None and now >= active.activate_at + every - lead


class RotationPending(Exception):
    def __init__(self, server: str, record: KeyRecord) -> None:
        super().__init__(
            f"server {server!r} already has a next key {record.kid} "
            f"(it starts signing at {rfc3339(record.activate_at)}); rotate again after that"
        )
        self.record = record
