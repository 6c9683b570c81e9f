"""The embedded store: SQLite in WAL mode, one file in the data dir."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from authserver import migrations
from authserver.sqlstore import Rows, SqlStore
from authserver.store import StoreMissing

WAL_WAIT = 30.0  # seconds to keep trying to switch a new store to WAL


class SqliteStore(SqlStore):
    """:class:`~authserver.store.Store` on SQLite in WAL mode; safe for several
    processes of one machine at once. Opening it applies missing migrations.

    ``create``: make the data dir and the database when they are not there (the
    server's first start). Without it, a missing store is :class:`StoreMissing` and
    nothing is created: a command pointed at the wrong directory must not start an
    empty store that no server reads."""

    FILENAME = "tokengate.sqlite3"
    KEY_SEQ = "rowid"

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
        self.migration = migrations.migrate(self, migrations.SQLITE)

    def __str__(self) -> str:
        return f"sqlite:{self.path}"

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

    def _q(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        return self._db.execute(sql, params)

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return self.exclusive()  # SQLite has one writer at a time anyway

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

    def _feed_high_water(self) -> int:
        row = self._db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'revocation_log'"
        ).fetchone()
        return row[0] if row is not None else 0

    def close(self) -> None:
        self._db.close()
