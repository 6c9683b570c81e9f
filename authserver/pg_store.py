"""The shared store: PostgreSQL through psycopg 3 and its connection pool.

Several authorization-server replicas (and their worker processes) share one
database. Statements run on pooled connections in autocommit; a read-modify-write runs
in one transaction (READ COMMITTED). What races on one row (a refresh token family, a
code) locks that row, so refreshes of different families run side by side; store-wide
changes (keys, users, purge, migrations) hold a transaction-level advisory lock, the
counterpart of SQLite's ``BEGIN IMMEDIATE``; revocations take a second advisory lock,
the feed's, last and to commit, so feed sequence numbers commit in the order they
were handed out (see :mod:`authserver.sqlstore` for the lock order). A refresh and the
start of a token family each run as one statement, a function on the server: psycopg
spends more CPU per statement than PostgreSQL does running one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg.pq import ExecStatus
from psycopg_pool import ConnectionPool, PoolTimeout

from authserver import migrations
from authserver.sqlstore import Rows, SqlStore, grant_from_json, grant_json
from authserver.store import Grant, RefreshUse, StoreUnavailable

# pg_advisory_xact_lock keys, big-endian int64s: the store-wide lock ("tokengat")
# and the revocation feed's ("tgfeed00")
STORE_LOCK = int.from_bytes(b"tokengat", "big", signed=True)
FEED_LOCK = int.from_bytes(b"tgfeed00", "big", signed=True)
TUPLES_OK = ExecStatus.TUPLES_OK  # a statement that returns rows (even none)
POOL_SIZE = 8
CONNECT_TIMEOUT = 10.0  # seconds to wait for the first connection at start
CHECKOUT_TIMEOUT = 5.0  # seconds a store call waits for a free connection
# A replica that stalls (or is cut off) holding the store's lock must not hang the
# others: waiting for the lock, or any statement, ends in StoreUnavailable (a 503).
LOCK_TIMEOUT = "5s"
REVOCATIONS_CHANNEL = "tokengate_revocations"  # NOTIFY: something was revoked (payload: server)
LISTEN_RETRY_MAX = 10.0  # seconds between attempts to listen again after a lost connection
STATEMENT_TIMEOUT = "10s"
# Dead peers are noticed in seconds, not at the kernel's two-hour default.
CONNECTION = {
    "autocommit": True,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 15000,
}


class _Connection(psycopg.Connection[Any]):
    """A pooled connection with one cursor that the store reads every statement's rows
    off at once: a new cursor for each statement would cost about a third of a short
    statement's CPU."""

    _store_cursor: psycopg.Cursor[Any] | None = None

    def store_cursor(self) -> psycopg.Cursor[Any]:
        cursor = self._store_cursor
        if cursor is None or cursor.closed:
            cursor = self._store_cursor = self.cursor()
        return cursor


@dataclass(frozen=True, slots=True)
class _Result:
    """A statement's rows, read off its cursor before the connection goes back."""

    rows: list[Any]
    rowcount: int

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


def redact(url: str) -> str:
    """``url`` without its password (or anything else but where it points), for logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host', '')}{port}/{info.get('dbname', '')}"


class PostgresStore(SqlStore):
    """:class:`~authserver.store.Store` on PostgreSQL. Opening it connects (a clear
    :class:`StoreUnavailable` when it cannot) and, unless ``migrate`` is False,
    applies missing migrations under the store's lock."""

    KEY_SEQ = "seq"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = POOL_SIZE,
        migrate: bool = True,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.url = redact(url)
        self._conninfo = url
        self._listener: threading.Thread | None = None
        self._closing = threading.Event()
        self.threads = pool_size
        # the connection of this thread's transaction, and whether it is exclusive
        self._local = threading.local()
        self._sql: dict[str, str] = {}
        try:  # one connection first: its error says why (the pool's only "timed out")
            psycopg.connect(url, connect_timeout=max(1, round(connect_timeout))).close()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to {self.url}: {_reason(exc)}") from None
        self._pool = ConnectionPool(
            url,
            connection_class=_Connection,
            min_size=1,
            max_size=pool_size,
            kwargs=CONNECTION,
            configure=_configure,
            timeout=CHECKOUT_TIMEOUT,
            name="tokengate-store",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            self._pool.close()
            raise StoreUnavailable(f"cannot connect to {self.url}: {_reason(exc)}") from None
        try:
            self.migration = migrations.migrate(self, migrations.POSTGRES) if migrate else None
        except BaseException:
            self._pool.close()
            raise

    def __str__(self) -> str:
        return self.url

    def _text(self, sql: str) -> str:
        text = self._sql.get(sql)
        if text is None:
            text = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return text

    def _q(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        # without parameters the statement goes as written ("?" and "%" included: a
        # migration's function body)
        text, args = (self._text(sql), params) if params else (sql, None)
        try:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                return _read(conn.store_cursor().execute(text, args))
            with self._pool.connection() as conn:
                return _read(conn.store_cursor().execute(text, args))
        except (PoolTimeout, psycopg.Error) as exc:
            raise StoreUnavailable(f"{self.url}: {_reason(exc)}") from exc

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        text = self._text(sql)
        batch = list(rows)
        if not batch:
            return
        try:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.cursor().executemany(text, batch)
                return
            with self._pool.connection() as conn:
                conn.cursor().executemany(text, batch)
        except (PoolTimeout, psycopg.Error) as exc:
            raise StoreUnavailable(f"{self.url}: {_reason(exc)}") from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:  # nested: joins the outer one
            yield
            return
        try:
            with self._pool.connection() as conn, conn.transaction():
                self._local.conn = conn
                try:
                    yield
                finally:
                    self._local.conn = None
                    self._local.exclusive = False
        except (PoolTimeout, psycopg.Error) as exc:
            raise StoreUnavailable(f"{self.url}: {_reason(exc)}") from exc

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:
            if not getattr(self._local, "exclusive", False):  # the lock order's first
                raise RuntimeError("the store-wide lock is taken before any row lock")
            yield
            return
        with self.transaction():
            self._q("SELECT pg_advisory_xact_lock(?)", (STORE_LOCK,))
            self._local.exclusive = True
            yield

    # The two writes of every refresh and every code exchange, as server-side functions
    # (migration 7): SqlStore's statements for them, one statement each here. Every
    # argument is cast to the function's own type: with a bare int4 argument PostgreSQL
    # would pick the closest match across the whole search_path, so a function of the
    # same name taking integers, in any schema on it, would answer instead.

    def start_family(
        self, grant: Grant, token_hash: str, idle_expires_at: int, jti: str, exp: int
    ) -> bool:
        row = self._q(
            "SELECT tokengate_start_family(?::text, ?::text, ?::text, ?::text, ?::integer, "
            "?::bigint, ?::text, ?::bigint, ?::text, ?::bigint)",
            (
                grant.family,
                grant_json(grant),
                grant.session_id,
                grant.user_id,
                int(grant.offline),
                grant.expires_at,
                token_hash,
                idle_expires_at,
                jti,
                exp,
            ),
        ).fetchone()
        return bool(row[0])

    def use_refresh(
        self,
        token_hash: str,
        now: int,
        successor: str,
        idle_expires_at: int,
        jti: str,
        exp: int,
    ) -> RefreshUse | None:
        status, record = self._q(  # autocommit: the function is one transaction
            "SELECT status, record FROM tokengate_use_refresh("
            "?::text, ?::bigint, ?::text, ?::bigint, ?::text, ?::bigint)",
            (token_hash, now, successor, idle_expires_at, jti, exp),
        ).fetchone()
        if status == "reused":  # which changed nothing: the shared code, in one
            # transaction, finds the reuse again (or a revocation since) and revokes
            return super().use_refresh(token_hash, now, successor, idle_expires_at, jti, exp)
        if status is None:
            return None
        return RefreshUse(grant_from_json(record), status)

    def _lock_feed(self) -> None:
        self._q("SELECT pg_advisory_xact_lock(?)", (FEED_LOCK,))

    def _announce_revocation(self, server: str) -> None:
        self._q("SELECT pg_notify(?, ?)", (REVOCATIONS_CHANNEL, server))

    def follow_revocations(self, heard: Callable[[], None]) -> bool:
        if self._listener is None:
            self._listener = threading.Thread(
                target=self._listen, args=(heard,), name="store-listen", daemon=True
            )
            self._listener.start()
        return True

    def _listen(self, heard: Callable[[], None]) -> None:
        """LISTEN on a connection of its own until the store closes; after a lost
        connection, listen again with backoff (held requests poll meanwhile)."""
        delay = 0.5
        while not self._closing.is_set():
            try:
                with psycopg.connect(self._conninfo, **CONNECTION) as conn:
                    conn.execute(f"LISTEN {REVOCATIONS_CHANNEL}")
                    delay = 0.5
                    heard()  # anything revoked while nobody listened is read now
                    while not self._closing.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            heard()
            except psycopg.Error:
                self._closing.wait(delay)
                delay = min(delay * 2, LISTEN_RETRY_MAX)

    def _feed_high_water(self) -> int:
        row = self._q(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM revocation_log_seq_seq"
        ).fetchone()
        return int(row[0])

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self._pool.close()


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Each pooled connection's own limits (set once, when it is opened)."""
    conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
    conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")


def _read(cursor: psycopg.Cursor[Any]) -> _Result:
    result = cursor.pgresult
    rows = cursor.fetchall() if result is not None and result.status == TUPLES_OK else []
    return _Result(rows, cursor.rowcount)


def _reason(exc: BaseException) -> str:
    """An error's first line: libpq's messages run on with hints and context."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
