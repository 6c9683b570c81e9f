"""The store's logic in SQL that SQLite and PostgreSQL both speak.

:class:`SqlStore` implements :class:`~authserver.store.Store` once; a backend gives it
a connection (:meth:`SqlStore._q`, :meth:`SqlStore._many`), transactions, and the
revocation feed's high-water mark. Statements are written with ``?`` placeholders and
``ON CONFLICT`` clauses, which both engines accept.

Two kinds of transaction:

- :meth:`SqlStore.transaction` for what races on one row: a refresh token family, an
  authorization code. Each such read-modify-write first locks the row it is about
  (a no-op ``UPDATE ... RETURNING``: the grant of a token family, the code), so two
  replicas presenting one refresh token or one code are put in order while refreshes
  of other families run side by side. Every change to a family (a refresh, its
  revocation, a session's or a user's end) locks the family's grant row first.
- :meth:`SqlStore.exclusive` for the rare store-wide changes (keys, users, purge,
  migrations): one lock for the whole store.

A backend may run a method as one statement on the server instead (PostgreSQL:
``use_refresh`` and ``start_family``, the writes of every refresh and code exchange,
are functions made by migration 7); it takes the same locks in the same order and
gives the same answers, which the store's shared tests check on both.

Revocations take the feed's lock (:meth:`SqlStore._lock_feed`) last, held to commit, so
feed sequence numbers become visible in the order they were handed out and a
follower's cursor never passes one still to commit. Lock order, so that no two
transactions wait on each other: the store-wide lock, then rows (grants, then codes),
then the feed's lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

from authserver.store import (
    CodeRecord,
    CodeRedemption,
    Grant,
    KeyRecord,
    MigrationResult,
    PasskeyRecord,
    RefreshUse,
    SessionRecord,
    TotpRecord,
    UsernameTaken,
    UserRecord,
)

DEVICE_TTL = 180 * 86400  # a remembered device is forgotten this long after its last use
_SELECT_USERS = (
    "SELECT id, username, username_key, password_hash, profile, disabled, source, "
    "created_at, updated_at, declared_hash FROM users"
)
_SELECT_USER = (  # one user, a row per group
    "SELECT u.id, u.username, u.username_key, u.password_hash, u.profile, u.disabled, "
    "u.source, u.created_at, u.updated_at, u.declared_hash, g.name "
    "FROM users u LEFT JOIN user_groups g ON g.user_id = u.id"
)


class Rows(Protocol):
    """What a statement gives back (a DB-API cursor, or the rows read off one)."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SqlStore:
    """:class:`~authserver.store.Store` in portable SQL; see the module docstring."""

    KEY_SEQ: ClassVar[str]  # the column that orders keys inserted in the same second
    threads: int = 1  # how many store calls may run at once (StoreWorker's threads)
    migration: MigrationResult | None = None  # what opening the store applied

    def _q(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        raise NotImplementedError

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One transaction (a nested one joins the outer); rows are locked by the
        statements that write them."""
        raise NotImplementedError

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """One transaction holding the store-wide lock (never inside a
        :meth:`transaction`: the lock comes first)."""
        raise NotImplementedError

    def _lock_feed(self) -> None:
        """Take the revocation feed's lock until the transaction ends (an engine whose
        transactions are all exclusive needs nothing more)."""

    def _feed_high_water(self) -> int:
        """The highest revocation_log seq ever handed out (purged rows included)."""
        raise NotImplementedError

    def _announce_revocation(self, server: str) -> None:
        """Tell every process following this store that ``server`` revoked something
        (in the revoking transaction: heard once it commits). Nothing by default."""

    def follow_revocations(self, heard: Callable[[], None]) -> bool:
        """Call ``heard`` (on another thread) whenever any process sharing the store
        revokes something, so held feed requests answer at once. False when the
        engine cannot tell: they then notice at their next poll."""
        return False

    def close(self) -> None:
        raise NotImplementedError

    def keys(self, server: str | None = None) -> list[KeyRecord]:
        seq = self.KEY_SEQ  # a column name fixed by the class, never input
        sql = f"SELECT server, kid, alg, created_at, activate_at, {seq} FROM signing_keys"  # noqa: S608
        params: tuple[str, ...] = ()
        if server is not None:
            sql += " WHERE server = ?"
            params = (server,)
        rows = self._q(sql + f" ORDER BY activate_at, {seq}", params)
        return [KeyRecord(*row) for row in rows]

    def add_key(self, record: KeyRecord, private_key: bytes | None = None) -> None:
        self._q(
            "INSERT INTO signing_keys (server, kid, alg, created_at, activate_at, private_key) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.server,
                record.kid,
                record.alg,
                record.created_at,
                record.activate_at,
                private_key,
            ),
        )

    def private_key(self, server: str, kid: str) -> bytes | None:
        row = self._q(
            "SELECT private_key FROM signing_keys WHERE server = ? AND kid = ?", (server, kid)
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def remove_key(self, server: str, kid: str) -> None:
        self._q("DELETE FROM signing_keys WHERE server = ? AND kid = ?", (server, kid))

    def revoke(self, jti: str, server: str, exp: int) -> None:
        with self.transaction():
            self._revoke([(jti, server, exp)])

    def _revoke(self, revoked: Sequence[tuple[str, str, int]]) -> None:
        """Record revoked ``(jti, server, exp)``s and, the first time each, its place in
        the feed (in the caller's transaction, under the feed's lock: taken last)."""
        if not revoked:
            return
        self._lock_feed()
        announce: set[str] = set()
        for jti, server, exp in revoked:
            cur = self._q(
                "INSERT INTO revoked_tokens (jti, server, exp) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (jti, server, exp),
            )
            if cur.rowcount == 1:
                self._q(
                    "INSERT INTO revocation_log (jti, server, exp) VALUES (?, ?, ?)",
                    (jti, server, exp),
                )
                announce.add(server)
        for server in sorted(announce):
            self._announce_revocation(server)

    def revocations_after(
        self, server: str, cursor: int, limit: int, now: int
    ) -> tuple[list[tuple[str, int]], int]:
        if cursor > self._feed_high_water():
            cursor = 0  # not this store's cursor: everything still live
        rows = self._q(
            "SELECT seq, jti, exp FROM revocation_log WHERE seq > ? AND server = ? "
            "AND exp >= ? ORDER BY seq LIMIT ?",
            (cursor, server, now, limit),
        ).fetchall()
        return [(jti, exp) for _, jti, exp in rows], rows[-1][0] if rows else cursor

    def is_revoked(self, jti: str) -> bool:
        row = self._q("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,)).fetchone()
        return row is not None

    def remember_assertion(self, client_id: str, jti: str, exp: int) -> bool:
        cur = self._q(
            "INSERT INTO used_assertions (client_id, jti, exp) VALUES (?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (client_id, jti, exp),
        )
        return cur.rowcount == 1

    def purge(self, now: int) -> int:
        with self.exclusive():
            a = self._q("DELETE FROM revoked_tokens WHERE exp < ?", (now,)).rowcount
            self._q("DELETE FROM revocation_log WHERE exp < ?", (now,))
            b = self._q("DELETE FROM used_assertions WHERE exp < ?", (now,)).rowcount
            c = self._q("DELETE FROM auth_codes WHERE keep_until < ?", (now,)).rowcount
            d = self._q(
                "DELETE FROM sessions WHERE idle_expires_at <= ? OR expires_at <= ?", (now, now)
            ).rowcount
            e = self._q("DELETE FROM interactions WHERE expires_at <= ?", (now,)).rowcount
            f = self._q(
                "DELETE FROM refresh_tokens WHERE idle_expires_at <= ? OR family IN "
                "(SELECT family FROM grants WHERE keep_until < ? OR expires_at <= ?)",
                (now, now, now),
            ).rowcount
            g = self._q("DELETE FROM grants WHERE keep_until < ?", (now,)).rowcount
            h = self._q("DELETE FROM grant_tokens WHERE exp < ?", (now,)).rowcount
            i = self._q(
                "DELETE FROM known_devices WHERE last_seen <= ?", (now - DEVICE_TTL,)
            ).rowcount
        return a + b + c + d + e + f + g + h + i

    # -- sign-ins in progress -----------------------------------------------------

    def add_interaction(
        self, cookie_hash: str, server: str, params: str, csrf: str, expires_at: int
    ) -> None:
        self._q(
            "INSERT INTO interactions (cookie_hash, server, params, csrf, expires_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (cookie_hash) "
            "DO UPDATE SET server = excluded.server, params = excluded.params, "
            "csrf = excluded.csrf, expires_at = excluded.expires_at",
            (cookie_hash, server, params, csrf, expires_at),
        )

    def interaction(self, cookie_hash: str, now: int) -> tuple[str, str, str, str | None] | None:
        row = self._q(
            "SELECT server, params, csrf, progress FROM interactions WHERE cookie_hash = ? "
            "AND expires_at > ?",
            (cookie_hash, now),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def swap_interaction_progress(self, cookie_hash: str, old: str, new: str) -> bool:
        cur = self._q(
            "UPDATE interactions SET progress = ? WHERE cookie_hash = ? AND progress = ?",
            (new, cookie_hash, old),
        )
        return cur.rowcount == 1

    def set_interaction_progress(self, cookie_hash: str, progress: str) -> None:
        self._q(
            "UPDATE interactions SET progress = ? WHERE cookie_hash = ?", (progress, cookie_hash)
        )

    def end_interaction(self, cookie_hash: str) -> None:
        self._q("DELETE FROM interactions WHERE cookie_hash = ?", (cookie_hash,))

    # -- sessions ------------------------------------------------------------

    def add_session(self, session_hash: str, record: SessionRecord) -> None:
        self._q(
            "INSERT INTO sessions (session_hash, sid, user_id, auth_time, created_at, expires_at, "
            "idle_expires_at, amr) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session_hash,
                record.sid,
                record.user_id,
                record.auth_time,
                record.created_at,
                record.expires_at,
                record.idle_expires_at,
                json.dumps(list(record.amr)),
            ),
        )

    def touch_session(self, session_hash: str, now: int, idle_timeout: int) -> SessionRecord | None:
        # one statement, no store lock: every page view of every replica touches one
        rows = self._q(
            "UPDATE sessions SET idle_expires_at = "
            "CASE WHEN ? < expires_at THEN ? ELSE expires_at END "
            "WHERE session_hash = ? AND expires_at > ? AND idle_expires_at > ? "
            "RETURNING sid, user_id, auth_time, created_at, expires_at, idle_expires_at, amr",
            (now + idle_timeout, now + idle_timeout, session_hash, now, now),
        ).fetchall()  # all: SQLite finishes the statement (and its write) only then
        if rows:
            return _session(rows[0])
        self._q(  # over, if it is there at all: gone now
            "DELETE FROM sessions WHERE session_hash = ? AND "
            "(expires_at <= ? OR idle_expires_at <= ?)",
            (session_hash, now, now),
        )
        return None

    def end_session(self, session_hash: str) -> bool:
        cur = self._q("DELETE FROM sessions WHERE session_hash = ?", (session_hash,))
        return cur.rowcount == 1

    # -- authorization codes ---------------------------------------------------
    # state: "issued" -> "redeemed" (one use) -> "reused" (a second one: burnt for good)

    def add_code(self, code_hash: str, record: CodeRecord) -> None:
        self._q(
            "INSERT INTO auth_codes (code_hash, record, expires_at, state, jtis, keep_until) "
            "VALUES (?, ?, ?, 'issued', '[]', ?)",
            (code_hash, _code_json(record), record.expires_at, record.expires_at),
        )

    def redeem_code(self, code_hash: str, now: int) -> CodeRedemption | None:
        # one statement on the code's row, which it locks: "issued" becomes "redeemed"
        # (or stays, expired), anything else "reused"; the new state says which it was
        rows = self._q(
            "UPDATE auth_codes SET state = CASE "
            "WHEN state = 'issued' AND expires_at > ? THEN 'redeemed' "
            "WHEN state = 'issued' THEN 'issued' ELSE 'reused' END "
            "WHERE code_hash = ? RETURNING record, state, jtis",
            (now, code_hash),
        ).fetchall()  # all: SQLite finishes the statement only then
        if not rows:
            return None
        record, state, jtis = rows[0]
        if state == "issued":  # expired unused
            return None
        if state == "redeemed":
            return CodeRedemption(_code_record(record), reused=False)
        return CodeRedemption(_code_record(record), reused=True, jtis=tuple(json.loads(jtis)))

    def code_issued(self, code_hash: str, jti: str, exp: int) -> bool:
        with self.transaction():
            row = self._lock_code(code_hash, "state, jtis, keep_until")
            if row is None or row[0] != "redeemed":
                return False
            self._record_code_token(code_hash, row, jti, exp)
            return True

    def _record_code_token(self, code_hash: str, row: Sequence[Any], jti: str, exp: int) -> None:
        """Add an access token to what a redeemed code gave (its locked row: state,
        jtis, keep_until), to revoke if the code is used again."""
        self._q(
            "UPDATE auth_codes SET jtis = ?, keep_until = ? WHERE code_hash = ?",
            (json.dumps([*json.loads(row[1]), jti]), max(row[2], exp), code_hash),
        )

    def _lock_code(self, code_hash: str, columns: str) -> Any:
        """Lock a code's row for the transaction (a no-op update) and read it."""
        rows = self._q(
            f"UPDATE auth_codes SET state = state WHERE code_hash = ? RETURNING {columns}",  # noqa: S608
            (code_hash,),
        ).fetchall()  # all: SQLite finishes the statement only then
        return rows[0] if rows else None

    # -- refresh tokens ------------------------------------------------------------
    # grant_tokens: the access tokens a family gave (jti, exp), to revoke with it.
    # A retired refresh token stays (state "used") until its family goes: a second
    # use of it is reuse, however late.

    def start_family(
        self, grant: Grant, token_hash: str, idle_expires_at: int, jti: str, exp: int
    ) -> bool:
        with self.transaction():
            row = self._lock_code(grant.family, "state, jtis, keep_until")
            if row is not None and row[0] != "redeemed":
                return False
            if row is not None:  # a code's family: the code records its access token too
                self._record_code_token(grant.family, row, jti, exp)
            self._q(
                "INSERT INTO grants (family, record, session_id, user_id, offline, revoked, jtis, "
                "expires_at, keep_until) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (
                    grant.family,
                    grant_json(grant),
                    grant.session_id,
                    grant.user_id,
                    int(grant.offline),
                    "[]",  # the access tokens are rows of grant_tokens
                    grant.expires_at,
                    max(grant.expires_at, exp),
                ),
            )
            self._q(
                "INSERT INTO grant_tokens (family, jti, exp) VALUES (?, ?, ?)",
                (grant.family, jti, exp),
            )
            self._q(
                "INSERT INTO refresh_tokens (token_hash, family, state, idle_expires_at) "
                "VALUES (?, ?, 'active', ?)",
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
        with self.transaction():
            locked = self._q(  # the family's grant row: every change to a family locks it
                "UPDATE grants SET revoked = revoked "
                "WHERE family = (SELECT family FROM refresh_tokens WHERE token_hash = ?) "
                "RETURNING record, revoked, keep_until",
                (token_hash,),
            ).fetchall()
            if not locked:
                return None
            record, revoked, keep_until = locked[0]
            grant = grant_from_json(record)
            if revoked:
                return RefreshUse(grant, "revoked")
            row = self._q(
                "SELECT state, idle_expires_at FROM refresh_tokens WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            if row is None:  # retired with its family since the statement above began
                return None
            state, idle_end = row
            if state != "active":
                return RefreshUse(
                    grant, "reused", self._revoke_families("family = ?", (grant.family,), now)
                )
            if idle_end <= now or grant.expires_at <= now:
                return RefreshUse(grant, "expired")
            self._q("UPDATE refresh_tokens SET state = 'used' WHERE token_hash = ?", (token_hash,))
            self._q(
                "INSERT INTO refresh_tokens (token_hash, family, state, idle_expires_at) "
                "VALUES (?, ?, 'active', ?)",
                (successor, grant.family, min(idle_expires_at, grant.expires_at)),
            )
            # one row a refresh: its cost does not grow with the family's age
            self._q(
                "INSERT INTO grant_tokens (family, jti, exp) VALUES (?, ?, ?)",
                (grant.family, jti, exp),
            )
            if exp > keep_until:
                self._q("UPDATE grants SET keep_until = ? WHERE family = ?", (exp, grant.family))
            return RefreshUse(grant, "ok")

    def refresh_grant(self, token_hash: str, now: int) -> tuple[Grant, int] | None:
        row = self._q(
            "SELECT g.record, t.idle_expires_at "
            "FROM refresh_tokens t JOIN grants g ON g.family = t.family "
            "WHERE t.token_hash = ? AND t.state = 'active' AND t.idle_expires_at > ? "
            "AND g.revoked = 0 AND g.expires_at > ?",
            (token_hash, now, now),
        ).fetchone()
        if row is None:
            return None
        grant = grant_from_json(row[0])
        return grant, min(row[1], grant.expires_at)

    def revoke_family(self, family: str, now: int) -> tuple[str, ...]:
        with self.transaction():
            return self._revoke_families("family = ?", (family,), now)

    def _revoke_families(self, where: str, params: Sequence[Any], now: int) -> tuple[str, ...]:
        """Revoke the live token families ``where`` says (a condition on grants, fixed
        by the caller) with the access tokens they gave. Their grant rows are locked
        first, all in one statement, then the feed's lock is taken (last, in
        :meth:`_revoke`)."""
        families = self._q(
            f"UPDATE grants SET revoked = 1 WHERE revoked = 0 AND {where} RETURNING family, record",  # noqa: S608
            params,
        ).fetchall()
        revoked: list[tuple[str, str, int]] = []
        for family, record in sorted(families):
            server = grant_from_json(record).server
            live = self._q(
                "SELECT jti, exp FROM grant_tokens WHERE family = ? AND exp > ? ORDER BY exp",
                (family, now),
            ).fetchall()
            revoked.extend((j, server, e) for j, e in live)
            self._q("DELETE FROM grant_tokens WHERE family = ?", (family,))
            self._q("DELETE FROM refresh_tokens WHERE family = ? AND state = 'active'", (family,))
        self._revoke(revoked)
        return tuple(j for j, _, _ in revoked)

    def end_session_grants(self, sid: str, now: int) -> tuple[str, ...]:
        with self.transaction():
            return self._revoke_families("session_id = ? AND offline = 0", (sid,), now)

    def sessions(self, now: int, user_id: str | None = None) -> list[SessionRecord]:
        sql = (
            "SELECT sid, user_id, auth_time, created_at, expires_at, idle_expires_at, amr "
            "FROM sessions WHERE expires_at > ? AND idle_expires_at > ?"
        )
        params: tuple[Any, ...] = (now, now)
        if user_id is not None:
            sql += " AND user_id = ?"
            params = (*params, user_id)
        rows = self._q(sql + " ORDER BY created_at DESC, sid", params)
        return [_session(row) for row in rows]

    def session_alive(self, sid: str, now: int) -> bool:
        row = self._q(
            "SELECT 1 FROM sessions WHERE sid = ? AND expires_at > ? AND idle_expires_at > ?",
            (sid, now, now),
        ).fetchone()
        return row is not None

    def count_sessions(self, now: int) -> int:
        row = self._q(
            "SELECT count(*) FROM sessions WHERE expires_at > ? AND idle_expires_at > ?",
            (now, now),
        ).fetchone()
        return int(row[0])

    def consented_scopes(self, user_id: str, client_id: str) -> frozenset[str]:
        rows = self._q(
            "SELECT scope FROM consents WHERE user_id = ? AND client_id = ?", (user_id, client_id)
        )
        return frozenset(row[0] for row in rows)

    def add_consent(self, user_id: str, client_id: str, scopes: Iterable[str], now: int) -> None:
        self._many(
            "INSERT INTO consents (user_id, client_id, scope, granted_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, client_id, scope) "
            "DO UPDATE SET granted_at = excluded.granted_at",
            [(user_id, client_id, scope, now) for scope in scopes],
        )

    def end_session_sid(self, sid: str) -> bool:
        return self._q("DELETE FROM sessions WHERE sid = ?", (sid,)).rowcount == 1

    # -- users ---------------------------------------------------------------

    def users(self) -> list[UserRecord]:
        rows = self._q(_SELECT_USERS + " ORDER BY username_key")
        return self._with_groups(rows.fetchall())

    def user(self, user_id: str) -> UserRecord | None:
        return self._one_user(_SELECT_USER + " WHERE u.id = ?", user_id)

    def user_by_key(self, username_key: str) -> UserRecord | None:
        return self._one_user(_SELECT_USER + " WHERE u.username_key = ?", username_key)

    def _one_user(self, sql: str, key: str) -> UserRecord | None:
        """One user with their groups, in one statement (a row per group, or one row
        with no group): every sign-in, code exchange and refresh reads its user."""
        rows = self._q(sql, (key,)).fetchall()
        if not rows:
            return None
        groups = {rows[0][0]: [row[-1] for row in rows if row[-1] is not None]}
        return self._records([rows[0][:-1]], groups)[0]

    def _with_groups(self, rows: list[tuple[Any, ...]]) -> list[UserRecord]:
        if not rows:
            return []
        groups: dict[str, list[str]] = {}
        for user_id, name in self._q("SELECT user_id, name FROM user_groups"):
            groups.setdefault(user_id, []).append(name)
        return self._records(rows, groups)

    @staticmethod
    def _records(rows: Sequence[Sequence[Any]], groups: dict[str, list[str]]) -> list[UserRecord]:
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
            self._q(
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
                was = self._q("SELECT disabled FROM users WHERE id = ?", (record.id,)).fetchone()
                if was is not None and not was[0]:
                    self._end_user(record.id)
            row = _user_row(record)
            self._q(
                "UPDATE users SET username = ?, username_key = ?, password_hash = ?, "
                "profile = ?, disabled = ?, source = ?, created_at = ?, updated_at = ?, "
                "declared_hash = ? WHERE id = ?",
                (*row[1:], row[0]),
            )
            self._q("DELETE FROM user_groups WHERE user_id = ?", (record.id,))
            self._set_groups(record.id, record.groups)

    def _check_key_free(self, record: UserRecord) -> None:
        row = self._q(
            "SELECT id FROM users WHERE username_key = ?", (record.username_key,)
        ).fetchone()
        if row is not None and row[0] != record.id:
            raise UsernameTaken(record.username)

    def _set_groups(self, user_id: str, groups: Iterable[str]) -> None:
        self._many(
            "INSERT INTO user_groups (user_id, name) VALUES (?, ?)",
            [(user_id, name) for name in groups],
        )

    def _end_user(self, user_id: str) -> None:
        """A user disabled or deleted: their sessions end, and every token family of
        theirs is revoked with the access tokens it gave (onto the revocation feed)."""
        now = int(time.time())
        self._q("DELETE FROM sessions WHERE user_id = ?", (user_id,))
        self._revoke_families("user_id = ?", (user_id,), now)

    def remove_user(self, user_id: str) -> bool:
        with self.exclusive():
            self._end_user(user_id)
            self._forget_factors(user_id)
            self._q("DELETE FROM user_groups WHERE user_id = ?", (user_id,))
            self._q("DELETE FROM consents WHERE user_id = ?", (user_id,))
            return self._q("DELETE FROM users WHERE id = ?", (user_id,)).rowcount == 1

    # -- second factors --------------------------------------------------------

    def totp(self, user_id: str) -> TotpRecord | None:
        row = self._q(
            "SELECT user_id, secret, created_at, confirmed_at, last_step FROM user_totp "
            "WHERE user_id = ?",
            (user_id,),
        ).fetchone()
        return None if row is None else TotpRecord(row[0], bytes(row[1]), *row[2:])

    def begin_totp(self, user_id: str, secret: bytes, now: int) -> bool:
        cur = self._q(
            "INSERT INTO user_totp (user_id, secret, created_at, confirmed_at, last_step) "
            "VALUES (?, ?, ?, NULL, 0) ON CONFLICT (user_id) DO UPDATE SET "
            "secret = excluded.secret, created_at = excluded.created_at, last_step = 0 "
            "WHERE user_totp.confirmed_at IS NULL",
            (user_id, secret, now),
        )
        return cur.rowcount == 1

    def confirm_totp(self, user_id: str, step: int, now: int, recovery: Iterable[str]) -> bool:
        with self.transaction():
            cur = self._q(
                "UPDATE user_totp SET confirmed_at = ?, last_step = ? "
                "WHERE user_id = ? AND confirmed_at IS NULL",
                (now, step, user_id),
            )
            if cur.rowcount != 1:
                return False
            self._replace_recovery_codes(user_id, recovery)
            return True

    def _replace_recovery_codes(self, user_id: str, recovery: Iterable[str]) -> None:
        self._q("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))
        self._many(
            "INSERT INTO recovery_codes (user_id, code_hash, used_at) VALUES (?, ?, NULL)",
            [(user_id, code_hash) for code_hash in recovery],
        )

    def use_totp_step(self, user_id: str, step: int) -> bool:
        cur = self._q(  # one statement: of two uses at once (any replicas), one wins
            "UPDATE user_totp SET last_step = ? "
            "WHERE user_id = ? AND confirmed_at IS NOT NULL AND last_step < ?",
            (step, user_id, step),
        )
        return cur.rowcount == 1

    def use_recovery_code(self, user_id: str, code_hash: str, now: int) -> bool:
        cur = self._q(
            "UPDATE recovery_codes SET used_at = ? "
            "WHERE user_id = ? AND code_hash = ? AND used_at IS NULL",
            (now, user_id, code_hash),
        )
        return cur.rowcount == 1

    def take_factor_attempt(self, user_id: str, now: int, window: int, limit: int) -> int | None:
        since = now - window  # a window that started before this is over: a new one
        rows = self._q(
            "UPDATE user_totp SET "
            "attempts = CASE WHEN window_start <= ? THEN 1 ELSE attempts + 1 END, "
            "window_start = CASE WHEN window_start <= ? THEN ? ELSE window_start END "
            "WHERE user_id = ? AND (window_start <= ? OR attempts < ?) RETURNING attempts",
            (since, since, now, user_id, since, limit),
        ).fetchall()  # all: SQLite finishes the statement only then
        if rows:
            return None
        row = self._q("SELECT window_start FROM user_totp WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else max(1, int(row[0]) + window - now)

    def clear_factor_attempts(self, user_id: str) -> None:
        self._q("UPDATE user_totp SET attempts = 0 WHERE user_id = ?", (user_id,))

    def recovery_codes_left(self, user_id: str) -> int:
        row = self._q(
            "SELECT count(*) FROM recovery_codes WHERE user_id = ? AND used_at IS NULL",
            (user_id,),
        ).fetchone()
        return int(row[0])

    def add_recovery_codes(self, user_id: str, recovery: Iterable[str]) -> bool:
        with self.transaction():
            # the user's row locked first (a no-op update): of two first enrollments at
            # once, at any replicas, the second sees the first's codes
            self._q("UPDATE users SET updated_at = updated_at WHERE id = ?", (user_id,))
            if self.recovery_codes_left(user_id):
                return False
            self._replace_recovery_codes(user_id, recovery)
            return True

    _PASSKEY = (
        "SELECT credential_id, user_id, public_key, sign_count, backup_eligible, "
        "transports, aaguid, created_at, last_used_at FROM passkeys"
    )

    def passkeys(self, user_id: str) -> list[PasskeyRecord]:
        rows = self._q(
            f"{self._PASSKEY} WHERE user_id = ? ORDER BY created_at, credential_id", (user_id,)
        ).fetchall()
        return [_passkey(row) for row in rows]

    def passkey(self, credential_id: str) -> PasskeyRecord | None:
        row = self._q(f"{self._PASSKEY} WHERE credential_id = ?", (credential_id,)).fetchone()
        return None if row is None else _passkey(row)

    def add_passkey(self, record: PasskeyRecord) -> bool:
        cur = self._q(
            "INSERT INTO passkeys (credential_id, user_id, public_key, sign_count, "
            "backup_eligible, transports, aaguid, created_at, last_used_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL) ON CONFLICT DO NOTHING",
            (
                record.credential_id,
                record.user_id,
                record.public_key,
                record.sign_count,
                int(record.backup_eligible),
                json.dumps(list(record.transports)),
                record.aaguid,
                record.created_at,
            ),
        )
        return cur.rowcount == 1

    def use_passkey(self, credential_id: str, sign_count: int, now: int) -> bool:
        cur = self._q(  # one statement: of two uses at once (any replicas), one wins
            "UPDATE passkeys SET sign_count = ?, last_used_at = ? WHERE credential_id = ? "
            "AND (sign_count < ? OR (sign_count = 0 AND ? = 0))",
            (sign_count, now, credential_id, sign_count, sign_count),
        )
        return cur.rowcount == 1

    def remove_passkey(self, user_id: str, credential_id: str) -> bool:
        with self.transaction():
            gone = self._q(
                "DELETE FROM passkeys WHERE user_id = ? AND credential_id = ?",
                (user_id, credential_id),
            ).rowcount
            if gone:
                self._q("DELETE FROM known_devices WHERE user_id = ?", (user_id,))
            return gone == 1

    def reset_mfa(self, user_id: str) -> bool:
        with self.transaction():
            return self._forget_factors(user_id)

    def _forget_factors(self, user_id: str) -> bool:
        had = self._q("DELETE FROM user_totp WHERE user_id = ?", (user_id,)).rowcount
        had += self._q("DELETE FROM passkeys WHERE user_id = ?", (user_id,)).rowcount
        self._q("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))
        self._q("DELETE FROM known_devices WHERE user_id = ?", (user_id,))
        return had > 0

    def remember_device(self, device_hash: str, user_id: str, now: int) -> None:
        self._q(
            "INSERT INTO known_devices (device_hash, user_id, created_at, last_seen) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (device_hash, user_id) "
            "DO UPDATE SET last_seen = excluded.last_seen",
            (device_hash, user_id, now, now),
        )

    def device_known(self, device_hash: str, user_id: str, since: int) -> bool:
        row = self._q(
            "SELECT 1 FROM known_devices WHERE device_hash = ? AND user_id = ? AND last_seen > ?",
            (device_hash, user_id, since),
        ).fetchone()
        return row is not None

    def replace_password_hash(self, user_id: str, old: str, new: str, updated_at: int) -> bool:
        cur = self._q(
            "UPDATE users SET password_hash = ?, updated_at = ? WHERE id = ? AND password_hash = ?",
            (new, updated_at, user_id, old),
        )
        return cur.rowcount == 1


def _session(row: Sequence[Any]) -> SessionRecord:
    return SessionRecord(*row[:6], amr=tuple(json.loads(row[6])))


def _code_json(record: CodeRecord) -> str:
    return json.dumps(dataclasses.asdict(record), sort_keys=True)


def _code_record(text: str) -> CodeRecord:
    fields = json.loads(text)
    fields["id_token_claims"] = tuple(fields.get("id_token_claims", ()))
    fields["amr"] = tuple(fields.get("amr", ("pwd",)))  # codes from before second factors
    return CodeRecord(**{**fields, "scopes": tuple(fields["scopes"])})


def grant_json(grant: Grant) -> str:
    """A grant as the store keeps it (grants.record)."""
    return json.dumps(dataclasses.asdict(grant), sort_keys=True)


def grant_from_json(text: str) -> Grant:
    fields = json.loads(text)
    fields["amr"] = tuple(fields.get("amr", ("pwd",)))  # families from before second factors
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


def _passkey(row: Sequence[Any]) -> PasskeyRecord:
    return PasskeyRecord(
        credential_id=row[0],
        user_id=row[1],
        public_key=bytes(row[2]),
        sign_count=int(row[3]),
        backup_eligible=bool(row[4]),
        transports=tuple(json.loads(row[5])),
        aaguid=row[6],
        created_at=int(row[7]),
        last_used_at=None if row[8] is None else int(row[8]),
    )
