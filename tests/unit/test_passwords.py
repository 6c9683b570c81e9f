"""Password hashes: argon2id with OWASP's parameters, verification that never raises,
upgrades of weaker hashes, passwords from the environment held sealed, and hashing
that never runs on the event loop."""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest
from argon2 import PasswordHasher, Type, extract_parameters

from authserver.passwords import (
    _DUMMY_HASH,
    HASH_BYTES,
    MAX_PASSWORD_LENGTH,
    MEMORY_KIB,
    PARALLELISM,
    SALT_BYTES,
    TIME_COST,
    EnvPassword,
    PasswordWorker,
    hash_password,
    needs_rehash,
    password_problem,
    phc_problem,
    verify_password,
    verify_unknown,
)

PASSWORD = "correct horse battery staple"


def weak_hash(password: str, **params: int) -> str:
    settings = {"time_cost": 1, "memory_cost": 8192, "parallelism": 1, **params}
    return PasswordHasher(**settings, type=Type.ID).hash(password)


def test_hashes_are_argon2id_with_owasp_parameters() -> None:
    phc = hash_password(PASSWORD)
    assert phc.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    p = extract_parameters(phc)
    assert (p.type, p.memory_cost, p.time_cost, p.parallelism) == (Type.ID, 19456, 2, 1)
    assert (p.salt_len, p.hash_len) == (SALT_BYTES, HASH_BYTES) == (16, 32)
    assert MEMORY_KIB >= 19456 and TIME_COST >= 2 and PARALLELISM >= 1
    assert hash_password(PASSWORD) != phc  # a random salt each time
    assert phc_problem(phc) is None and not needs_rehash(phc)


def test_verify() -> None:
    phc = hash_password(PASSWORD)
    assert verify_password(phc, PASSWORD)
    assert not verify_password(phc, PASSWORD.upper())
    assert not verify_password(phc, "")
    assert verify_password(hash_password("pässwörd ✓ 🔑"), "pässwörd ✓ 🔑")


@pytest.mark.parametrize(
    "phc",
    [
        "",
        "not a hash",
        "$argon2id$",
        "$argon2id$v=19$m=19456,t=2,p=1$$",
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA",  # the wrong hash
        "$argon2id$v=19$m=0,t=0,p=0$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=19456,t=2,p=1$!!!$???",
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ\x00$aGFzaA",
        "$2b$12$KIXQJ1m5d8q9Zb1sXW7M4eWg0k9o3XoQwJ6l2Xk0m5JX8Yq0q3r1e",  # bcrypt
        "sha256:" + "0" * 64,
    ],
)
def test_verify_never_raises_on_a_malformed_hash(phc: str) -> None:
    assert verify_password(phc, PASSWORD) is False
    assert needs_rehash(phc)


def test_an_over_long_password_is_never_verified() -> None:
    long = "x" * (MAX_PASSWORD_LENGTH + 1)
    phc = PasswordHasher(type=Type.ID).hash(long)  # made elsewhere, without the limit
    assert verify_password(phc, long) is False
    assert verify_password(hash_password("x" * MAX_PASSWORD_LENGTH), "x" * MAX_PASSWORD_LENGTH)


def test_weaker_hashes_need_a_rehash_and_stronger_ones_do_not() -> None:
    assert needs_rehash(weak_hash(PASSWORD))  # less memory, one pass
    assert needs_rehash(weak_hash(PASSWORD, memory_cost=19456))  # one pass
    assert needs_rehash(weak_hash(PASSWORD, memory_cost=19456, time_cost=2, salt_len=8))
    assert needs_rehash(PasswordHasher(type=Type.I).hash(PASSWORD))  # argon2i
    assert needs_rehash(PasswordHasher(type=Type.D).hash(PASSWORD))  # argon2d
    stronger = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4, type=Type.ID)
    assert not needs_rehash(stronger.hash(PASSWORD))


def test_the_dummy_hash_costs_what_a_real_one_does() -> None:
    assert extract_parameters(_DUMMY_HASH) == extract_parameters(hash_password(PASSWORD))
    assert verify_unknown(PASSWORD) is False


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("secret", "must be an argon2id PHC string"),
        ("$argon2i$v=19$m=19456,t=2,p=1$YWFjuR9mCgrTb4NZzYeWwQ$" + "A" * 43, "argon2id PHC"),
        ("$argon2id$v=16$m=19456,t=2,p=1$YWFjuR9mCgrTb4NZzYeWwQ$" + "A" * 43, "version 19"),
        ("$argon2id$v=19$m=4,t=2,p=1$YWFjuR9mCgrTb4NZzYeWwQ$" + "A" * 43, "memory m"),
        ("$argon2id$v=19$m=9999999,t=2,p=1$YWFjuR9mCgrTb4NZzYeWwQ$" + "A" * 43, "memory m"),
        ("$argon2id$v=19$m=19456,t=0,p=1$YWFjuR9mCgrTb4NZzYeWwQ$" + "A" * 43, "time cost"),
        ("$argon2id$v=19$m=19456,t=2,p=99$YWFjuR9mCgrTb4NZzYeWwQ$" + "A" * 43, "parallelism"),
        ("$argon2id$v=19$m=19456,t=2,p=1$YWFj$" + "A" * 43, "salt"),
        ("$argon2id$v=19$m=19456,t=2,p=1$YWFjuR9mCgrTb4NZzYeWwQ$AAAA", "hash must"),
        ("$argon2id$v=19$m=19456,t=2,p=1$YWFjuR9mCgrTb4NZzYeWwQ=$" + "A" * 43, "PHC"),
    ],
)
def test_configured_hashes_are_checked(text: str, problem: str) -> None:
    found = phc_problem(text)
    assert found is not None and problem in found


def test_weak_but_valid_hashes_are_accepted_in_the_config() -> None:
    assert phc_problem(weak_hash(PASSWORD)) is None  # upgraded at the next sign-in


def test_password_rules() -> None:
    assert password_problem("1234567") == "must be at least 8 characters"
    assert password_problem("12345678") is None
    assert password_problem("x" * 1024) is None
    assert password_problem("x" * 1025) == "must be at most 1024 characters"
    assert password_problem("パスワードパスワード") is None


# --------------------------------------------------------------------------- sealed


def test_an_env_password_is_sealed_and_never_shown() -> None:
    sealed = EnvPassword.seal("ALICE_PASSWORD", PASSWORD)
    assert sealed.reveal() == PASSWORD
    for text in (repr(sealed), str(sealed), repr([sealed])):
        assert PASSWORD not in text and "ALICE_PASSWORD" in text
    assert PASSWORD.encode() not in sealed._sealed
    assert sealed == EnvPassword.seal("OTHER", PASSWORD)  # the same password
    assert sealed != EnvPassword.seal("ALICE_PASSWORD", PASSWORD + "!")
    assert hash(sealed) == hash(EnvPassword.seal("X", PASSWORD))
    with pytest.raises(TypeError):
        pickle.dumps(sealed)


# --------------------------------------------------------------------------- threads


@pytest.mark.anyio
async def test_the_worker_hashes_and_verifies_off_the_loop() -> None:
    worker = PasswordWorker()
    try:
        phc = await worker.hash(PASSWORD)
        assert await worker.verify(phc, PASSWORD)
        assert not await worker.verify(phc, "wrong password")
        assert not await worker.verify("garbage", PASSWORD)
        assert await worker.verify_unknown(PASSWORD) is False
    finally:
        worker.close()


@pytest.mark.anyio
async def test_a_ticker_keeps_ticking_during_five_verifications() -> None:
    """argon2 runs on the worker's threads and releases the GIL: the event loop keeps
    serving while five verifications (about five hash times on two threads) run."""
    worker = PasswordWorker()
    phc = hash_password(PASSWORD)
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    try:
        task = asyncio.create_task(ticker())
        started = time.perf_counter()
        results = await asyncio.gather(*(worker.verify(phc, PASSWORD) for _ in range(5)))
        took = time.perf_counter() - started
        done.set()
        await task
    finally:
        worker.close()
    assert results == [True] * 5
    assert len(gaps) >= 5, gaps
    # one verification on the loop would stall it for a whole hash time (about 25 ms
    # here): the longest gap stays well below what five of them took together
    assert max(gaps) < took / 2, (max(gaps), took)


def test_password_threads_run_at_a_lower_priority_than_the_loop() -> None:
    """A sign-in flood must not take CPU from token requests on the event loop: the
    pool's threads are niced (Linux schedules each thread on its own)."""
    import os
    import threading

    from authserver.passwords import NICENESS, PasswordWorker

    worker = PasswordWorker(1)
    try:
        ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        [theirs] = worker.run([lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())])
    finally:
        worker.close()
    assert theirs == min(ours + NICENESS, 19) and ours == os.getpriority(os.PRIO_PROCESS, 0)
