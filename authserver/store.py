"""State shared by every worker process and kept across restarts.

Signing-key records, revoked token ``jti``s and used client-assertion ``jti``s live
here, never only in one process's memory. :class:`Store` is the interface;
:class:`SqliteStore` keeps it in ``data_dir/tokengate.sqlite3`` (WAL mode). A shared
database can replace it when the authorization server runs as several replicas.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

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


class Store(Protocol):
    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold a lock that every process sharing the store respects."""

    def keys(self, server: str | None = None) -> list[KeyRecord]: ...

    def add_key(self, record: KeyRecord) -> None: ...

    def remove_key(self, server: str, kid: str) -> None: ...

    def revoke(self, jti: str, server: str, exp: int) -> None: ...

    def is_revoked(self, jti: str) -> bool: ...

    def remember_assertion(self, client_id: str, jti: str, exp: int) -> bool:
        """Record an assertion ``jti`` until ``exp``; False if it was seen before."""

    def purge(self, now: int) -> int:
        """Forget revocations and assertions past their ``exp``."""

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
CREATE TABLE IF NOT EXISTS used_assertions (
    client_id TEXT NOT NULL, jti TEXT NOT NULL, exp INTEGER NOT NULL,
    PRIMARY KEY (client_id, jti)
);
"""


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
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)

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
        self._db.execute(
            "INSERT OR IGNORE INTO revoked_tokens VALUES (?, ?, ?)", (jti, server, exp)
        )

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
            b = self._db.execute("DELETE FROM used_assertions WHERE exp < ?", (now,)).rowcount
        return a + b

    def close(self) -> None:
        self._db.close()
