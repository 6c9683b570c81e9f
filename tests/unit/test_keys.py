"""Signing keys: RFC 7638 kids, JWK export, signatures, schedule, files, first start."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import jwt
import pytest

from authserver.config import ServerConfig
from authserver.keys import (
    KeyFiles,
    KeyManager,
    SigningKey,
    generate_private_key,
    key_schedule,
    next_change,
    public_members,
    thumbprint,
)
from authserver.keyseal import KeyUnsealError
from authserver.sqlite_store import SqliteStore
from authserver.store import KeyRecord


def test_rfc7638_example_thumbprint() -> None:
    # RFC 7638 section 3.1
    members = {
        "e": "AQAB",
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tS"
        "oc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
        "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI"
        "4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    }
    assert thumbprint(members) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_tokens_signed_by_each_algorithm_verify_from_the_jwk(alg: str) -> None:
    private_key = generate_private_key(alg)
    kid = thumbprint(public_members(private_key))
    key = SigningKey.load(kid, alg, private_key)
    assert "d" not in key.jwk and "p" not in key.jwk
    assert (key.jwk["kid"], key.jwk["alg"], key.jwk["use"]) == (kid, alg, "sig")
    token = key.sign({"sub": "x", "n": 1, "name": "é"})
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": kid, "typ": "at+jwt"}
    public = jwt.PyJWK(key.jwk).key
    assert jwt.decode(token, public, algorithms=[alg]) == {"sub": "x", "n": 1, "name": "é"}
    with pytest.raises(jwt.InvalidAlgorithmError):
        jwt.decode(token, public, algorithms=["HS256"])


def record(kid: str, activate_at: int, seq: int) -> KeyRecord:
    return KeyRecord("default", kid, "RS256", activate_at, activate_at, seq)


def test_schedule_states_follow_the_clock() -> None:
    records = [record("a", 100, 1), record("b", 1000, 2), record("c", 5000, 3)]
    ttl, leeway = 3600, 30

    def states(now: int) -> dict[str, str]:
        return {
            s.record.kid: s.state for s in key_schedule(records, now, token_ttl=ttl, leeway=leeway)
        }

    assert states(50) == {"a": "next", "b": "next", "c": "next"}
    assert states(500) == {"a": "active", "b": "next", "c": "next"}
    assert states(1000) == {"a": "retired", "b": "active", "c": "next"}
    assert states(1000 + ttl + leeway - 1)["a"] == "retired"
    assert states(1000 + ttl + leeway)["a"] == "expired"
    assert states(6000) == {"a": "expired", "b": "retired", "c": "active"}
    statuses = key_schedule(records, 1000, token_ttl=ttl, leeway=leeway)
    assert next_change(statuses, 1000) == 1000 + ttl + leeway  # a leaves before c activates


def test_same_second_keys_prefer_the_newest() -> None:
    statuses = key_schedule(
        [record("new", 100, 2), record("old", 100, 1)], 100, token_ttl=60, leeway=0
    )
    assert {s.record.kid: s.state for s in statuses} == {"old": "retired", "new": "active"}


def test_key_files_are_private(tmp_path: Path) -> None:
    files = KeyFiles(tmp_path)
    key = generate_private_key("ES256")
    files.write("default", "kid1", key)
    path = files.path("default", "kid1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.root.stat().st_mode) == 0o700
    assert public_members(files.read("default", "kid1")) == public_members(key)


SERVER = ServerConfig("default", "http://x/oauth2/default", "api://x", "ES256", 3600, ())


def test_rotate_on_a_fresh_data_dir_first_creates_an_active_key(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    manager = KeyManager(store, KeyFiles(tmp_path), jwks_max_age=60, leeway=30)
    nxt = manager.rotate(SERVER)
    states = {s.record.kid: s.state for s in manager.schedule(SERVER)}
    assert states[nxt.kid] == "next"
    assert sorted(states.values()) == ["active", "next"]
    store.close()


def test_a_new_key_is_sealed_only_with_the_key_the_stores_keys_were_sealed_with(
    tmp_path: Path,
) -> None:
    """A key sealed under another key encryption key would be published, then stop
    every replica from loading the keys: rotating (or a first key for a new
    algorithm) with the wrong one is refused, and creates nothing."""
    store = SqliteStore(tmp_path)
    kek = os.urandom(32)
    right = KeyManager(store, KeyFiles(tmp_path), jwks_max_age=60, leeway=30, kek=kek)
    first = right.ensure(SERVER)
    assert first is not None
    wrong = KeyManager(store, KeyFiles(tmp_path), jwks_max_age=60, leeway=30, kek=os.urandom(32))
    with pytest.raises(KeyUnsealError, match=r"does not open with authserver\.key_encryption_key"):
        wrong.rotate(SERVER)
    with pytest.raises(KeyUnsealError):
        wrong.ensure(dataclasses.replace(SERVER, signing_alg="RS256"))
    assert [r.kid for r in store.keys("default")] == [first.kid]
    assert not (tmp_path / "keys").exists()
    nxt = right.rotate(SERVER)  # the right key still rotates
    assert [r.kid for r in store.keys("default")] == [first.kid, nxt.kid]
    store.close()


def test_concurrent_first_start_creates_exactly_one_key(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from authserver.config import ServerConfig
        from authserver.keys import KeyFiles, KeyManager
        from authserver.sqlite_store import SqliteStore
        data = Path({str(tmp_path)!r})
        server = ServerConfig("default", "http://x/oauth2/default", "api://x", "RS256", 3600, ())
        KeyManager(SqliteStore(data), KeyFiles(data), jwks_max_age=60, leeway=30).ensure(server)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    store = SqliteStore(tmp_path)
    keys = store.keys("default")
    assert len(keys) == 1
    assert [p.name for p in (tmp_path / "keys/default").iterdir()] == [f"{keys[0].kid}.pem"]
    store.close()


def test_a_new_store_waits_for_another_process_switching_it_to_wal(tmp_path: Path) -> None:
    """SQLite refuses a journal-mode switch at once, without waiting out busy_timeout,
    while another connection is writing the new file: the first start of several
    workers."""
    import sqlite3
    import threading
    import time

    from authserver.sqlite_store import SqliteStore

    tmp_path.mkdir(exist_ok=True)
    other = sqlite3.connect(
        tmp_path / SqliteStore.FILENAME, isolation_level=None, check_same_thread=False
    )
    other.execute("CREATE TABLE held (x)")
    other.execute("BEGIN IMMEDIATE")  # a writer mid-transaction in rollback mode
    other.execute("INSERT INTO held VALUES (1)")
    released = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    released.start()
    started = time.monotonic()
    store = SqliteStore(tmp_path)  # would raise "database is locked" at once
    assert time.monotonic() - started >= 0.4
    assert store.keys() == []
    store.close()
    released.join()
    other.close()
