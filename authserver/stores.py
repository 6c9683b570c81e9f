"""Opens the store a configuration names: PostgreSQL for ``authserver.store``, else
SQLite in ``data_dir``."""

from __future__ import annotations

from authserver.config import AuthServerConfig
from authserver.sqlstore import SqlStore


def open_store(config: AuthServerConfig, *, create: bool = True) -> SqlStore:
    """The configured store, migrated. ``create``: SQLite may create a missing data
    dir and database (the server's start); commands pass False. Raises StoreMissing,
    StoreUnavailable or the engine's error."""
    if config.store is not None:
        from authserver.pg_store import PostgresStore

        return PostgresStore(config.store)
    from authserver.sqlite_store import SqliteStore

    return SqliteStore(config.data_dir, create=create)
