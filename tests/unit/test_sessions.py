"""Browser sessions: random ids stored hashed, idle and absolute ends, and cookies
that are HttpOnly, SameSite=Lax and, on https, Secure with the __Host- prefix."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie

import pytest

from authserver.config import SessionTimes
from authserver.sessions import (
    clear_cookie,
    cookie_name,
    new_session,
    read_cookie,
    session_hash,
    set_cookie,
    valid_session_value,
)
from authserver.sqlstore import SqlStore
from tests.pg import dump_store

NOW = 1_800_000_000
POLICY = SessionTimes(idle_timeout=7200, max_lifetime=86400)


@pytest.fixture
def store(store_backend: Callable[[], SqlStore]) -> Iterator[SqlStore]:
    """Each test on SQLite and on PostgreSQL."""
    s = store_backend()
    yield s
    s.close()


def test_each_session_is_fresh_and_its_sid_is_not_its_cookie() -> None:
    sessions = [new_session("u1", NOW, POLICY) for _ in range(200)]
    values = {s.cookie_value for s in sessions}
    assert len(values) == 200 and all(valid_session_value(v) for v in values)
    assert len({s.record.sid for s in sessions}) == 200
    for s in sessions[:5]:
        assert s.record.sid != s.cookie_value
        assert s.session_hash == session_hash(s.cookie_value) != s.cookie_value
        assert (s.record.auth_time, s.record.created_at) == (NOW, NOW)
        assert s.record.expires_at == NOW + 86400
        assert s.record.idle_expires_at == NOW + 7200


def test_the_store_holds_only_the_hash(store: SqlStore) -> None:
    s = new_session("u1", NOW, POLICY)
    store.add_session(s.session_hash, s.record)
    dump = dump_store(store)
    assert s.cookie_value not in dump and s.session_hash in dump


def test_use_moves_the_idle_end_and_idleness_ends_it(store: SqlStore) -> None:
    s = new_session("u1", NOW, POLICY)
    store.add_session(s.session_hash, s.record)
    touched = store.touch_session(s.session_hash, NOW + 7000, 7200)
    assert touched is not None and touched.idle_expires_at == NOW + 14200
    assert touched.user_id == "u1" and touched.sid == s.record.sid
    assert store.touch_session(s.session_hash, NOW + 14199, 7200) is not None
    assert store.touch_session(s.session_hash, NOW + 14199 + 7200, 7200) is None  # idle
    assert store.touch_session(s.session_hash, NOW, 7200) is None  # and gone


def test_the_absolute_end_holds_however_busy_the_session(store: SqlStore) -> None:
    s = new_session("u1", NOW, POLICY)
    store.add_session(s.session_hash, s.record)
    for t in range(NOW, NOW + 86400, 3600):
        touched = store.touch_session(s.session_hash, t, 7200)
        assert touched is not None and touched.idle_expires_at <= NOW + 86400
    assert store.touch_session(s.session_hash, NOW + 86400, 7200) is None


def test_unknown_and_ended_sessions(store: SqlStore) -> None:
    s = new_session("u1", NOW, POLICY)
    assert store.touch_session(s.session_hash, NOW, 7200) is None
    store.add_session(s.session_hash, s.record)
    other = s.cookie_value[:-1] + ("B" if s.cookie_value.endswith("A") else "A")
    assert store.touch_session(session_hash(other), NOW, 7200) is None
    assert store.end_session(s.session_hash)
    assert not store.end_session(s.session_hash)
    assert store.touch_session(s.session_hash, NOW, 7200) is None


def test_purge_forgets_ended_sessions(store: SqlStore) -> None:
    idle, live = new_session("u1", NOW, POLICY), new_session("u2", NOW + 7000, POLICY)
    store.add_session(idle.session_hash, idle.record)
    store.add_session(live.session_hash, live.record)
    assert store.purge(NOW + 7200) == 1
    assert store.touch_session(live.session_hash, NOW + 7200, 7200) is not None


@pytest.mark.parametrize("secure", [True, False])
def test_the_cookie_attributes(secure: bool) -> None:
    header = set_cookie("v" * 43, secure=secure).decode()
    cookie = SimpleCookie()
    cookie.load(header)
    name = "__Host-tg_session" if secure else "tg_session"
    assert cookie_name(secure) == name
    morsel = cookie[name]
    assert morsel.value == "v" * 43
    assert morsel["path"] == "/" and morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert bool(morsel["secure"]) is secure
    assert not morsel["domain"] and not morsel["max-age"] and not morsel["expires"]
    cleared = SimpleCookie()
    cleared.load(clear_cookie(secure=secure).decode())
    assert cleared[name].value == "" and cleared[name]["max-age"] == "0"
    assert cleared[name]["path"] == "/"


def test_reading_the_cookie() -> None:
    v = "a" * 43
    assert read_cookie([f"x=1; tg_session={v}; y=2".encode()], "tg_session") == v
    assert read_cookie([b"x=1", f"tg_session={v}".encode()], "tg_session") == v
    assert read_cookie([], "tg_session") is None
    assert read_cookie([b"tg_sessionx=1"], "tg_session") is None
    # twice (a cookie tossed in by a sibling host, say): trust neither
    assert read_cookie([f"tg_session={v}; tg_session={v}".encode()], "tg_session") is None
    assert read_cookie([f"tg_session={v}".encode()] * 2, "tg_session") is None
    assert not valid_session_value("a" * 42)
    assert not valid_session_value("a" * 42 + "=")
    assert not valid_session_value(None)
