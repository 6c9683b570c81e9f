"""The store's revocation log: what the revocation feed pages through with a cursor."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from authserver.sqlite_store import SqliteStore
from authserver.sqlstore import SqlStore
from authserver.store import Grant, SessionRecord

NOW = 1_800_000_000


@pytest.fixture
def store(store_backend: Callable[[], SqlStore]) -> Iterator[SqlStore]:
    """Each test on SQLite and on PostgreSQL."""
    s = store_backend()
    yield s
    s.close()


def grant(family: str, *, offline: bool = False) -> Grant:
    return Grant(
        family=family,
        server="default",
        client_id="portal",
        user_id="u_1",
        session_id="sid-1",
        scopes=("openid",),
        auth_time=NOW,
        offline=offline,
        expires_at=NOW + 86400,
    )


def test_revocations_come_in_order_after_a_cursor(store: SqlStore) -> None:
    store.revoke("a", "default", NOW + 60)
    store.revoke("b", "partners", NOW + 60)
    store.revoke("c", "default", NOW + 120)
    store.revoke("a", "default", NOW + 60)  # again: logged once
    entries, cursor = store.revocations_after("default", 0, 100, NOW)
    assert entries == [("a", NOW + 60), ("c", NOW + 120)]
    assert store.revocations_after("default", cursor, 100, NOW) == ([], cursor)
    assert store.revocations_after("partners", 0, 100, NOW)[0] == [("b", NOW + 60)]
    first, page = store.revocations_after("default", 0, 1, NOW)
    assert first == [("a", NOW + 60)]
    assert store.revocations_after("default", page, 1, NOW)[0] == [("c", NOW + 120)]


def test_entries_leave_at_their_exp(store: SqlStore) -> None:
    store.revoke("soon", "default", NOW + 10)
    store.revoke("later", "default", NOW + 100)
    assert store.revocations_after("default", 0, 100, NOW + 11)[0] == [("later", NOW + 100)]
    store.purge(NOW + 11)
    assert store.revocations_after("default", 0, 100, NOW)[0] == [("later", NOW + 100)]


def test_a_cursor_from_another_store_starts_over(store: SqlStore) -> None:
    store.revoke("a", "default", NOW + 60)
    assert store.revocations_after("default", 10**9, 100, NOW)[0] == [("a", NOW + 60)]


def test_family_revocations_reach_the_log(store: SqlStore) -> None:
    """Reuse, revocation of a refresh token and logout all end families through
    revoke_family: their access tokens join the feed."""
    store.add_session("h", SessionRecord("sid-1", "u_1", NOW, NOW, NOW + 3600, NOW + 3600))
    assert store.start_family(grant("f1"), "t1", NOW + 3600, "jti-1", NOW + 300)
    assert store.start_family(grant("f2"), "t2", NOW + 3600, "jti-2", NOW + 300)
    use = store.use_refresh("t1", NOW, "t1b", NOW + 3600, "jti-1b", NOW + 600)
    assert use is not None and use.status == "ok"
    reuse = store.use_refresh("t1", NOW + 1, "t1c", NOW + 3600, "jti-1c", NOW + 600)
    assert reuse is not None and reuse.status == "reused"
    assert store.end_session_grants("sid-1", NOW + 2) == ("jti-2",)
    entries, _ = store.revocations_after("default", 0, 100, NOW)
    assert entries == [("jti-1", NOW + 300), ("jti-1b", NOW + 600), ("jti-2", NOW + 300)]


def as_before_versions(db: sqlite3.Connection) -> None:
    """Make a new store look like one from before schema versions were recorded."""
    db.execute("DROP TABLE schema_migrations")
    db.execute("ALTER TABLE signing_keys DROP COLUMN private_key")
    db.execute("DROP TABLE user_totp")
    db.execute("DROP TABLE recovery_codes")
    db.execute("ALTER TABLE sessions DROP COLUMN amr")
    db.execute("ALTER TABLE interactions DROP COLUMN progress")
    db.execute("DROP TABLE known_devices")
    db.execute("DROP TABLE passkeys")


def test_an_older_store_brings_its_revocations_into_the_log(tmp_path: Path) -> None:
    SqliteStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / SqliteStore.FILENAME)
    as_before_versions(db)
    db.execute("DROP TABLE revocation_log")
    db.execute("INSERT INTO revoked_tokens VALUES ('old', 'default', ?)", (NOW + 60,))
    db.commit()
    db.close()
    store = SqliteStore(tmp_path)
    try:
        assert store.revocations_after("default", 0, 100, NOW)[0] == [("old", NOW + 60)]
    finally:
        store.close()


def test_a_family_s_access_tokens_are_rows_and_old_json_lists_are_moved(
    tmp_path: Path,
) -> None:
    """Every refresh adds one row (its cost does not grow with the family's age); a
    store whose families listed their access tokens as JSON in grants.jtis has them
    moved into rows when it is opened, so revoking the family still revokes them."""
    store = SqliteStore(tmp_path)
    assert store.start_family(grant("fam"), "rt-0", NOW + 600, "jti-0", NOW + 300)
    for i in range(1, 4):
        use = store.use_refresh(f"rt-{i - 1}", NOW + i, f"rt-{i}", NOW + 600, f"jti-{i}", NOW + 300)
        assert use is not None and use.status == "ok"
    legacy = grant("legacy")
    assert store.start_family(legacy, "rt-legacy", NOW + 600, "jti-x", NOW + 300)
    store.close()
    with sqlite3.connect(tmp_path / SqliteStore.FILENAME) as db:  # as an earlier release kept it
        as_before_versions(db)
        db.execute("DELETE FROM grant_tokens WHERE family = 'legacy'")
        db.execute(
            "UPDATE grants SET jtis = ? WHERE family = 'legacy'",
            (json.dumps([["jti-old", NOW + 300], ["jti-gone", NOW - 1]]),),
        )
    store = SqliteStore(tmp_path)
    try:
        assert sorted(store.revoke_family("fam", NOW + 5)) == ["jti-0", "jti-1", "jti-2", "jti-3"]
        assert store.revoke_family("legacy", NOW + 5) == ("jti-old",)  # jti-gone had expired
        assert store.is_revoked("jti-old") and not store.is_revoked("jti-gone")
    finally:
        store.close()
