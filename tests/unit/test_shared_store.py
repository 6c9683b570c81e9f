"""Several replicas on one store: races put in order, migrations applied once, the
revocation feed without gaps, signing keys sealed with the key encryption key.

Each test runs on SQLite (several connections, as worker processes have) and on
PostgreSQL (several pools, as replicas have)."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from authserver import migrations
from authserver.config import ServerConfig
from authserver.keys import KeyFiles, KeyManager
from authserver.keyseal import KeyUnsealError, seal, unseal
from authserver.sqlstore import SqlStore
from authserver.store import StoreUnavailable
from tests.conftest import FakeClock
from tests.unit.test_revocation_log import grant

NOW = 1_800_000_000
SERVER = ServerConfig("default", "http://x/oauth2/default", "api://x", "ES256", 3600, ())
KEK = os.urandom(32)

Opener = Callable[[], SqlStore]


def at_once(n: int, work: Callable[[int], object]) -> list[object]:
    """``work(i)`` on n threads released together; their results in order."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_one_refresh_token_used_at_several_replicas_at_once_wins_once(
    store_backend: Opener,
) -> None:
    replicas = [store_backend() for _ in range(4)]
    assert replicas[0].start_family(
        grant("fam", offline=True), "rt-0", NOW + 600, "jti-0", NOW + 300
    )
    uses = at_once(
        4,
        lambda i: replicas[i].use_refresh(
            "rt-0", NOW, f"rt-{i + 1}", NOW + 600, f"j{i}", NOW + 300
        ),
    )
    statuses = sorted(u.status for u in uses)  # type: ignore[attr-defined]
    # one wins; the next is reuse, which revokes the family; the rest find it revoked
    assert statuses == ["ok", "reused", "revoked", "revoked"]
    # the reuse revoked the family: the winner's successor is dead, its token revoked
    winner = next(i for i, u in enumerate(uses) if u.status == "ok")  # type: ignore[attr-defined]
    assert replicas[1].refresh_grant(f"rt-{winner + 1}", NOW) is None
    assert replicas[2].is_revoked(f"j{winner}") and replicas[3].is_revoked("jti-0")


def test_an_assertion_jti_replayed_at_another_replica_is_refused(store_backend: Opener) -> None:
    replicas = [store_backend() for _ in range(4)]
    seen = at_once(4, lambda i: replicas[i].remember_assertion("billing", "a-1", NOW + 60))
    assert sorted(seen) == [False, False, False, True]  # type: ignore[type-var]


def test_replicas_opening_a_new_store_at_once_apply_each_migration_once(
    store_backend: Opener,
) -> None:
    opened = at_once(4, lambda _: store_backend())
    applied = [s.migration.applied for s in opened]  # type: ignore[attr-defined]
    assert sorted(applied) == [(), (), (), (1, 2, 3, 4, 5, 6, 7)]
    rows = opened[0]._q("SELECT version FROM schema_migrations ORDER BY version").fetchall()  # type: ignore[attr-defined]
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert all(s.migration.version == 7 for s in opened)  # type: ignore[attr-defined]


def test_a_store_migrated_by_a_newer_release_still_opens(store_backend: Opener) -> None:
    store = store_backend()
    store._q("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    again = store_backend()
    assert again.migration is not None and again.migration.ahead
    assert (again.migration.version, again.migration.known) == (99, 7)


def test_the_feed_misses_nothing_revoked_at_several_replicas_at_once(
    store_backend: Opener,
) -> None:
    """A follower that reads while replicas revoke never skips an entry: sequence
    numbers commit in the order they are handed out."""
    replicas = [store_backend() for _ in range(3)]
    reader = store_backend()
    seen: list[str] = []
    stop = threading.Event()

    def follow() -> None:
        cursor = 0
        while True:
            done = stop.is_set()
            entries, cursor = reader.revocations_after("default", cursor, 1000, NOW)
            seen.extend(jti for jti, _ in entries)
            if done:
                return

    follower = threading.Thread(target=follow)
    follower.start()
    at_once(
        3,
        lambda i: [replicas[i].revoke(f"r{i}-{n}", "default", NOW + 60) for n in range(40)],
    )
    stop.set()
    follower.join()
    assert sorted(seen) == sorted(f"r{i}-{n}" for i in range(3) for n in range(40))
    assert len(seen) == len(set(seen))


# --------------------------------------------------------------------------- keys


def manager(store: SqlStore, data: Path, kek: bytes | None, clock: FakeClock) -> KeyManager:
    return KeyManager(store, KeyFiles(data), jwks_max_age=60, leeway=30, clock=clock, kek=kek)


def test_with_a_key_encryption_key_keys_live_sealed_in_the_store(
    store_backend: Opener, tmp_path: Path
) -> None:
    clock = FakeClock(NOW)
    a = manager(store_backend(), tmp_path / "a", KEK, clock)
    record = a.ensure(SERVER)
    assert record is not None
    assert not (tmp_path / "a" / "keys").exists()  # no file: the store holds it
    sealed = a.store.private_key("default", record.kid)
    assert sealed is not None and sealed.startswith(b"tgk1")
    der = a.signing_key(record).private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert der not in sealed
    # another replica, another data dir: the same key, unsealed
    b = manager(store_backend(), tmp_path / "b", KEK, clock)
    assert b.ensure(SERVER) is None
    assert b.signing_key(b.store.keys("default")[0]).jwk == a.signing_key(record).jwk


@pytest.mark.parametrize("kek", [os.urandom(32), None], ids=["wrong key", "no key"])
def test_a_key_that_does_not_open_is_an_error_never_a_new_key(
    store_backend: Opener, tmp_path: Path, kek: bytes | None
) -> None:
    clock = FakeClock(NOW)
    record = manager(store_backend(), tmp_path, KEK, clock).ensure(SERVER)
    assert record is not None
    other = manager(store_backend(), tmp_path, kek, clock)
    assert other.ensure(SERVER) is None  # a fitting key exists: none is made
    with pytest.raises(KeyUnsealError, match="key_encryption_key"):
        other.signing_key(record)
    assert [r.kid for r in other.store.keys("default")] == [record.kid]


def test_scheduled_rotation_is_published_once_by_one_replica(
    store_backend: Opener, tmp_path: Path
) -> None:
    clock = FakeClock(NOW)
    every = 3600
    replicas = [manager(store_backend(), tmp_path, KEK, clock) for _ in range(3)]
    first = replicas[0].ensure(SERVER)
    assert first is not None
    lead = replicas[0].rotation_lead
    clock.advance(every - lead - 1)
    assert at_once(3, lambda i: replicas[i].rotate_if_due(SERVER, every)) == [None] * 3
    clock.advance(1)  # the next key must be out one JWKS lifetime before it signs
    made = [r for r in at_once(3, lambda i: replicas[i].rotate_if_due(SERVER, every)) if r]
    assert len(made) == 1
    assert made[0].activate_at == first.activate_at + every  # type: ignore[attr-defined]
    states = {s.record.kid: s.state for s in replicas[2].schedule(SERVER)}
    assert states == {first.kid: "active", made[0].kid: "next"}  # type: ignore[attr-defined]
    clock.advance(lead)
    states = {s.record.kid: s.state for s in replicas[1].schedule(SERVER)}
    assert states == {first.kid: "retired", made[0].kid: "active"}  # type: ignore[attr-defined]


def test_a_sealed_key_is_bound_to_its_record() -> None:
    sealed = seal(KEK, "default", "kid-1", b"private")
    assert unseal(KEK, "default", "kid-1", sealed) == b"private"
    for server, kid in (("other", "kid-1"), ("default", "kid-2")):
        with pytest.raises(KeyUnsealError):
            unseal(KEK, server, kid, sealed)
    with pytest.raises(KeyUnsealError, match="not a sealed key"):
        unseal(KEK, "default", "kid-1", b"-----BEGIN PRIVATE KEY-----")
    assert base64.b64encode(KEK)  # a KEK is 32 bytes: AES-256


def test_an_unreachable_postgresql_is_a_clear_error() -> None:
    from authserver.pg_store import PostgresStore

    with pytest.raises(
        StoreUnavailable, match=r"cannot connect to postgresql://tg@127\.0\.0\.1:1/x"
    ):
        PostgresStore("postgresql://tg:hunter2@127.0.0.1:1/x", connect_timeout=1)


def test_every_migration_is_known_to_both_backends() -> None:
    assert [m.version for m in migrations.SQLITE] == [m.version for m in migrations.POSTGRES]
    assert [m.name for m in migrations.SQLITE] == [m.name for m in migrations.POSTGRES]


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    from tests.pg import fresh_database

    yield from fresh_database()


def test_a_replica_stuck_holding_a_lock_costs_others_a_503_not_a_hang(
    pg_database_url: str,
) -> None:
    """Waiting for one of the store's locks ends (lock_timeout): a StoreUnavailable the
    endpoints answer 503 with, never a request that hangs with its replica. And only
    what needs that lock waits."""
    import time

    import psycopg

    from authserver.pg_store import FEED_LOCK, STORE_LOCK, PostgresStore

    pg_url = pg_database_url

    store = PostgresStore(pg_url, pool_size=2)
    store.start_family(grant("fam", offline=True), "rt-0", NOW + 600, "jti-0", NOW + 300)
    with psycopg.connect(pg_url) as holder:  # another replica, stalled mid-transaction
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (STORE_LOCK,))
        # refreshes and revocations do not need the store-wide lock
        started = time.monotonic()
        use = store.use_refresh("rt-0", NOW, "rt-1", NOW + 600, "jti-1", NOW + 300)
        assert use is not None and use.status == "ok"
        store.revoke("jti-x", "default", NOW + 60)
        assert time.monotonic() - started < 2
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="LockNotAvailable"):
            store.purge(NOW)
        assert 4.5 < time.monotonic() - started < 8
    with psycopg.connect(pg_url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (FEED_LOCK,))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="LockNotAvailable"):
            store.revoke("jti-1", "default", NOW + 60)
        assert 4.5 < time.monotonic() - started < 8
        # one statement without the lock still works meanwhile
        assert store.touch_session("no-such-session", NOW, 60) is None
    store.revoke("jti-1", "default", NOW + 60)  # the holder gone: back to normal
    assert store.is_revoked("jti-1")
    store.close()


def test_a_refresh_waits_only_for_its_own_family(pg_url: str) -> None:
    """Refreshes lock their family's row, not the store: one family held by a stalled
    replica holds up its own refreshes only, and they go on once it commits."""
    import concurrent.futures
    import time

    import psycopg

    from authserver.pg_store import PostgresStore

    store = PostgresStore(pg_url, pool_size=2)
    for name in ("a", "b"):
        store.start_family(
            grant(name, offline=True), f"{name}-0", NOW + 600, f"{name}-j0", NOW + 300
        )
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        psycopg.connect(pg_url, autocommit=False) as holder,
    ):
        holder.execute("UPDATE grants SET revoked = revoked WHERE family = 'a'")
        held = pool.submit(store.use_refresh, "a-0", NOW, "a-1", NOW + 600, "a-j1", NOW + 300)
        started = time.monotonic()
        other = store.use_refresh("b-0", NOW, "b-1", NOW + 600, "b-j1", NOW + 300)
        assert other is not None and other.status == "ok"
        assert time.monotonic() - started < 1
        time.sleep(0.3)
        assert not held.done()  # its family's row is held
        holder.rollback()
        use = held.result(timeout=5)
        assert use is not None and use.status == "ok"
    store.close()


def refresh_until_refused(store: SqlStore, fam: str, issued: list[str]) -> None:
    """Refresh a family's chain, carrying each successor, until a refresh is refused;
    the jti of every access token a refresh was allowed to issue goes in ``issued``."""
    token = f"{fam}-0"
    for n in range(1, 200):
        jti, successor = f"{fam}-j{n}", f"{fam}-{n}"
        use = store.use_refresh(token, NOW, successor, NOW + 600, jti, NOW + 300)
        if use is None or use.status != "ok":
            return
        issued.append(jti)
        token = successor


def test_a_family_revoked_while_it_refreshes_leaves_no_live_token(store_backend: Opener) -> None:
    """Refreshes racing their family's revocation at another replica: every access
    token a refresh was allowed to issue is on the revocation list once the family
    is revoked, and no successor refresh token outlives it."""
    refreshing, revoking, checking = store_backend(), store_backend(), store_backend()
    for round_ in range(5):
        fam = f"fam{round_}"
        revoking.start_family(
            grant(fam, offline=True), f"{fam}-0", NOW + 600, f"{fam}-j0", NOW + 300
        )
        issued = [f"{fam}-j0"]
        chain = threading.Thread(target=refresh_until_refused, args=(refreshing, fam, issued))
        chain.start()
        threading.Event().wait(0.003 * round_)  # the revocation lands at another point
        revoking.revoke_family(fam, NOW)
        chain.join()
        assert all(checking.is_revoked(j) for j in issued), issued
        live = checking._q(
            "SELECT count(*) FROM refresh_tokens WHERE family = ? AND state = 'active'", (fam,)
        ).fetchone()[0]
        assert live == 0


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:TOP%zzSECRET@127.0.0.1/test",
        "postgresql://postgres:p@ssSECRET@127.0.0.1:5432/test",
    ],
)
def test_a_store_url_libpq_would_misread_is_refused_without_echoing_it(url: str) -> None:
    from tokengate.config import parse_config
    from tokengate.yamlconf import ConfigErrors

    text = (
        "authserver:\n  servers: [{name: a, audience: x}]\n"
        f"  key_encryption_key: {base64.b64encode(KEK).decode()}\n  store: '{url}'\n"
    )
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, {})
    (problem,) = [str(e) for e in info.value.errors]
    assert problem.startswith("authserver.store: must be a postgresql://user:password@host")
    assert "SECRET" not in problem


def test_a_revocation_at_one_replica_is_heard_at_the_others_at_once(pg_url: str) -> None:
    """PostgreSQL tells every replica (LISTEN/NOTIFY, sent at commit), so their held
    feed requests answer at once rather than at their next poll."""
    import time

    from authserver.pg_store import PostgresStore

    listening, revoking = PostgresStore(pg_url, pool_size=1), PostgresStore(pg_url, pool_size=1)
    heard = threading.Event()
    assert listening.follow_revocations(heard.set)
    assert heard.wait(5)  # once on listening: whatever was revoked before is read
    heard.clear()
    with revoking.exclusive():  # heard at commit, not before
        revoking.revoke("jti-1", "default", NOW + 60)
        time.sleep(0.3)
        assert not heard.is_set()
    started = time.monotonic()
    assert heard.wait(5) and time.monotonic() - started < 2
    heard.clear()
    revoking.revoke("jti-1", "default", NOW + 60)  # already revoked: nothing new to hear
    assert not heard.wait(0.5)
    listening.close()  # stops listening
    revoking.close()


def test_sqlite_stores_tell_nothing_and_feed_requests_poll(tmp_path: Path) -> None:
    from authserver.sqlite_store import SqliteStore

    store = SqliteStore(tmp_path)
    assert store.follow_revocations(lambda: None) is False
    store.close()


def test_an_authenticator_code_at_several_replicas_at_once_is_accepted_once(
    store_backend: Opener,
) -> None:
    from authserver.store import UserRecord

    replicas = [store_backend() for _ in range(4)]
    replicas[0].add_user(UserRecord("u1", "ann", "ann", "x", {}, (), False, "cli", NOW, NOW))
    assert replicas[0].begin_totp("u1", b"sealed-secret", NOW)
    assert not replicas[1].use_totp_step("u1", 100)  # not confirmed yet: no code counts
    assert replicas[1].confirm_totp("u1", 100, NOW, ["h1", "h2", "h3"])
    assert not replicas[2].confirm_totp("u1", 101, NOW, ["h4"])  # confirmed once only
    assert not replicas[3].begin_totp("u1", b"other", NOW)  # a confirmed app stays
    uses = at_once(4, lambda i: replicas[i].use_totp_step("u1", 101))
    assert sorted(uses) == [False, False, False, True]  # type: ignore[type-var]
    assert not replicas[0].use_totp_step("u1", 100)  # an older step: never again
    spent = at_once(4, lambda i: replicas[i].use_recovery_code("u1", "h2", NOW))
    assert sorted(spent) == [False, False, False, True]  # type: ignore[type-var]
    assert replicas[2].recovery_codes_left("u1") == 2
    record = replicas[3].totp("u1")
    assert record is not None and (record.secret, record.last_step) == (b"sealed-secret", 101)
    assert replicas[0].remove_user("u1")
    assert replicas[1].totp("u1") is None and replicas[1].recovery_codes_left("u1") == 0


def test_a_store_of_the_previous_schema_gains_the_attempt_columns(store_backend: Opener) -> None:
    """A store at schema 4 (authenticator apps, no attempt budget yet) is migrated, and
    its users' code checks work at once."""
    from authserver.store import UserRecord

    old = store_backend()
    old.add_user(UserRecord("u1", "ann", "ann", "x", {}, (), False, "cli", NOW, NOW))
    assert old.begin_totp("u1", b"secret", NOW)
    old._q("ALTER TABLE user_totp DROP COLUMN attempts")
    old._q("ALTER TABLE user_totp DROP COLUMN window_start")
    old._q("DELETE FROM schema_migrations WHERE version = 5")
    upgraded = store_backend()
    assert upgraded.migration is not None and upgraded.migration.applied == (5,)
    assert upgraded.take_factor_attempt("u1", NOW, 900, 2) is None
    assert upgraded.take_factor_attempt("u1", NOW, 900, 2) is None
    assert upgraded.take_factor_attempt("u1", NOW + 1, 900, 2) == 899  # the budget is spent
    upgraded.clear_factor_attempts("u1")
    assert upgraded.take_factor_attempt("u1", NOW + 2, 900, 2) is None


def test_a_passkey_signature_at_several_replicas_at_once_is_accepted_once(
    store_backend: Opener,
) -> None:
    """The signature counter moves on once per signature, whichever replica sees it;
    a counter that does not move on is refused (a replay, or a cloned authenticator);
    an authenticator that keeps no counter (0) is accepted while the store's is 0."""
    from authserver.store import PasskeyRecord, UserRecord

    replicas = [store_backend() for _ in range(4)]
    replicas[0].add_user(UserRecord("u1", "ann", "ann", "x", {}, (), False, "cli", NOW, NOW))
    key = PasskeyRecord("cred-1", "u1", b"cose", 0, False, ("internal",), "aaguid", NOW)
    assert replicas[0].add_passkey(key)
    assert not replicas[1].add_passkey(PasskeyRecord("cred-1", "u2", b"x", 0, True, (), "a", NOW))
    uncounted = PasskeyRecord("cred-2", "u1", b"cose2", 0, True, (), "aaguid", NOW + 1)
    assert replicas[2].add_passkey(uncounted)
    assert [p.credential_id for p in replicas[3].passkeys("u1")] == ["cred-1", "cred-2"]
    uses = at_once(4, lambda i: replicas[i].use_passkey("cred-1", 7, NOW + 5))
    assert sorted(uses) == [False, False, False, True]  # type: ignore[type-var]
    assert not replicas[0].use_passkey("cred-1", 7, NOW + 6)  # the same count again
    assert not replicas[0].use_passkey("cred-1", 0, NOW + 6)  # it counted, and now not
    assert replicas[1].use_passkey("cred-1", 8, NOW + 7)
    assert replicas[1].use_passkey("cred-2", 0, NOW + 7) and replicas[2].use_passkey(
        "cred-2", 0, NOW + 8
    )
    stored = replicas[3].passkey("cred-1")
    assert stored == PasskeyRecord(
        "cred-1", "u1", b"cose", 8, False, ("internal",), "aaguid", NOW, NOW + 7
    )
    replicas[0].remember_device("d1", "u1", NOW)
    assert not replicas[1].remove_passkey("u2", "cred-2")  # not u2's
    assert replicas[1].device_known("d1", "u1", 0)
    assert replicas[1].remove_passkey("u1", "cred-2")  # a lost device: its browsers too
    assert not replicas[2].device_known("d1", "u1", 0)
    assert [p.credential_id for p in replicas[2].passkeys("u1")] == ["cred-1"]
    assert replicas[0].add_recovery_codes("u1", ["h1", "h2"])
    assert not replicas[1].add_recovery_codes("u1", ["h3"])  # some unused: kept
    assert replicas[0].reset_mfa("u1")
    assert replicas[1].passkeys("u1") == [] and replicas[2].passkey("cred-1") is None
    assert replicas[1].recovery_codes_left("u1") == 0
    assert not replicas[0].reset_mfa("u1")  # nothing left to forget


def test_a_sign_in_in_progress_is_moved_on_by_one_of_two_requests(store_backend: Opener) -> None:
    """A passkey challenge is spent once: of requests that read the same progress, one
    replaces it."""
    replicas = [store_backend() for _ in range(4)]
    replicas[0].add_interaction("h", "default", "{}", "csrf", NOW + 600)
    replicas[0].set_interaction_progress("h", '{"passkey_challenge": "c"}')
    swaps = at_once(
        4,
        lambda i: replicas[i].swap_interaction_progress(
            "h", '{"passkey_challenge": "c"}', f'{{"n": {i}}}'
        ),
    )
    assert sorted(swaps) == [False, False, False, True]  # type: ignore[type-var]
    found = replicas[1].interaction("h", NOW)
    assert found is not None and found[3] in {f'{{"n": {i}}}' for i in range(4)}


def test_first_recovery_codes_are_stored_once_whichever_replica_is_first(
    store_backend: Opener,
) -> None:
    """Two first enrollments at once, at any replicas: one set of codes is stored, the
    other is refused (it would have been shown, and never worked)."""
    from authserver.store import UserRecord

    replicas = [store_backend() for _ in range(4)]
    for round_ in range(5):
        user = f"u{round_}"
        replicas[0].add_user(UserRecord(user, user, user, "x", {}, (), False, "cli", NOW, NOW))
        stored = at_once(
            4,
            lambda i, user=user: replicas[i].add_recovery_codes(  # type: ignore[misc]
                user, [f"{user}-{i}-{n}" for n in range(10)]
            ),
        )
        assert sorted(stored) == [False, False, False, True]  # type: ignore[type-var]
        assert replicas[1].recovery_codes_left(user) == 10
