"""PostgreSQL for the tests: one fresh schema per test in the machine's database.

``TOKENGATE_TEST_POSTGRES`` names the server (default: the development machines' and
CI's ``postgresql://postgres@127.0.0.1:5432/test``). Without one reachable, tests
that need it skip with a line saying so, unless ``TOKENGATE_REQUIRE_POSTGRES`` or
``CI`` is set: then they fail, so a CI run never passes without them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
URL_ENV = "TOKENGATE_TEST_POSTGRES"
REQUIRE_ENV = "TOKENGATE_REQUIRE_POSTGRES"


def server_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def with_schema(url: str, schema: str) -> str:
    """``url`` with every connection's search_path set to ``schema``."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) or os.environ.get("CI"):
        pytest.fail(f"PostgreSQL: {reason}, and {REQUIRE_ENV} or CI requires it", pytrace=False)
    pytest.skip(f"PostgreSQL: {reason} (set {URL_ENV})")


def fresh_schema() -> Iterator[str]:
    """A URL of a new, empty schema, dropped after the test."""
    schema = f"tg_test_{secrets.token_hex(6)}"
    yield from _made_and_dropped(
        f"CREATE SCHEMA {schema}", f"DROP SCHEMA {schema} CASCADE", with_schema, schema
    )


def fresh_database() -> Iterator[str]:
    """A URL of a new, empty database, dropped after the test: for a test that holds
    the store's advisory locks, which are per database, so that it stalls no other
    test running at the same time."""
    import psycopg.conninfo

    name = f"tg_test_{secrets.token_hex(6)}"
    yield from _made_and_dropped(
        f"CREATE DATABASE {name}",
        f"DROP DATABASE {name} WITH (FORCE)",
        lambda base, db: psycopg.conninfo.make_conninfo(base, dbname=db),
        name,
    )


def _made_and_dropped(
    create: str, drop: str, url_of: Callable[[str, str], str], name: str
) -> Iterator[str]:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - installed with the package
        _unavailable("psycopg is not installed")
        raise
    base = server_url()
    try:
        with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
            conn.execute(create)
    except psycopg.OperationalError as exc:
        _unavailable(f"cannot connect to {base}: {str(exc).strip().splitlines()[0]}")
    try:
        yield url_of(base, name)
    finally:
        with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
            conn.execute(drop)


def dump_store(store: object) -> str:
    """Every row of every table of a store, as text: to show what it never holds."""
    db = getattr(store, "_db", None)
    if db is not None:  # SQLite
        return "\n".join(db.iterdump())
    q = store._q  # type: ignore[attr-defined]
    tables = [
        row[0]
        for row in q(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
    ]
    return "\n".join(repr(row) for t in tables for row in q(f"SELECT * FROM {t}"))  # noqa: S608
