"""State shared by every worker process and replica, and kept across restarts.

Signing-key records, revoked token ``jti``s, used client-assertion ``jti``s, the
user directory, browser sessions, authorization codes and refresh tokens live here,
never only in one process's memory. :class:`Store` is the interface and these are its
records; :mod:`authserver.sqlstore` implements it once in portable SQL, on SQLite
(:mod:`authserver.sqlite_store`, the embedded default) and PostgreSQL
(:mod:`authserver.pg_store`, for several replicas).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")
WAL_WAIT = 30.0  # seconds to keep trying to switch a new store to WAL


@dataclass(frozen=True, slots=True)
class KeyRecord:
    server: str
    kid: str
    alg: str
    created_at: int
    activate_at: int
    seq: int = 0  # insertion order: among keys activating in the same second, newest wins


UserSource = Literal["config", "cli"]  # who manages the user: the config file, or the CLI


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as the store holds it. ``id`` never changes (the future ``sub``);
    ``username_key`` is the username as compared (unique)."""

    id: str
    username: str  # as written, for display
    username_key: str  # NFKC, case-folded: unique
    password_hash: str = field(repr=False)  # an argon2id PHC string
    profile: Mapping[str, Any]  # OIDC standard claims and custom keys, JSON values
    groups: tuple[str, ...]  # sorted, unique
    disabled: bool
    source: UserSource
    created_at: int
    updated_at: int
    # config users: the password_hash the config gave; the stored one may be an
    # upgrade of it, kept while the config still gives this one
    declared_hash: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class CodeRecord:
    """What an authorization code was issued for (RFC 6749 section 4.1.2: bound to the
    client and redirect URI; RFC 7636: to the PKCE challenge). The store keys it by the
    code's SHA-256, never the code itself."""

    server: str
    client_id: str
    redirect_uri: str
    code_challenge: str | None  # S256; None only for a client that opted out of PKCE
    nonce: str | None
    scopes: tuple[str, ...]
    user_id: str
    session_id: str  # the session's sid claim, not its cookie value
    auth_time: int
    expires_at: int
    id_token_claims: tuple[str, ...] = ()  # asked for by the claims parameter (OIDC 5.5)
    amr: tuple[str, ...] = ("pwd",)  # how the session signed in (RFC 8176)


@dataclass(frozen=True, slots=True)
class CodeRedemption:
    """:meth:`Store.redeem_code`'s answer. ``reused``: the code had been redeemed
    before; ``jtis`` then lists the access tokens it produced, to be revoked."""

    record: CodeRecord
    reused: bool
    jtis: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """An org-wide browser session. The store keys it by the SHA-256 of the cookie's
    value, never the value; ``sid`` is a separate id, safe to put in ID tokens."""

    sid: str
    user_id: str
    auth_time: int  # when the user last signed in (a password, and any second factor)
    created_at: int
    expires_at: int  # the absolute end (max_lifetime)
    idle_expires_at: int  # moved on by each use, never past expires_at
    amr: tuple[str, ...] = ("pwd",)  # how (RFC 8176): pwd; pwd, otp, mfa after a code


@dataclass(frozen=True, slots=True)
class TotpRecord:
    """A user's authenticator app (RFC 6238). ``secret`` as stored: sealed with the key
    encryption key when there is one. Unconfirmed until a first code proves the app
    has it; ``last_step``: the newest time step accepted (a code is good once)."""

    user_id: str
    secret: bytes
    created_at: int
    confirmed_at: int | None
    last_step: int


@dataclass(frozen=True, slots=True)
class PasskeyRecord:
    """A user's passkey (a WebAuthn public key credential). ``credential_id``: the
    authenticator's id for it, base64url; ``public_key``: COSE-encoded, not secret;
    ``sign_count``: the authenticator's signature counter last seen (0: it keeps none);
    ``backup_eligible``: a synced passkey (its private key may leave the device)."""

    credential_id: str
    user_id: str
    public_key: bytes
    sign_count: int
    backup_eligible: bool
    transports: tuple[str, ...]
    aaguid: str  # the authenticator's model, as the authenticator says (not attested)
    created_at: int
    last_used_at: int | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """What one sign-in granted one client: the family of every refresh token (and the
    access tokens they gave) descended from one authorization code. ``family`` is the
    code's hash. A refresh may narrow ``scopes``, never widen them."""

    family: str
    server: str
    client_id: str
    user_id: str
    session_id: str  # the session's sid
    scopes: tuple[str, ...]
    auth_time: int
    offline: bool  # offline_access granted: outlives the session
    expires_at: int  # the family's absolute end (refresh_tokens.max_ttl)
    amr: tuple[str, ...] = ("pwd",)  # how the user signed in (RFC 8176)


RefreshStatus = Literal["ok", "reused", "revoked", "expired"]


@dataclass(frozen=True, slots=True)
class RefreshUse:
    """:meth:`Store.use_refresh`'s answer. ``ok``: the token was live and is now retired,
    its successor stored. ``reused``: it was retired already, so the whole family is
    now revoked; ``jtis`` are the access tokens it gave (revoked too)."""

    grant: Grant
    status: RefreshStatus
    jtis: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """What opening a store (or `tokengate db migrate`) did to its schema."""

    applied: tuple[int, ...]  # versions applied now
    version: int  # the store's version afterwards
    known: int  # the newest version this release knows

    @property
    def ahead(self) -> bool:
        """The store was migrated by a newer release."""
        return self.version > self.known


class UsernameTaken(Exception):
    """Another user has that username (compared as ``username_key``)."""


class Store(Protocol):
    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold a lock that every process sharing the store respects."""

    def keys(self, server: str | None = None) -> list[KeyRecord]: ...

    def add_key(self, record: KeyRecord, private_key: bytes | None = None) -> None:
        """Record a key; ``private_key``: its private part, sealed with the key
        encryption key (None: it lives in a file of the data dir)."""

    def private_key(self, server: str, kid: str) -> bytes | None:
        """The sealed private part stored with a key, if any."""

    def remove_key(self, server: str, kid: str) -> None: ...

    def revoke(self, jti: str, server: str, exp: int) -> None: ...

    def is_revoked(self, jti: str) -> bool: ...

    def revocations_after(
        self, server: str, cursor: int, limit: int, now: int
    ) -> tuple[list[tuple[str, int]], int]:
        """The revocation feed: ``server``'s revoked ``(jti, exp)`` recorded after
        ``cursor`` (0: every one still live), oldest first, at most ``limit``, none past
        its ``exp``; and the cursor to ask from next. A cursor from beyond anything this
        store ever recorded (another store's) starts over from 0."""

    def follow_revocations(self, heard: Callable[[], None]) -> bool:
        """Call ``heard`` (on another thread) whenever any process sharing the store
        revokes something; False when the engine cannot tell."""

    def remember_assertion(self, client_id: str, jti: str, exp: int) -> bool:
        """Record an assertion ``jti`` until ``exp``; False if it was seen before."""

    def purge(self, now: int) -> int:
        """Forget revocations and assertions past their ``exp``, and codes whose tokens
        have all expired."""

    def add_session(self, session_hash: str, record: SessionRecord) -> None: ...

    def touch_session(self, session_hash: str, now: int, idle_timeout: int) -> SessionRecord | None:
        """The live session, its idle end moved to ``now + idle_timeout`` (capped at
        its absolute end); None, and the record gone, once either end has passed."""

    def end_session(self, session_hash: str) -> bool:
        """Delete a session; False if there was none."""

    def add_interaction(
        self, cookie_hash: str, server: str, params: str, csrf: str, expires_at: int
    ) -> None:
        """A sign-in in progress: the authorization request's parameters (JSON) and the
        CSRF token of its form, keyed by the SHA-256 of the browser's sign-in cookie."""

    def interaction(self, cookie_hash: str, now: int) -> tuple[str, str, str, str | None] | None:
        """(server, params, csrf, progress) of a live sign-in in progress; progress:
        what it has proved so far (JSON; None: nothing yet)."""

    def swap_interaction_progress(self, cookie_hash: str, old: str, new: str) -> bool:
        """Replace the progress of a sign-in in progress, if it is still ``old``, in one
        statement: of two requests that read the same progress, one wins (a passkey
        challenge is spent once)."""

    def set_interaction_progress(self, cookie_hash: str, progress: str) -> None:
        """Record what a sign-in in progress has proved (the password, for whom)."""

    def end_interaction(self, cookie_hash: str) -> None: ...

    def add_code(self, code_hash: str, record: CodeRecord) -> None: ...

    def redeem_code(self, code_hash: str, now: int) -> CodeRedemption | None:
        """Mark the code used, atomically. None for an unknown code or an unused one
        past ``expires_at``; ``reused`` for a code used before, which stays burnt:
        tokens recorded for it afterwards are refused too."""

    def code_issued(self, code_hash: str, jti: str, exp: int) -> bool:
        """Record a token issued for a redeemed code (kept until ``exp``, for reuse
        detection); False if the code was reused meanwhile: the token must not be sent."""

    def start_family(
        self, grant: Grant, token_hash: str, idle_expires_at: int, jti: str, exp: int
    ) -> bool:
        """Record a new family with its first refresh token and the access token ``jti``
        issued with it, and (a code's family) add ``jti`` to what the code gave, as
        :meth:`code_issued` does, in the same transaction; False if the family's code
        was reused meanwhile."""

    def use_refresh(
        self,
        token_hash: str,
        now: int,
        successor: str,
        idle_expires_at: int,
        jti: str,
        exp: int,
    ) -> RefreshUse | None:
        """Retire a refresh token and store its ``successor`` (with the access token
        ``jti`` the exchange issues), atomically: of two uses at once exactly one is
        ``ok``. None for an unknown token."""

    def refresh_grant(self, token_hash: str, now: int) -> tuple[Grant, int] | None:
        """The grant of a live refresh token and the token's own end (the earlier of
        its idle end and the family's); None for any other token."""

    def revoke_family(self, family: str, now: int) -> tuple[str, ...]:
        """End a family: its refresh tokens stop working, its access tokens are revoked
        (returned). Safe to call for a family that does not exist."""

    def end_session_grants(self, sid: str, now: int) -> tuple[str, ...]:
        """Revoke the families of session ``sid`` that lack offline_access (logout);
        the access tokens revoked."""

    def sessions(self, now: int, user_id: str | None = None) -> list[SessionRecord]:
        """Live sessions, newest first; only ``user_id``'s when given."""

    def session_alive(self, sid: str, now: int) -> bool: ...

    def count_sessions(self, now: int) -> int:
        """How many sessions are live."""

    def consented_scopes(self, user_id: str, client_id: str) -> frozenset[str]:
        """The scopes the user has granted the client on the consent page."""

    def add_consent(self, user_id: str, client_id: str, scopes: Iterable[str], now: int) -> None:
        """Remember scopes granted (added to those granted before)."""

    def end_session_sid(self, sid: str) -> bool:
        """Delete the session whose sid is ``sid``; False if there was none."""

    def users(self) -> list[UserRecord]:
        """Every user, by username_key."""

    def totp(self, user_id: str) -> TotpRecord | None: ...

    def begin_totp(self, user_id: str, secret: bytes, now: int) -> bool:
        """Start enrolling an authenticator app (replacing an unconfirmed one); False
        when the user has a confirmed one (reset it first)."""

    def confirm_totp(self, user_id: str, step: int, now: int, recovery: Iterable[str]) -> bool:
        """Confirm the app with the first code's time step, and store the recovery
        code hashes that replace any before; False if there is nothing to confirm."""

    def use_totp_step(self, user_id: str, step: int) -> bool:
        """Accept a confirmed app's code of time step ``step``, once: False when a code
        of that step or a later one was accepted before (a replay)."""

    def use_recovery_code(self, user_id: str, code_hash: str, now: int) -> bool:
        """Spend a recovery code; False if it is not one of the user's unused ones."""

    def take_factor_attempt(self, user_id: str, now: int, window: int, limit: int) -> int | None:
        """Count one attempt at the user's second factor, before it is checked, in one
        statement (so attempts made at once, at any replicas, are all counted): None
        when allowed (at most ``limit`` in ``window`` seconds), else the seconds until
        the window ends."""

    def clear_factor_attempts(self, user_id: str) -> None:
        """A right code: the attempts counted so far are forgotten."""

    def recovery_codes_left(self, user_id: str) -> int: ...

    def add_recovery_codes(self, user_id: str, recovery: Iterable[str]) -> bool:
        """Store recovery code hashes for a user who has no unused ones; False (and
        nothing stored) when they have some."""

    def passkeys(self, user_id: str) -> list[PasskeyRecord]:
        """The user's passkeys, oldest first."""

    def passkey(self, credential_id: str) -> PasskeyRecord | None: ...

    def add_passkey(self, record: PasskeyRecord) -> bool:
        """Register a passkey; False when its credential id is registered already."""

    def use_passkey(self, credential_id: str, sign_count: int, now: int) -> bool:
        """Accept a signature of the passkey with counter ``sign_count``, in one
        statement: False when a signature with that counter or a later one was accepted
        before (a replay, or a cloned authenticator). A counter of 0 (the authenticator
        keeps none) is accepted while the stored one is 0."""

    def remove_passkey(self, user_id: str, credential_id: str) -> bool:
        """Forget one of the user's passkeys (a lost device), and the user's remembered
        devices (which browser was on it is not known); False if it is not theirs."""

    def reset_mfa(self, user_id: str) -> bool:
        """Forget the user's app, passkeys, recovery codes and remembered devices;
        False if there was no app and no passkey."""

    def remember_device(self, device_hash: str, user_id: str, now: int) -> None:
        """A browser that gave this user's second factor (its cookie's SHA-256)."""

    def device_known(self, device_hash: str, user_id: str, since: int) -> bool:
        """Whether the browser gave this user's second factor, last after ``since``."""

    def user(self, user_id: str) -> UserRecord | None: ...

    def user_by_key(self, username_key: str) -> UserRecord | None: ...

    def add_user(self, record: UserRecord) -> None:
        """Insert a new user; UsernameTaken if its username_key is in use."""

    def update_user(self, record: UserRecord) -> None:
        """Replace the user ``record.id``, groups included; UsernameTaken if it takes
        another user's username_key. Disabling a user ends their sessions and revokes
        their token families (the access tokens those gave included)."""

    def remove_user(self, user_id: str) -> bool:
        """Delete a user, its groups and consents, ending its sessions and revoking its
        token families as disabling does; False if there was none."""

    def replace_password_hash(self, user_id: str, old: str, new: str, updated_at: int) -> bool:
        """Set the user's hash to ``new`` if it is still ``old``; False otherwise."""

    def close(self) -> None: ...


class StoreUnavailable(Exception):
    """The store could not be read or written (a full disk, a lock held too long)."""


class StoreMissing(Exception):
    """There is no store in a data dir, and it was not to be created there."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(f"no key store in {data_dir}")
        self.data_dir = data_dir


class StoreWorker:
    """Runs store calls on threads of their own, never on the event loop: a store may
    wait seconds on a lock, a disk or a network, and the loop serves every listener
    of the process (a co-located gateway included). One thread (SQLite) also keeps
    one connection's calls in sequence; PostgreSQL takes as many as its pool has
    connections."""

    def __init__(self, threads: int = 1) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="store")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a store thread; its failures as StoreUnavailable."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a store thread, waiting for it here: for code that is
        not on the event loop, or that must finish before the loop goes on (start,
        reload). Failures as in :meth:`call`."""
        try:
            return self._executor.submit(fn, *args).result()
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._executor.shutdown(wait=True)
