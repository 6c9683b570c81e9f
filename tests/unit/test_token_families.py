"""Token families in the store, on SQLite and on PostgreSQL (where a refresh and a new
family are server-side functions): every answer of use_refresh and start_family, and
what each leaves behind, must be the same on both."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest

from authserver.codes import CODE_TTL
from authserver.sqlstore import SqlStore
from authserver.store import Grant
from tests.unit.test_codes import record as code

NOW = 1_800_000_000
DAY = 86400


@pytest.fixture
def store(store_backend: Callable[[], SqlStore]) -> Iterator[SqlStore]:
    s = store_backend()
    yield s
    s.close()


def grant(family: str, **changes: object) -> Grant:
    base = Grant(
        family=family,
        server="default",
        client_id="portal",
        user_id="u_1",
        session_id="sid-1",
        scopes=("openid", "orders:read"),
        auth_time=NOW,
        offline=False,
        expires_at=NOW + DAY,
        amr=("pwd", "otp", "mfa"),
    )
    return dataclasses.replace(base, **changes)


def keep_until(store: SqlStore, family: str) -> int:
    row = store._q("SELECT keep_until FROM grants WHERE family = ?", (family,)).fetchone()
    return int(row[0])


def test_a_family_starts_and_is_read_back_whole(store: SqlStore) -> None:
    g = grant("f1", offline=True)
    assert store.start_family(g, "rt-0", NOW + 3600, "jti-0", NOW + 300)
    assert store.refresh_grant("rt-0", NOW) == (g, NOW + 3600)
    assert store.refresh_grant("rt-0", NOW + 3600) is None  # idle end
    assert keep_until(store, "f1") == NOW + DAY
    # a family that outlives its access tokens is kept as long as the family
    assert store.start_family(grant("f2", expires_at=NOW + 60), "rt-2", NOW + 60, "j", NOW + 300)
    assert keep_until(store, "f2") == NOW + 300


def test_a_refresh_retires_the_token_and_stores_its_successor(store: SqlStore) -> None:
    g = grant("f1")
    store.start_family(g, "rt-0", NOW + 3600, "jti-0", NOW + 300)
    use = store.use_refresh("rt-0", NOW + 10, "rt-1", NOW + 7200, "jti-1", NOW + 310)
    assert use is not None
    assert (use.grant, use.status, use.jtis) == (g, "ok", ())
    assert store.refresh_grant("rt-0", NOW + 10) is None
    assert store.refresh_grant("rt-1", NOW + 10) == (g, NOW + 7200)
    # the successor's idle end never passes the family's end
    last = store.use_refresh("rt-1", NOW + 20, "rt-2", NOW + 2 * DAY, "jti-2", NOW + 320)
    assert last is not None and last.status == "ok"
    assert store.refresh_grant("rt-2", NOW + 20) == (g, NOW + DAY)
    stored = store._q("SELECT idle_expires_at FROM refresh_tokens WHERE token_hash = 'rt-2'")
    assert stored.fetchone()[0] == NOW + DAY
    # the family's access tokens are all recorded: revoking it names them
    assert sorted(store.revoke_family("f1", NOW + 30)) == ["jti-0", "jti-1", "jti-2"]


def test_an_access_token_that_outlives_the_family_keeps_it(store: SqlStore) -> None:
    store.start_family(grant("f1", expires_at=NOW + 600), "rt-0", NOW + 600, "j0", NOW + 300)
    assert keep_until(store, "f1") == NOW + 600
    store.use_refresh("rt-0", NOW + 10, "rt-1", NOW + 600, "j1", NOW + 900)
    assert keep_until(store, "f1") == NOW + 900
    store.use_refresh("rt-1", NOW + 20, "rt-2", NOW + 600, "j2", NOW + 320)
    assert keep_until(store, "f1") == NOW + 900  # never earlier


def test_a_second_use_revokes_the_family_and_every_token_it_gave(store: SqlStore) -> None:
    store.start_family(grant("f1"), "rt-0", NOW + 3600, "jti-0", NOW + 300)
    store.start_family(grant("f2"), "other", NOW + 3600, "jti-x", NOW + 300)
    store.use_refresh("rt-0", NOW, "rt-1", NOW + 3600, "jti-1", NOW + 300)
    reuse = store.use_refresh("rt-0", NOW + 1, "rt-9", NOW + 3600, "jti-9", NOW + 300)
    assert reuse is not None
    assert (reuse.grant.family, reuse.status) == ("f1", "reused")
    assert sorted(reuse.jtis) == ["jti-0", "jti-1"]  # not the one the reuse asked for
    assert store.is_revoked("jti-0") and store.is_revoked("jti-1")
    assert not store.is_revoked("jti-9")
    assert store.refresh_grant("rt-1", NOW + 1) is None and store.refresh_grant("rt-9", NOW) is None
    entries, _ = store.revocations_after("default", 0, 100, NOW)
    assert sorted(j for j, _ in entries) == ["jti-0", "jti-1"]
    # the family is over: its used token finds it revoked, its live one is gone, and
    # nothing more is revoked or stored
    again = store.use_refresh("rt-0", NOW + 2, "rt-8", NOW + 3600, "jti-8", NOW + 300)
    assert again is not None and (again.status, again.jtis) == ("revoked", ())
    assert store.use_refresh("rt-1", NOW + 2, "rt-8", NOW + 3600, "jti-8", NOW + 300) is None
    assert store.refresh_grant("rt-8", NOW + 2) is None and not store.is_revoked("jti-8")
    # another family is untouched
    assert store.refresh_grant("other", NOW + 2) is not None and not store.is_revoked("jti-x")


def test_expired_tokens_and_families_are_refused_and_left_as_they_were(store: SqlStore) -> None:
    store.start_family(grant("f1"), "idle", NOW + 100, "j1", NOW + 300)
    use = store.use_refresh("idle", NOW + 100, "next", NOW + 3600, "j2", NOW + 400)
    assert use is not None and use.status == "expired"
    assert store.refresh_grant("next", NOW) is None
    # refused, not retired: an earlier clock still finds it live
    assert store.refresh_grant("idle", NOW + 99) is not None
    store.start_family(grant("f2", expires_at=NOW + 50), "ended", NOW + 3600, "j3", NOW + 300)
    use = store.use_refresh("ended", NOW + 50, "next2", NOW + 3600, "j4", NOW + 400)
    assert use is not None and use.status == "expired"
    assert sorted(store.revoke_family("f2", NOW)) == ["j3"]  # j4 never recorded


def test_unknown_tokens_get_no_answer(store: SqlStore) -> None:
    assert store.use_refresh("nope", NOW, "next", NOW + 3600, "j", NOW + 300) is None
    store.start_family(grant("f1"), "rt-0", NOW + 3600, "jti-0", NOW + 300)
    store.revoke_family("f1", NOW)  # its live tokens go with the family
    assert store.use_refresh("rt-0", NOW, "next", NOW + 3600, "j", NOW + 300) is None


def test_a_code_family_starts_only_once_the_code_is_redeemed(store: SqlStore) -> None:
    store.add_code("c1", code())
    assert not store.start_family(grant("c1"), "rt-0", NOW + 3600, "jti-0", NOW + 300)
    assert store.refresh_grant("rt-0", NOW) is None  # nothing stored
    first = store.redeem_code("c1", NOW)
    assert first is not None and not first.reused
    assert store.start_family(grant("c1"), "rt-0", NOW + 3600, "jti-0", NOW + 3000)
    assert store.refresh_grant("rt-0", NOW) is not None
    # the code now names its access token, and is kept as long as that token lives
    again = store.redeem_code("c1", NOW + 1)
    assert again is not None and again.reused and again.jtis == ("jti-0",)
    store.purge(NOW + CODE_TTL + 10)  # past the code's own end
    assert store.redeem_code("c1", NOW + 2) is not None  # still there: jti-0 lives


def test_a_reused_code_starts_no_family(store: SqlStore) -> None:
    store.add_code("c1", code())
    assert store.redeem_code("c1", NOW) is not None
    assert store.redeem_code("c1", NOW) is not None  # a second redemption burns it
    assert not store.start_family(grant("c1"), "rt-0", NOW + 3600, "jti-0", NOW + 300)
    assert store.refresh_grant("rt-0", NOW) is None
    assert not store.code_issued("c1", "jti-1", NOW + 300)


def test_a_same_named_function_elsewhere_on_the_search_path_never_answers(pg_url: str) -> None:
    """The store calls its functions with every argument cast to the function's own
    type: a function of the same name taking integers, in a schema searched after the
    store's, would otherwise be the closer match for psycopg's int4 arguments and run
    in its place."""
    from urllib.parse import quote

    import psycopg

    from authserver.pg_store import PostgresStore
    from tests.pg import server_url

    schema = pg_url.split("search_path%3D")[1]
    other = f"{schema}_other"
    with psycopg.connect(server_url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {other}")
        answers_ok = "BEGIN status := 'ok'; SELECT g.record INTO record FROM grants g LIMIT 1; END"
        conn.execute(
            f"CREATE FUNCTION {other}.tokengate_use_refresh(a TEXT, b INTEGER, c TEXT, "
            "d INTEGER, e TEXT, f INTEGER, OUT status TEXT, OUT record TEXT) "
            f"LANGUAGE plpgsql AS $$ {answers_ok} $$"
        )
        conn.execute(
            f"CREATE FUNCTION {other}.tokengate_start_family(a TEXT, b TEXT, c TEXT, "
            "d TEXT, e INTEGER, f INTEGER, g TEXT, h INTEGER, i TEXT, j INTEGER) "
            "RETURNS BOOLEAN LANGUAGE sql AS $$ SELECT false $$"
        )
    try:
        url = pg_url.replace(
            quote(f"-csearch_path={schema}", safe=""),
            quote(f"-csearch_path={schema},{other}", safe=""),
        )
        store = PostgresStore(url, pool_size=1)
        try:
            now = 1_000_000  # small enough for int4
            assert store.start_family(grant("f1"), "rt-0", now + 600, "j0", now + 300)
            assert store.use_refresh("no-such-token", now, "s", now + 600, "j", now + 300) is None
        finally:
            store.close()
    finally:
        with psycopg.connect(server_url(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {other} CASCADE")
