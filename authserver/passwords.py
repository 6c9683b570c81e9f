"""User password hashes: argon2id PHC strings, computed and checked off the event loop.

Parameters are OWASP's for argon2id (19 MiB of memory, 2 passes, 1 lane; 24-37 ms
per hash or verification on the machine of docs/users.md). A stored hash made with
weaker parameters, or with another algorithm than argon2id, :func:`needs_rehash`:
the user directory replaces it at the next successful sign-in.

Hashing is slow on purpose, so it never runs on the event loop and never on the
store's thread (a sign-in would hold every store call behind it): a
:class:`PasswordWorker` runs it on a small pool of threads of its own. argon2 releases
the GIL while it works, so the loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import hmac
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

T = TypeVar("T")

MEMORY_KIB = 19456  # OWASP: m=19 MiB, t=2, p=1
TIME_COST = 2
PARALLELISM = 1
HASH_BYTES = 32
SALT_BYTES = 16
MIN_PASSWORD_LENGTH = 8  # characters, when a password is set
MAX_PASSWORD_LENGTH = 1024  # characters: longer ones are refused, and never verified
POOL_THREADS = 2  # each holds MEMORY_KIB while it hashes

# What a configured hash may ask for: beyond these, one sign-in would take seconds.
MAX_MEMORY_KIB = 1024 * 1024
MAX_TIME_COST = 32
MAX_PARALLELISM = 16

_HASHER = PasswordHasher(
    time_cost=TIME_COST,
    memory_cost=MEMORY_KIB,
    parallelism=PARALLELISM,
    hash_len=HASH_BYTES,
    salt_len=SALT_BYTES,
    type=Type.ID,
)
_PHC = re.compile(
    r"\$argon2id\$v=(\d{1,3})\$m=(\d{1,10}),t=(\d{1,10}),p=(\d{1,10})"
    r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)
# A hash of a password nobody knows, with the parameters above: verifying a sign-in
# for a user that does not exist against it costs what a real verification costs.
_DUMMY_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$YWFjuR9mCgrTb4NZzYeWwQ$"
    "yoLuHOkVfCCKT7jNIjldbTIinPq5aJhE4prBHu52c7I"
)


def hash_password(password: str) -> str:
    """A new argon2id PHC string for ``password``, with a random salt."""
    return _HASHER.hash(password)


def verify_password(phc: str, password: str) -> bool:
    """Whether ``password`` matches ``phc``. Never raises: a wrong password, a malformed
    or unsupported hash and an over-long password are all False."""
    if len(password) > MAX_PASSWORD_LENGTH:
        _verify(_DUMMY_HASH, password[:MAX_PASSWORD_LENGTH])  # the same time either way
        return False
    return _verify(phc, password)


def verify_unknown(password: str) -> bool:
    """The work of a verification, for a user that does not exist; always False."""
    _verify(_DUMMY_HASH, password[:MAX_PASSWORD_LENGTH])
    return False


def _verify(phc: str, password: str) -> bool:
    try:
        return _HASHER.verify(phc, password)
    except (VerificationError, InvalidHashError, ValueError, TypeError):
        return False  # argon2's own failures; a hash of another type, a NUL in it


def needs_rehash(phc: str) -> bool:
    """True for a hash that is not argon2id (version 19), or was made with weaker
    parameters (less memory, fewer passes, a shorter salt or output) than ours.
    A stronger hash is kept as it is."""
    if not phc.startswith("$argon2id$"):
        return True
    try:
        p = extract_parameters(phc)
    except InvalidHashError:
        return True
    return (
        p.version != 19
        or p.memory_cost < MEMORY_KIB
        or p.time_cost < TIME_COST
        or p.salt_len < SALT_BYTES
        or p.hash_len < HASH_BYTES
    )


def phc_problem(text: str) -> str | None:
    """What is wrong with ``text`` as a configured argon2id hash, if anything."""
    m = _PHC.fullmatch(text)
    if m is None:
        return (
            "must be an argon2id PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash), "
            "as printed by `tokengate users hash-password`"
        )
    version, memory, time_cost, lanes = (int(g) for g in m.groups()[:4])
    if version != 19:
        return f"must be argon2 version 19 (v=19), got v={version}"
    if not 1 <= lanes <= MAX_PARALLELISM:
        return f"parallelism p must be 1-{MAX_PARALLELISM}, got {lanes}"
    if not 8 * lanes <= memory <= MAX_MEMORY_KIB:
        return f"memory m must be {8 * lanes}-{MAX_MEMORY_KIB} KiB, got {memory}"
    if not 1 <= time_cost <= MAX_TIME_COST:
        return f"time cost t must be 1-{MAX_TIME_COST}, got {time_cost}"
    salt, digest = (_b64_length(g) for g in m.groups()[4:])
    if salt is None or salt < 8:
        return "its salt must be at least 8 bytes of unpadded base64"
    if digest is None or digest < 16:
        return "its hash must be at least 16 bytes of unpadded base64"
    return None


def _b64_length(text: str) -> int | None:
    try:
        return len(base64.b64decode(text + "=" * (-len(text) % 4), validate=True))
    except ValueError:
        return None


def password_problem(password: str) -> str | None:
    """Why ``password`` cannot be set as a user's password, if so (never quoting it)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"must be at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"must be at most {MAX_PASSWORD_LENGTH} characters"
    return None


# --------------------------------------------------------------------------- env passwords

# Keys of this process only: a password from the environment is held sealed under one,
# so no config object, repr, log line or pickle ever holds it in the clear.
_SEAL_KEY = AESGCM(AESGCM.generate_key(bit_length=256))
_FINGERPRINT_KEY = os.urandom(32)


@dataclass(frozen=True, slots=True, eq=False)
class EnvPassword:
    """A user's password from ``password: ${NAME}`` in the config.

    Held sealed (AES-GCM under a key that exists only in this process's memory) and
    opened only to hash it or to check that a stored hash still matches it. Two are
    equal when they hold the same password."""

    variable: str  # the environment variable it came from, for messages
    _sealed: bytes = field(repr=False)
    fingerprint: bytes = field(repr=False)  # HMAC under this process's key: compares

    @classmethod
    def seal(cls, variable: str, password: str) -> EnvPassword:
        nonce = os.urandom(12)
        data = password.encode("utf-8", "surrogatepass")
        return cls(
            variable,
            nonce + _SEAL_KEY.encrypt(nonce, data, None),
            hmac.new(_FINGERPRINT_KEY, data, hashlib.sha256).digest(),
        )

    def reveal(self) -> str:
        """The password, to hash or verify it; never to keep."""
        try:
            data = _SEAL_KEY.decrypt(self._sealed[:12], self._sealed[12:], None)
        except InvalidTag:  # sealed by another process
            raise ValueError(f"the password from {self.variable} was sealed elsewhere") from None
        return data.decode("utf-8", "surrogatepass")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EnvPassword):
            return NotImplemented
        return hmac.compare_digest(self.fingerprint, other.fingerprint)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self) -> Any:
        raise TypeError("a sealed password cannot leave its process")


# --------------------------------------------------------------------------- threads


NICENESS = 19  # the password threads' scheduling priority: the lowest (the loop's is 0)


def _lower_priority() -> None:
    """Run this thread :data:`NICENESS` lower (Linux schedules threads one by one): a
    flood of sign-ins takes the CPU the event loop leaves over, and token requests on
    the loop keep their latency. Elsewhere, or where it is not allowed, nothing."""
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(current + NICENESS, 19))


class PasswordWorker:
    """Runs hashing and verification on a pool of :data:`POOL_THREADS` threads of its
    own: never on the event loop, never on the store's thread, and at a lower priority
    than both (:func:`_lower_priority`)."""

    def __init__(self, threads: int = POOL_THREADS) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="passwords", initializer=_lower_priority
        )

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def run(self, fns: list[Callable[[], T]]) -> list[T]:
        """Each of ``fns`` on the pool, waiting for all (for code off the loop, or at
        start and reload, which wait for the result anyway)."""
        return [f.result() for f in [self._executor.submit(fn) for fn in fns]]

    async def hash(self, password: str) -> str:
        return await self.call(hash_password, password)

    async def verify(self, phc: str, password: str) -> bool:
        return await self.call(verify_password, phc, password)

    async def verify_unknown(self, password: str) -> bool:
        """As long as :meth:`verify` takes, for a user that does not exist: False."""
        return await self.call(verify_unknown, password)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
