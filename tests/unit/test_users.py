"""The user directory: usernames, the store's user tables, the directory's changes,
sign-in (timing, disabled users, hash upgrades) and applying the config's users."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from argon2 import PasswordHasher, Type

from authserver.config import UserConfig
from authserver.passwords import PasswordWorker, hash_password, needs_rehash, verify_password
from authserver.sqlite_store import SqliteStore
from authserver.sqlstore import SqlStore
from authserver.store import StoreWorker, UsernameTaken, UserRecord
from authserver.users import (
    Authenticated,
    InvalidUser,
    Refused,
    UserDirectory,
    UserExists,
    UserNotFound,
    UserReadOnly,
    claim_problem,
    group_problem,
    new_user_id,
    username_key,
    username_problem,
)
from tests.conftest import FakeClock
from tokengate.config import parse_config

pytestmark = pytest.mark.anyio

ALICE_PASSWORD = "alice-password-1"
WIDE_ALICE = "\uff41\uff4c\uff49\uff43\uff45"  # alice in full-width letters
WEAK = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1, type=Type.ID)


@pytest.fixture
def store(store_backend: Callable[[], SqlStore]) -> Iterator[SqlStore]:
    """Each test on SQLite and on PostgreSQL."""
    s = store_backend()
    yield s
    s.close()


@pytest.fixture
def directory(store: SqlStore) -> Iterator[UserDirectory]:
    io, passwords = StoreWorker(), PasswordWorker()
    yield UserDirectory(store, io, passwords, clock=FakeClock(1_796_407_200))
    passwords.close()
    io.close()


def record(username: str, **changes: Any) -> UserRecord:
    fields: dict[str, Any] = {
        "id": new_user_id(),
        "username": username,
        "username_key": username_key(username),
        "password_hash": "$argon2id$...",
        "profile": MappingProxyType({"email": f"{username}@example.com"}),
        "groups": ("a", "b"),
        "disabled": False,
        "source": "cli",
        "created_at": 1,
        "updated_at": 2,
    }
    return UserRecord(**{**fields, **changes})


def users_config(*users: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
    data = {
        "authserver": {
            "servers": [{"name": "default", "audience": "api://default"}],
            "users": list(users),
        }
    }
    config = parse_config(yaml.safe_dump(data), environ or {})
    assert config.authserver is not None
    return config.authserver.users


# --------------------------------------------------------------------------- names


def test_usernames_are_compared_ignoring_case_and_compatibility_forms() -> None:
    assert username_key("Alice") == username_key("alice") == username_key(WIDE_ALICE.upper())
    assert username_key(WIDE_ALICE) == "alice"
    assert username_key("Straße") == username_key("STRASSE")
    assert username_key("ﬁle") == "file"  # a ligature
    assert username_key("Ωmega") != username_key("omega")


@pytest.mark.parametrize(
    ("username", "problem"),
    [
        ("", "must not be empty"),
        (" alice", "whitespace"),
        ("alice\n", "whitespace"),
        ("\u3000alice", "whitespace"),
        ("al\x00ice", "U+0000"),
        ("al\x7fice", "U+007F"),
        ("ali\u200bce", "U+200B"),  # zero width space: a format character
        ("ali\u202ece", "U+202E"),  # right-to-left override
        ("a\u2028b", "U+2028"),
        ("x" * 129, "at most 128"),
    ],
)
def test_bad_usernames(username: str, problem: str) -> None:
    found = username_problem(username)
    assert found is not None and problem in found


@pytest.mark.parametrize(
    "username", ["alice", "Alice Doe", "alice@example.com", "Zoë", "山田", "x" * 128, WIDE_ALICE]
)
def test_good_usernames(username: str) -> None:
    assert username_problem(username) is None


def test_groups_and_claims() -> None:
    assert group_problem("engineering") is None
    assert group_problem("team: payments") is None
    assert group_problem(" x") is not None and group_problem("") is not None
    assert claim_problem("email", "a@b") is None
    assert claim_problem("email", "nope") is not None
    assert claim_problem("email", 3) is not None
    assert claim_problem("email_verified", "true") is not None
    assert claim_problem("email_verified", True) is None
    assert claim_problem("address", {"country": "FR"}) is None
    assert claim_problem("address", {"country": 3}) is not None
    assert claim_problem("address", "FR") is not None
    assert claim_problem("sub", "x") is not None
    assert claim_problem("updated_at", 3) is not None
    assert claim_problem("department", {"any": ["json", 1, None]}) is None


def test_ids_are_random_and_opaque() -> None:
    ids = {new_user_id() for _ in range(1000)}
    assert len(ids) == 1000
    for user_id in ids:
        assert user_id.startswith("u") and len(user_id) >= 21
        assert all(c.isalnum() or c in "-_" for c in user_id)


# --------------------------------------------------------------------------- store


def test_store_crud(store: SqlStore) -> None:
    alice = record("Alice", profile=MappingProxyType({"name": "Alice", "n": [1, {"x": None}]}))
    store.add_user(alice)
    assert store.user(alice.id) == alice
    assert store.user_by_key("alice") == alice
    assert store.users() == [alice]
    assert "password_hash" not in repr(alice) and "$argon2id" not in repr(alice)

    changed = dataclasses.replace(alice, groups=("c",), disabled=True, updated_at=9)
    store.update_user(changed)
    assert store.user(alice.id) == changed
    assert store.replace_password_hash(alice.id, "$argon2id$...", "$new", 10)
    assert not store.replace_password_hash(alice.id, "$argon2id$...", "$newer", 11)
    assert store.user(alice.id).password_hash == "$new"  # type: ignore[union-attr]

    assert store.remove_user(alice.id)
    assert not store.remove_user(alice.id)
    assert store.user(alice.id) is None and store.users() == []
    assert store._q("SELECT COUNT(*) FROM user_groups").fetchone() == (0,)


@pytest.mark.parametrize("other", ["alice", "ALICE", WIDE_ALICE, WIDE_ALICE.capitalize()])
def test_usernames_are_unique_across_case_and_width(store: SqlStore, other: str) -> None:
    store.add_user(record("Alice"))
    with pytest.raises(UsernameTaken):
        store.add_user(record(other))
    bob = record("bob")
    store.add_user(bob)
    with pytest.raises(UsernameTaken):  # renaming onto a taken name
        store.update_user(dataclasses.replace(bob, username=other, username_key="alice"))
    assert [u.username for u in store.users()] == ["Alice", "bob"]


def test_users_are_listed_with_their_own_groups(store: SqlStore) -> None:
    store.add_user(record("b", groups=("x",)))
    store.add_user(record("a", groups=()))
    store.add_user(record("c", groups=("y", "z")))
    assert [(u.username, u.groups) for u in store.users()] == [
        ("a", ()),
        ("b", ("x",)),
        ("c", ("y", "z")),
    ]


def test_a_store_from_before_users_gets_the_tables(tmp_path: Path) -> None:
    SqliteStore(tmp_path).close()
    store = SqliteStore(tmp_path, create=False)
    assert store.users() == []
    store.close()


# --------------------------------------------------------------------------- changes


async def test_add_show_change_and_delete(directory: UserDirectory) -> None:
    alice = await directory.add(
        "Alice",
        ALICE_PASSWORD,
        profile={"email": "alice@example.com", "name": "Alice Doe"},
        groups=["eng", "eng", "ops"],
    )
    assert alice.source == "cli" and alice.groups == ("eng", "ops") and not alice.disabled
    assert alice.created_at == alice.updated_at == 1_796_407_200
    assert alice.id.startswith("u") and "alice" not in alice.id.lower()
    for ref in ("alice", "ALICE", WIDE_ALICE, alice.id):
        assert await directory.resolve(ref) == alice
    assert await directory.resolve("bob") is None
    assert await directory.find(" alice") is None
    assert alice.to_json() == {
        "id": alice.id,
        "username": "Alice",
        "profile": {"email": "alice@example.com", "name": "Alice Doe"},
        "groups": ["eng", "ops"],
        "disabled": False,
        "source": "cli",
        "created_at": "2026-12-04T18:00:00Z",
        "updated_at": "2026-12-04T18:00:00Z",
    }
    with pytest.raises(UserExists):
        await directory.add("aLiCe", "another-password")

    directory.clock.advance(60)  # type: ignore[attr-defined]
    disabled = await directory.set_disabled(alice.id, True)
    assert disabled.disabled and disabled.updated_at == alice.updated_at + 60
    again = await directory.set_disabled(alice.id, True)  # no change: same updated_at
    assert again.updated_at == disabled.updated_at
    grouped = await directory.change_groups(alice.id, add=["admins"], remove=["ops"])
    assert grouped.groups == ("admins", "eng")

    await directory.set_password(alice.id, "a-new-password")
    stored = directory.store.user(alice.id)
    assert stored is not None and verify_password(stored.password_hash, "a-new-password")

    assert (await directory.delete(alice.id)).id == alice.id
    assert await directory.list() == []
    with pytest.raises(UserNotFound):
        await directory.delete(alice.id)


@pytest.mark.parametrize(
    ("username", "password", "profile", "groups", "problem"),
    [
        ("", ALICE_PASSWORD, {}, [], "username: must not be empty"),
        ("a\tb", ALICE_PASSWORD, {}, [], "username: must not hold control"),
        ("alice", "short", {}, [], "password: must be at least 8 characters"),
        ("alice", "x" * 1025, {}, [], "password: must be at most 1024 characters"),
        ("alice", ALICE_PASSWORD, {"email": "x"}, [], "email: must be an email address"),
        ("alice", ALICE_PASSWORD, {}, [" ops"], "group ' ops': must not start"),
    ],
)
async def test_add_refuses_what_is_not_acceptable(
    directory: UserDirectory,
    username: str,
    password: str,
    profile: dict[str, Any],
    groups: list[str],
    problem: str,
) -> None:
    with pytest.raises(InvalidUser) as refused:
        await directory.add(username, password, profile=profile, groups=groups)
    assert str(refused.value).startswith(problem)
    assert password not in str(refused.value) or password == ALICE_PASSWORD
    assert await directory.list() == []


async def test_config_users_are_read_only(directory: UserDirectory) -> None:
    directory.apply_config(
        users_config({"username": "cfg", "password_hash": hash_password("p" * 8)})
    )
    (user,) = await directory.list()
    assert user.source == "config"
    for change in (
        directory.set_disabled(user.id, True),
        directory.set_password(user.id, "another-password"),
        directory.change_groups(user.id, add=["x"]),
        directory.delete(user.id),
    ):
        with pytest.raises(UserReadOnly, match="declared in the config"):
            await change
    assert await directory.list() == [user]


# --------------------------------------------------------------------------- sign-in


async def test_authenticate(directory: UserDirectory) -> None:
    alice = await directory.add("alice", ALICE_PASSWORD)
    ok = await directory.authenticate("ALICE", ALICE_PASSWORD)
    assert ok == Authenticated(alice)
    assert await directory.authenticate("alice", "wrong-password") == Refused(
        "bad_credentials", alice
    )
    assert await directory.authenticate("nobody", ALICE_PASSWORD) == Refused(
        "bad_credentials", None
    )
    assert await directory.authenticate(" alice", ALICE_PASSWORD) == Refused(
        "bad_credentials", None
    )
    assert await directory.authenticate("alice", "") == Refused("bad_credentials", alice)
    huge = await directory.authenticate("alice", "x" * 100_000)
    assert huge == Refused("bad_credentials", alice)

    disabled = await directory.set_disabled(alice.id, True)
    assert await directory.authenticate("alice", ALICE_PASSWORD) == Refused("disabled", disabled)
    # a wrong password for a disabled user is a wrong password
    assert await directory.authenticate("alice", "nope-nope") == Refused(
        "bad_credentials", disabled
    )


async def test_a_weaker_hash_is_upgraded_at_a_successful_sign_in(
    directory: UserDirectory, store: SqlStore
) -> None:
    weak = WEAK.hash(ALICE_PASSWORD)
    store.add_user(record("alice", password_hash=weak))
    refused = await directory.authenticate("alice", "wrong-password")
    assert isinstance(refused, Refused) and refused.reason == "bad_credentials"
    assert store.user_by_key("alice").password_hash == weak  # type: ignore[union-attr]

    outcome = await directory.authenticate("alice", ALICE_PASSWORD)
    assert isinstance(outcome, Authenticated) and outcome.rehashed
    upgraded = store.user_by_key("alice")
    assert upgraded is not None and upgraded.password_hash != weak
    assert upgraded.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert not needs_rehash(upgraded.password_hash)
    assert verify_password(upgraded.password_hash, ALICE_PASSWORD)

    again = await directory.authenticate("alice", ALICE_PASSWORD)
    assert isinstance(again, Authenticated) and not again.rehashed
    assert store.user_by_key("alice").password_hash == upgraded.password_hash  # type: ignore[union-attr]


async def test_an_upgrade_never_overwrites_a_password_set_meanwhile(store: SqlStore) -> None:
    weak = WEAK.hash(ALICE_PASSWORD)
    store.add_user(record("alice", password_hash=weak))
    io, passwords = StoreWorker(), PasswordWorker()
    directory = UserDirectory(store, io, passwords)
    real_hash = passwords.hash

    async def slow_hash(password: str) -> str:  # set-password lands while this hashes
        made = await real_hash(password)
        user = store.user_by_key("alice")
        assert user is not None
        store.update_user(dataclasses.replace(user, password_hash=hash_password("set-later!")))
        return made

    passwords.hash = slow_hash  # type: ignore[method-assign]
    try:
        outcome = await directory.authenticate("alice", ALICE_PASSWORD)
    finally:
        passwords.close()
        io.close()
    assert isinstance(outcome, Authenticated) and not outcome.rehashed
    assert verify_password(store.user_by_key("alice").password_hash, "set-later!")  # type: ignore[union-attr]


async def test_unknown_users_take_about_as_long_as_known_ones(directory: UserDirectory) -> None:
    """No telling which usernames exist by the time a refusal takes: an unknown user's
    password is verified against a dummy hash of the same cost."""
    await directory.add("alice", ALICE_PASSWORD)

    async def seconds(username: str) -> float:
        started = time.perf_counter()
        outcome = await directory.authenticate(username, "wrong-password")
        assert isinstance(outcome, Refused)
        return time.perf_counter() - started

    known, unknown = [], []
    for _ in range(7):
        known.append(await seconds("alice"))
        unknown.append(await seconds("mallory"))
    ratio = statistics.median(unknown) / statistics.median(known)
    assert 0.5 < ratio < 2, (known, unknown)
    assert statistics.median(unknown) > 0.005  # a real argon2 verification, not a shortcut


async def test_sign_ins_run_concurrently(directory: UserDirectory) -> None:
    await directory.add("alice", ALICE_PASSWORD)
    outcomes = await asyncio.gather(
        *(directory.authenticate("alice", ALICE_PASSWORD) for _ in range(5)),
        directory.authenticate("alice", "wrong-password"),
    )
    assert [type(o).__name__ for o in outcomes] == ["Authenticated"] * 5 + ["Refused"]


# --------------------------------------------------------------------------- config users


def test_config_users_are_created_updated_and_deleted(directory: UserDirectory) -> None:
    alice_hash, bob_hash = hash_password("alice-password"), hash_password("bob-password")
    declared = users_config(
        {
            "username": "alice",
            "password_hash": alice_hash,
            "profile": {"email": "alice@example.com"},
            "groups": ["eng"],
        },
        {"username": "bob", "password_hash": bob_hash},
    )
    first = directory.apply_config(declared)
    assert (first.created, first.updated, first.deleted) == (("alice", "bob"), (), ())
    ids = {u.username: u.id for u in directory.store.users()}

    unchanged = directory.apply_config(declared)
    assert not unchanged.changed

    directory.clock.advance(5)  # type: ignore[attr-defined]
    changed = directory.apply_config(
        users_config(
            {
                "username": "Alice",  # the same user, written differently
                "password_hash": alice_hash,
                "profile": {"email": "alice@example.org", "name": "Alice"},
                "groups": ["eng", "admins"],
                "disabled": True,
            }
        )
    )
    assert (changed.created, changed.updated, changed.deleted) == ((), ("Alice",), ("bob",))
    (alice,) = directory.store.users()
    assert alice.id == ids["alice"]  # the same id for ever
    assert alice.username == "Alice" and alice.disabled and alice.groups == ("admins", "eng")
    assert dict(alice.profile) == {"email": "alice@example.org", "name": "Alice"}
    assert alice.updated_at == alice.created_at + 5

    emptied = directory.apply_config(())
    assert emptied.deleted == ("Alice",) and directory.store.users() == []


def test_cli_users_are_untouched_and_taken_over_only_by_name(
    directory: UserDirectory, store: SqlStore
) -> None:
    carol, dave = record("carol"), record("Dave", groups=("x",))
    store.add_user(carol)
    store.add_user(dave)
    sync = directory.apply_config(
        users_config({"username": "dave", "password_hash": hash_password("dave-password")})
    )
    assert sync.adopted == (("dave", dave.id),) and not sync.created
    assert store.user(carol.id) == carol  # never touched
    taken = store.user(dave.id)
    assert taken is not None and taken.source == "config" and taken.groups == ()
    assert verify_password(taken.password_hash, "dave-password")

    sync = directory.apply_config(())  # now it is the config's: removed with it
    assert sync.deleted == ("dave",)
    assert store.users() == [carol]


def test_an_upgraded_hash_outlives_reloads_until_the_config_changes_it(
    directory: UserDirectory, store: SqlStore
) -> None:
    weak = WEAK.hash(ALICE_PASSWORD)
    declared = users_config({"username": "alice", "password_hash": weak})
    directory.apply_config(declared)
    outcome = asyncio.run(directory.authenticate("alice", ALICE_PASSWORD))
    assert isinstance(outcome, Authenticated) and outcome.rehashed
    upgraded = store.user_by_key("alice")
    assert upgraded is not None and upgraded.password_hash != weak

    assert not directory.apply_config(declared).changed  # the upgrade stays
    assert store.user_by_key("alice") == upgraded

    new = hash_password("a-new-password")
    directory.apply_config(users_config({"username": "alice", "password_hash": new}))
    assert store.user_by_key("alice").password_hash == new  # type: ignore[union-attr]


def test_an_env_password_is_hashed_once_and_kept_while_it_matches(
    store: SqlStore,
) -> None:
    workers: list[StoreWorker | PasswordWorker] = []

    def apply(password: str, directory: UserDirectory | None = None) -> UserDirectory:
        if directory is None:
            io, passwords = StoreWorker(), PasswordWorker()
            workers.extend((io, passwords))
            directory = UserDirectory(store, io, passwords)
        declared = users_config(
            {"username": "alice", "password": "${ALICE_PASSWORD}"},
            environ={"ALICE_PASSWORD": password},
        )
        assert password not in repr(declared)
        directory.apply_config(declared)
        return directory

    first = apply(ALICE_PASSWORD)
    stored = store.user_by_key("alice")
    assert stored is not None and verify_password(stored.password_hash, ALICE_PASSWORD)
    verified = 0
    real_run = first.passwords.run

    def counting(fns: list[Any]) -> list[Any]:
        nonlocal verified
        verified += len(fns)
        return real_run(fns)

    first.passwords.run = counting  # type: ignore[method-assign]
    apply(ALICE_PASSWORD, first)  # a reload in the same process: nothing to hash or verify
    assert verified == 0
    apply(ALICE_PASSWORD)  # another process (a restart, another worker)
    assert store.user_by_key("alice") == stored  # the same hash, not made again

    apply("a-changed-password")
    changed = store.user_by_key("alice")
    assert changed is not None and changed.id == stored.id
    assert verify_password(changed.password_hash, "a-changed-password")
    assert not verify_password(changed.password_hash, ALICE_PASSWORD)
    for worker in workers:
        worker.close()


def test_a_config_user_repr_holds_no_password_or_hash() -> None:
    phc = hash_password(ALICE_PASSWORD)
    declared = users_config(
        {"username": "a", "password_hash": phc},
        {"username": "b", "password": "${B}"},
        environ={"B": "b-password-in-env"},
    )
    text = repr(declared)
    assert phc not in text and "b-password-in-env" not in text and "$argon2" not in text
    assert isinstance(declared[0], UserConfig) and "variable='B'" in text
