"""Authorization codes: random, stored hashed, single use, short-lived; a reused code
gives up the tokens it produced and stays burnt."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator

import pytest

from authserver.codes import CODE_BYTES, CODE_TTL, code_hash, new_code
from authserver.sqlstore import SqlStore
from authserver.store import CodeRecord
from tests.pg import dump_store

NOW = 1_800_000_000


def record(**changes: object) -> CodeRecord:
    base = CodeRecord(
        server="default",
        client_id="portal",
        redirect_uri="https://portal.example.com/callback",
        code_challenge="E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        nonce="n-0S6_WzA2Mj",
        scopes=("openid", "profile"),
        user_id="u_123",
        session_id="sid-1",
        auth_time=NOW - 5,
        expires_at=NOW + CODE_TTL,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def store(store_backend: Callable[[], SqlStore]) -> Iterator[SqlStore]:
    """Each test on SQLite and on PostgreSQL."""
    s = store_backend()
    yield s
    s.close()


def test_codes_are_256_random_bits_and_distinct() -> None:
    codes = {new_code() for _ in range(1000)}
    assert len(codes) == 1000
    assert all(len(c) == 43 for c in codes)  # 32 bytes, base64url without padding
    assert CODE_BYTES * 8 >= 128
    assert CODE_TTL == 60


def test_the_store_holds_only_the_codes_hash(store: SqlStore) -> None:
    code = new_code()
    store.add_code(code_hash(code), record())
    dump = dump_store(store)
    assert code not in dump
    assert code_hash(code) in dump
    assert code_hash(code) == code_hash(code) != code_hash(new_code())


def test_a_code_is_redeemed_once_with_everything_it_was_bound_to(store: SqlStore) -> None:
    key = code_hash(new_code())
    store.add_code(key, record())
    first = store.redeem_code(key, NOW)
    assert first is not None and not first.reused
    assert first.record == record()  # client, redirect_uri, challenge, nonce, scopes, user...
    assert store.code_issued(key, "jti-1", NOW + 3600)


def test_a_second_use_fails_and_names_the_tokens_to_revoke(store: SqlStore) -> None:
    key = code_hash(new_code())
    store.add_code(key, record())
    assert store.redeem_code(key, NOW) is not None
    assert store.code_issued(key, "jti-1", NOW + 3600)
    again = store.redeem_code(key, NOW + 1)
    assert again is not None and again.reused and again.jtis == ("jti-1",)
    third = store.redeem_code(key, NOW + 2)  # burnt for good
    assert third is not None and third.reused and third.jtis == ("jti-1",)


def test_a_token_recorded_after_a_reuse_is_refused(store: SqlStore) -> None:
    key = code_hash(new_code())
    store.add_code(key, record())
    assert store.redeem_code(key, NOW) is not None  # the first redemption, still signing...
    assert store.redeem_code(key, NOW).reused  # ...when a second arrives
    assert not store.code_issued(key, "jti-late", NOW + 3600)  # so the first sends nothing


def test_unknown_expired_and_unredeemed_codes(store: SqlStore) -> None:
    key = code_hash(new_code())
    assert store.redeem_code(key, NOW) is None
    assert not store.code_issued(key, "jti", NOW + 3600)
    store.add_code(key, record())
    assert not store.code_issued(key, "jti", NOW + 3600)  # not redeemed yet
    assert store.redeem_code(key, NOW + CODE_TTL) is None  # expired: at expires_at
    assert store.redeem_code(key, NOW + CODE_TTL - 1) is not None


def test_only_one_of_many_concurrent_redemptions_wins(
    store_backend: Callable[[], SqlStore],
) -> None:
    """Eight connections of their own, as other workers and replicas have."""
    store_backend().close()
    key = code_hash(new_code())
    first = store_backend()
    first.add_code(key, record())
    first.close()
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def redeem() -> None:
        s = store_backend()
        barrier.wait()
        got = s.redeem_code(key, NOW)
        results.append(got is not None and not got.reused)
        s.close()

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_purge_keeps_a_code_while_its_tokens_live(store: SqlStore) -> None:
    used, unused = code_hash(new_code()), code_hash(new_code())
    store.add_code(used, record())
    store.add_code(unused, record())
    store.redeem_code(used, NOW)
    store.code_issued(used, "jti-1", NOW + 3600)
    assert store.purge(NOW + CODE_TTL + 1) == 1  # the unused, expired code
    assert store.redeem_code(unused, NOW) is None
    again = store.redeem_code(used, NOW + 3000)  # reuse detection outlives the code's TTL
    assert again is not None and again.jtis == ("jti-1",)
    assert store.purge(NOW + 3601) == 1
    assert store.redeem_code(used, NOW + 3601) is None
