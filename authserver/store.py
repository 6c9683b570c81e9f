"""State shared by every worker process and kept across restarts.

Signing-key records, revoked token ``jti``s, used client-assertion ``jti``s, the
user directory, browser sessions and authorization codes live here, never only in one
process's memory.
:class:`Store` is the interface; :class:`SqliteStore` keeps it in
``data_dir/tokengate.sqlite3`` (WAL mode). A shared database can replace it
when the authorization server runs as several replicas.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
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
    auth_time: int  # when the user last entered a password
    created_at: int
    expires_at: int  # the absolute end (max_lifetime)
    idle_expires_at: int  # moved on by each use, never past expires_at


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


RefreshStatus = Literal["ok", "reused", "revoked", "expired"]


@dataclass(frozen=True, slots=True)
class RefreshUse:
    """:meth:`Store.use_refresh`'s answer. ``ok``: the token was live and is now retired,
    its successor stored. ``reused``: it was retired already, so the whole family is
    now revoked; ``jtis`` are the access tokens it gave (revoked too)."""

    grant: Grant
    status: RefreshStatus
    jtis: tuple[str, ...] = ()


class UsernameTaken(Exception):
    """Another user has that username (compared as ``username_key``)."""


class Store(Protocol):
    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold a lock that every process sharing the store respects."""

    def keys(self, server: str | None = None) -> list[KeyRecord]: ...

    def add_key(self, record: KeyRecord) -> None: ...

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

    def interaction(self, cookie_hash: str, now: int) -> tuple[str, str, str] | None:
        """(server, params, csrf) of a live sign-in in progress."""

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
        issued with it; False if the family's code was reused meanwhile."""

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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS signing_keys (
    server TEXT NOT NULL, kid TEXT NOT NULL, alg TEXT NOT NULL,
    created_at INTEGER NOT NULL, activate_at INTEGER NOT NULL,
    PRIMARY KEY (server, kid)
);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti TEXT PRIMARY KEY, server TEXT NOT NULL, exp INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revocation_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, jti TEXT NOT NULL, server TEXT NOT NULL,
    exp INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS revocation_log_exp ON revocation_log (exp);
CREATE TABLE IF NOT EXISTS used_assertions (
    client_id TEXT NOT NULL, jti TEXT NOT NULL, exp INTEGER NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, username TEXT NOT NULL, username_key TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL, declared_hash TEXT, profile TEXT NOT NULL,
    disabled INTEGER NOT NULL, source TEXT NOT NULL,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_hash TEXT PRIMARY KEY, sid TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    auth_time INTEGER NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    idle_expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS interactions (
    cookie_hash TEXT PRIMARY KEY, server TEXT NOT NULL, params TEXT NOT NULL,
    csrf TEXT NOT NULL, expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_codes (
    code_hash TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at INTEGER NOT NULL,
    state TEXT NOT NULL, jtis TEXT NOT NULL, keep_until INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    family TEXT PRIMARY KEY, record TEXT NOT NULL, session_id TEXT NOT NULL,
    user_id TEXT NOT NULL, offline INTEGER NOT NULL, revoked INTEGER NOT NULL,
    jtis TEXT NOT NULL, expires_at INTEGER NOT NULL, keep_until INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS grants_session ON grants (session_id);
CREATE INDEX IF NOT EXISTS grants_user ON grants (user_id);
CREATE TABLE IF NOT EXISTS grant_tokens (
    family TEXT NOT NULL, jti TEXT NOT NULL, exp INTEGER NOT NULL,
    PRIMARY KEY (family, jti)
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash TEXT PRIMARY KEY, family TEXT NOT NULL, state TEXT NOT NULL,
    idle_expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family);
CREATE TABLE IF NOT EXISTS consents (
    user_id TEXT NOT NULL, client_id TEXT NOT NULL, scope TEXT NOT NULL,
    granted_at INTEGER NOT NULL, PRIMARY KEY (user_id, client_id, scope)
);
CREATE TABLE IF NOT EXISTS user_groups (
    user_id TEXT NOT NULL REFERENCES users (id), name TEXT NOT NULL,
    PRIMARY KEY (user_id, name)
);
"""
_SELECT_USERS = (
    "SELECT id, username, username_key, password_hash, profile, disabled, source, "
    "created_at, updated_at, declared_hash FROM users"
)


class StoreUnavailable(Exception):
    """The store could not be read or written (a full disk, a lock held too long)."""


class StoreMissing(Exception):
    """There is no store in a data dir, and it was not to be created there."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(f"no key store in {data_dir}")
        self.data_dir = data_dir


class StoreWorker:
    """Runs store calls on one thread of their own, never on the event loop: a store
    may wait seconds on a lock, a disk or a network, and the loop serves every
    listener of the process (a co-located gateway included). One thread also keeps a
    SQLite connection's calls in sequence."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store's thread; its failures as StoreUnavailable."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store's thread, waiting for it here: for code that is
        not on the event loop, or that must finish before the loop goes on (start,
        reload). Failures as in :meth:`call`."""
        try:
            return self._executor.submit(fn, *args).result()
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class SqliteStore:
    """:class:`Store` on SQLite in WAL mode; safe for several processes at once.

    ``create``: make the data dir and the database when they are not there (the
    server's first start). Without it, a missing store is :class:`StoreMissing` and
    nothing is created: a command pointed at the wrong directory must not start an
    empty store that no server reads."""

    FILENAME = "tokengate.sqlite3"

    def __init__(self, data_dir: Path, *, create: bool = True) -> None:
        self.path = data_dir / self.FILENAME
        if create:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # SQLite gives the -wal and -shm files the database file's mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            target: str | Path = self.path
        elif not self.path.is_file():
            raise StoreMissing(data_dir)
        else:  # mode=rw: SQLite itself refuses to create it, should it go meanwhile
            target = self.path.absolute().as_uri() + "?mode=rw"
        self._db = sqlite3.connect(
            target, timeout=30, isolation_level=None, check_same_thread=False, uri=not create
        )
        self._db.execute("PRAGMA busy_timeout = 30000")
        self._wal()
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self.exclusive():
            logged = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'revocation_log'"
            ).fetchone()
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            if logged is None:  # a store from before the feed: what it revoked joins it
                self._db.execute(
                    "INSERT INTO revocation_log (jti, server, exp) "
                    "SELECT jti, server, exp FROM revoked_tokens ORDER BY exp"
                )
            # a store whose families listed their access tokens in grants.jtis (JSON)
            self._db.execute(
                "INSERT OR IGNORE INTO grant_tokens (family, jti, exp) "
                "SELECT g.family, json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]') "
                "FROM grants g, json_each(g.jtis) j WHERE g.jtis != '[]'"
            )
            self._db.execute("UPDATE grants SET jtis = '[]' WHERE jtis != '[]'")

    def _wal(self) -> None:
        """Switch to WAL. SQLite answers "database is locked" at once, without waiting
        out busy_timeout, while another process is switching the same new file (the
        first start of several workers): try again for as long as busy_timeout."""
        deadline = time.monotonic() + WAL_WAIT
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if self._db.in_transaction:  # nested: the outer lock already holds
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def keys(self, server: str | None = None) -> list[KeyRecord]:
        sql = "SELECT server, kid, alg, created_at, activate_at, rowid FROM signing_keys"
        params: tuple[str, ...] = ()
        if server is not None:
            sql += " WHERE server = ?"
            params = (server,)
        rows = self._db.execute(sql + " ORDER BY activate_at, rowid", params)
        return [KeyRecord(*row) for row in rows]

    def add_key(self, record: KeyRecord) -> None:
        self._db.execute(
            "INSERT INTO signing_keys VALUES (?, ?, ?, ?, ?)",
            (record.server, record.kid, record.alg, record.created_at, record.activate_at),
        )

    def remove_key(self, server: str, kid: str) -> None:
        self._db.execute("DELETE FROM signing_keys WHERE server = ? AND kid = ?", (server, kid))

    def revoke(self, jti: str, server: str, exp: int) -> None:
        with self.exclusive():
            self._revoke(jti, server, exp)

    def _revoke(self, jti: str, server: str, exp: int) -> None:
        """Record a revoked jti, and, the first time, its place in the feed (in the
        caller's transaction)."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO revoked_tokens VALUES (?, ?, ?)", (jti, server, exp)
        )
        if cur.rowcount == 1:
            self._db.execute(
                "INSERT INTO revocation_log (jti, server, exp) VALUES (?, ?, ?)",
                (jti, server, exp),
            )

    def revocations_after(
        self, server: str, cursor: int, limit: int, now: int
    ) -> tuple[list[tuple[str, int]], int]:
        row = self._db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'revocation_log'"
        ).fetchone()
        if cursor > (row[0] if row is not None else 0):
            cursor = 0  # not this store's cursor: everything still live
        rows = self._db.execute(
            "SELECT seq, jti, exp FROM revocation_log WHERE seq > ? AND server = ? "
            "AND exp >= ? ORDER BY seq LIMIT ?",
            (cursor, server, now, limit),
        ).fetchall()
        return [(jti, exp) for _, jti, exp in rows], rows[-1][0] if rows else cursor

    def is_revoked(self, jti: str) -> bool:
        row = self._db.execute("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,)).fetchone()
        return row is not None

    def remember_assertion(self, client_id: str, jti: str, exp: int) -> bool:
        cur = self._db.execute(
            "INSERT OR IGNORE INTO used_assertions VALUES (?, ?, ?)", (client_id, jti, exp)
        )
        return cur.rowcount == 1

    def purge(self, now: int) -> int:
        with self.exclusive():
            a = self._db.execute("DELETE FROM revoked_tokens WHERE exp < ?", (now,)).rowcount
            self._db.execute("DELETE FROM revocation_log WHERE exp < ?", (now,))
            b = self._db.execute("DELETE FROM used_assertions WHERE exp < ?", (now,)).rowcount
            c = self._db.execute("DELETE FROM auth_codes WHERE keep_until < ?", (now,)).rowcount
            d = self._db.execute(
                "DELETE FROM sessions WHERE idle_expires_at <= ? OR expires_at <= ?", (now, now)
            ).rowcount
            e = self._db.execute("DELETE FROM interactions WHERE expires_at <= ?", (now,)).rowcount
            f = self._db.execute(
                "DELETE FROM refresh_tokens WHERE idle_expires_at <= ? OR family IN "
                "(SELECT family FROM grants WHERE keep_until < ? OR expires_at <= ?)",
                (now, now, now),
            ).rowcount
            g = self._db.execute("DELETE FROM grants WHERE keep_until < ?", (now,)).rowcount
            h = self._db.execute("DELETE FROM grant_tokens WHERE exp < ?", (now,)).rowcount
        return a + b + c + d + e + f + g + h

    # -- sign-ins in progress -----------------------------------------------------

    def add_interaction(
        self, cookie_hash: str, server: str, params: str, csrf: str, expires_at: int
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO interactions VALUES (?, ?, ?, ?, ?)",
            (cookie_hash, server, params, csrf, expires_at),
        )

    def interaction(self, cookie_hash: str, now: int) -> tuple[str, str, str] | None:
        row = self._db.execute(
            "SELECT server, params, csrf FROM interactions WHERE cookie_hash = ? "
            "AND expires_at > ?",
            (cookie_hash, now),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def end_interaction(self, cookie_hash: str) -> None:
        self._db.execute("DELETE FROM interactions WHERE cookie_hash = ?", (cookie_hash,))

    # -- sessions ------------------------------------------------------------

    def add_session(self, session_hash: str, record: SessionRecord) -> None:
        self._db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                session_hash,
                record.sid,
                record.user_id,
                record.auth_time,
                record.created_at,
                record.expires_at,
                record.idle_expires_at,
            ),
        )

    def touch_session(self, session_hash: str, now: int, idle_timeout: int) -> SessionRecord | None:
        with self.exclusive():
            row = self._db.execute(
                "SELECT sid, user_id, auth_time, created_at, expires_at, idle_expires_at "
                "FROM sessions WHERE session_hash = ?",
                (session_hash,),
            ).fetchone()
            if row is None:
                return None
            record = SessionRecord(*row)
            if now >= record.expires_at or now >= record.idle_expires_at:
                self._db.execute("DELETE FROM sessions WHERE session_hash = ?", (session_hash,))
                return None
            idle = min(now + idle_timeout, record.expires_at)
            self._db.execute(
                "UPDATE sessions SET idle_expires_at = ? WHERE session_hash = ?",
                (idle, session_hash),
            )
            return dataclasses.replace(record, idle_expires_at=idle)

    def end_session(self, session_hash: str) -> bool:
        cur = self._db.execute("DELETE FROM sessions WHERE session_hash = ?", (session_hash,))
        return cur.rowcount == 1

    # -- authorization codes ---------------------------------------------------
    # state: "issued" -> "redeemed" (one use) -> "reused" (a second one: burnt for good)

    def add_code(self, code_hash: str, record: CodeRecord) -> None:
        self._db.execute(
            "INSERT INTO auth_codes VALUES (?, ?, ?, 'issued', '[]', ?)",
            (code_hash, _code_json(record), record.expires_at, record.expires_at),
        )

    def redeem_code(self, code_hash: str, now: int) -> CodeRedemption | None:
        with self.exclusive():
            row = self._db.execute(
                "SELECT record, state, jtis FROM auth_codes WHERE code_hash = ?", (code_hash,)
            ).fetchone()
            if row is None:
                return None
            record = _code_record(row[0])
            if row[1] == "issued":
                if record.expires_at <= now:
                    return None
                self._db.execute(
                    "UPDATE auth_codes SET state = 'redeemed' WHERE code_hash = ?", (code_hash,)
                )
                return CodeRedemption(record, reused=False)
            self._db.execute(
                "UPDATE auth_codes SET state = 'reused' WHERE code_hash = ?", (code_hash,)
            )
            return CodeRedemption(record, reused=True, jtis=tuple(json.loads(row[2])))

    def code_issued(self, code_hash: str, jti: str, exp: int) -> bool:
        with self.exclusive():
            row = self._db.execute(
                "SELECT state, jtis, keep_until FROM auth_codes WHERE code_hash = ?",
                (code_hash,),
            ).fetchone()
            if row is None or row[0] != "redeemed":
                return False
            jtis = [*json.loads(row[1]), jti]
            self._db.execute(
                "UPDATE auth_codes SET jtis = ?, keep_until = ? WHERE code_hash = ?",
                (json.dumps(jtis), max(row[2], exp), code_hash),
            )
            return True

    # -- refresh tokens ------------------------------------------------------------
    # grant_tokens: the access tokens a family gave (jti, exp), to revoke with it.
    # A retired refresh token stays (state "used") until its family goes: a second
    # use of it is reuse, however late.

    def start_family(
        self, grant: Grant, token_hash: str, idle_expires_at: int, jti: str, exp: int
    ) -> bool:
        with self.exclusive():
            row = self._db.execute(
                "SELECT state FROM auth_codes WHERE code_hash = ?", (grant.family,)
            ).fetchone()
            if row is not None and row[0] != "redeemed":
                return False
            self._db.execute(
                "INSERT INTO grants VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (
                    grant.family,
                    json.dumps(dataclasses.asdict(grant), sort_keys=True),
                    grant.session_id,
                    grant.user_id,
                    int(grant.offline),
                    "[]",  # the access tokens are rows of grant_tokens
                    grant.expires_at,
                    max(grant.expires_at, exp),
                ),
            )
            self._db.execute("INSERT INTO grant_tokens VALUES (?, ?, ?)", (grant.family, jti, exp))
            self._db.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, 'active', ?)",
                (token_hash, grant.family, idle_expires_at),
            )
            return True

    def use_refresh(
        self,
        token_hash: str,
        now: int,
        successor: str,
        idle_expires_at: int,
        jti: str,
        exp: int,
    ) -> RefreshUse | None:
        with self.exclusive():
            row = self._db.execute(
                "SELECT t.state, t.idle_expires_at, g.record, g.revoked, g.keep_until "
                "FROM refresh_tokens t JOIN grants g ON g.family = t.family "
                "WHERE t.token_hash = ?",
                (token_hash,),
            ).fetchone()
            if row is None:
                return None
            state, idle_end, record, revoked, keep_until = row
            grant = _grant(record)
            if revoked:
                return RefreshUse(grant, "revoked")
            if state != "active":
                return RefreshUse(grant, "reused", self._revoke_family(grant.family, now))
            if idle_end <= now or grant.expires_at <= now:
                return RefreshUse(grant, "expired")
            self._db.execute(
                "UPDATE refresh_tokens SET state = 'used' WHERE token_hash = ?", (token_hash,)
            )
            self._db.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, 'active', ?)",
                (successor, grant.family, min(idle_expires_at, grant.expires_at)),
            )
            # one row a refresh: its cost does not grow with the family's age
            self._db.execute("INSERT INTO grant_tokens VALUES (?, ?, ?)", (grant.family, jti, exp))
            if exp > keep_until:
                self._db.execute(
                    "UPDATE grants SET keep_until = ? WHERE family = ?", (exp, grant.family)
                )
            return RefreshUse(grant, "ok")

    def refresh_grant(self, token_hash: str, now: int) -> tuple[Grant, int] | None:
        row = self._db.execute(
            "SELECT g.record, t.idle_expires_at "
            "FROM refresh_tokens t JOIN grants g ON g.family = t.family "
            "WHERE t.token_hash = ? AND t.state = 'active' AND t.idle_expires_at > ? "
            "AND g.revoked = 0 AND g.expires_at > ?",
            (token_hash, now, now),
        ).fetchone()
        if row is None:
            return None
        grant = _grant(row[0])
        return grant, min(row[1], grant.expires_at)

    def revoke_family(self, family: str, now: int) -> tuple[str, ...]:
        with self.exclusive():
            return self._revoke_family(family, now)

    def _revoke_family(self, family: str, now: int) -> tuple[str, ...]:
        row = self._db.execute("SELECT record FROM grants WHERE family = ?", (family,)).fetchone()
        if row is None:
            return ()
        server = _grant(row[0]).server
        live = self._db.execute(
            "SELECT jti, exp FROM grant_tokens WHERE family = ? AND exp > ? ORDER BY exp",
            (family, now),
        ).fetchall()
        for j, e in live:
            self._revoke(j, server, e)
        self._db.execute("DELETE FROM grant_tokens WHERE family = ?", (family,))
        self._db.execute("UPDATE grants SET revoked = 1 WHERE family = ?", (family,))
        self._db.execute(
            "DELETE FROM refresh_tokens WHERE family = ? AND state = 'active'", (family,)
        )
        return tuple(j for j, _ in live)

    def end_session_grants(self, sid: str, now: int) -> tuple[str, ...]:
        with self.exclusive():
            families = [
                r[0]
                for r in self._db.execute(
                    "SELECT family FROM grants WHERE session_id = ? AND offline = 0 "
                    "AND revoked = 0",
                    (sid,),
                )
            ]
            revoked: list[str] = []
            for family in families:
                revoked.extend(self._revoke_family(family, now))
            return tuple(revoked)

    def sessions(self, now: int, user_id: str | None = None) -> list[SessionRecord]:
        sql = (
            "SELECT sid, user_id, auth_time, created_at, expires_at, idle_expires_at "
            "FROM sessions WHERE expires_at > ? AND idle_expires_at > ?"
        )
        params: tuple[Any, ...] = (now, now)
        if user_id is not None:
            sql += " AND user_id = ?"
            params = (*params, user_id)
        rows = self._db.execute(sql + " ORDER BY created_at DESC, sid", params)
        return [SessionRecord(*row) for row in rows]

    def session_alive(self, sid: str, now: int) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM sessions WHERE sid = ? AND expires_at > ? AND idle_expires_at > ?",
            (sid, now, now),
        ).fetchone()
        return row is not None

    def count_sessions(self, now: int) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM sessions WHERE expires_at > ? AND idle_expires_at > ?",
            (now, now),
        ).fetchone()
        return int(row[0])

    def consented_scopes(self, user_id: str, client_id: str) -> frozenset[str]:
        rows = self._db.execute(
            "SELECT scope FROM consents WHERE user_id = ? AND client_id = ?", (user_id, client_id)
        )
        return frozenset(row[0] for row in rows)

    def add_consent(self, user_id: str, client_id: str, scopes: Iterable[str], now: int) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO consents VALUES (?, ?, ?, ?)",
            [(user_id, client_id, scope, now) for scope in scopes],
        )

    def end_session_sid(self, sid: str) -> bool:
        return self._db.execute("DELETE FROM sessions WHERE sid = ?", (sid,)).rowcount == 1

    # -- users ---------------------------------------------------------------

    def users(self) -> list[UserRecord]:
        rows = self._db.execute(_SELECT_USERS + " ORDER BY username_key")
        return self._with_groups(rows.fetchall())

    def user(self, user_id: str) -> UserRecord | None:
        rows = self._db.execute(_SELECT_USERS + " WHERE id = ?", (user_id,))
        found = self._with_groups(rows.fetchall())
        return found[0] if found else None

    def user_by_key(self, username_key: str) -> UserRecord | None:
        rows = self._db.execute(_SELECT_USERS + " WHERE username_key = ?", (username_key,))
        found = self._with_groups(rows.fetchall())
        return found[0] if found else None

    def _with_groups(self, rows: list[tuple[Any, ...]]) -> list[UserRecord]:
        if not rows:
            return []
        groups: dict[str, list[str]] = {}
        if len(rows) == 1:
            found = self._db.execute(
                "SELECT user_id, name FROM user_groups WHERE user_id = ?", (rows[0][0],)
            )
        else:
            found = self._db.execute("SELECT user_id, name FROM user_groups")
        for user_id, name in found:
            groups.setdefault(user_id, []).append(name)
        return [
            UserRecord(
                id=row[0],
                username=row[1],
                username_key=row[2],
                password_hash=row[3],
                profile=MappingProxyType(json.loads(row[4])),
                groups=tuple(sorted(groups.get(row[0], ()))),
                disabled=bool(row[5]),
                source=row[6],
                created_at=row[7],
                updated_at=row[8],
                declared_hash=row[9],
            )
            for row in rows
        ]

    def add_user(self, record: UserRecord) -> None:
        with self.exclusive():
            self._check_key_free(record)
            self._db.execute(
                "INSERT INTO users (id, username, username_key, password_hash, profile, "
                "disabled, source, created_at, updated_at, declared_hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _user_row(record),
            )
            self._set_groups(record.id, record.groups)

    def update_user(self, record: UserRecord) -> None:
        with self.exclusive():
            self._check_key_free(record)
            if record.disabled:
                was = self._db.execute(
                    "SELECT disabled FROM users WHERE id = ?", (record.id,)
                ).fetchone()
                if was is not None and not was[0]:
                    self._end_user(record.id)
            row = _user_row(record)
            self._db.execute(
                "UPDATE users SET username = ?, username_key = ?, password_hash = ?, "
                "profile = ?, disabled = ?, source = ?, created_at = ?, updated_at = ?, "
                "declared_hash = ? WHERE id = ?",
                (*row[1:], row[0]),
            )
            self._db.execute("DELETE FROM user_groups WHERE user_id = ?", (record.id,))
            self._set_groups(record.id, record.groups)

    def _check_key_free(self, record: UserRecord) -> None:
        row = self._db.execute(
            "SELECT id FROM users WHERE username_key = ?", (record.username_key,)
        ).fetchone()
        if row is not None and row[0] != record.id:
            raise UsernameTaken(record.username)

    def _set_groups(self, user_id: str, groups: Iterable[str]) -> None:
        self._db.executemany(
            "INSERT INTO user_groups (user_id, name) VALUES (?, ?)",
            [(user_id, name) for name in groups],
        )

    def _end_user(self, user_id: str) -> None:
        """A user disabled or deleted: their sessions end, and every token family of
        theirs is revoked with the access tokens it gave (onto the revocation feed)."""
        now = int(time.time())
        self._db.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))
        families = self._db.execute(
            "SELECT family FROM grants WHERE user_id = ? AND revoked = 0", (user_id,)
        ).fetchall()
        for (family,) in families:
            self._revoke_family(family, now)

    def remove_user(self, user_id: str) -> bool:
        with self.exclusive():
            self._end_user(user_id)
            self._db.execute("DELETE FROM user_groups WHERE user_id = ?", (user_id,))
            self._db.execute("DELETE FROM consents WHERE user_id = ?", (user_id,))
            return self._db.execute("DELETE FROM users WHERE id = ?", (user_id,)).rowcount == 1

    def replace_password_hash(self, user_id: str, old: str, new: str, updated_at: int) -> bool:
        cur = self._db.execute(
            "UPDATE users SET password_hash = ?, updated_at = ? WHERE id = ? AND password_hash = ?",
            (new, updated_at, user_id, old),
        )
        return cur.rowcount == 1

    def close(self) -> None:
        self._db.close()


def _code_json(record: CodeRecord) -> str:
    return json.dumps(dataclasses.asdict(record), sort_keys=True)


def _code_record(text: str) -> CodeRecord:
    fields = json.loads(text)
    fields["id_token_claims"] = tuple(fields.get("id_token_claims", ()))
    return CodeRecord(**{**fields, "scopes": tuple(fields["scopes"])})


def _grant(text: str) -> Grant:
    fields = json.loads(text)
    return Grant(**{**fields, "scopes": tuple(fields["scopes"])})


def _user_row(record: UserRecord) -> tuple[Any, ...]:
    """The users row of ``record``, in :data:`_SELECT_USERS` order."""
    return (
        record.id,
        record.username,
        record.username_key,
        record.password_hash,
        json.dumps(dict(record.profile), ensure_ascii=False, sort_keys=True),
        int(record.disabled),
        record.source,
        record.created_at,
        record.updated_at,
        record.declared_hash,
    )
