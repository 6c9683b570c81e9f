"""The config's users reach the store at start and at every reload: ids stay, users
no longer declared go, users made with the command line are left alone."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from authserver.app import AuthServerApp, AuthServices
from authserver.passwords import hash_password, verify_password
from authserver.store import StoreUnavailable, UserRecord
from authserver.users import Authenticated, new_user_id, username_key
from tests.conftest import AuthServer, FakeClock, base_config, config_from
from tokengate.config import parse_config
from tokengate.jsonlog import AuditLog, LineSink

pytestmark = pytest.mark.anyio

ALICE_HASH = hash_password("alice-password")
BOB_HASH = hash_password("bob-password")


def with_users(*users: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        data["authserver"]["users"] = list(users)

    return mutate


def events(capsys: pytest.CaptureFixture[str], name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    return [e for e in lines if e["event"] == name]


async def reload(server: AuthServer, *users: dict[str, Any]) -> AuthServerApp:
    data = base_config(server.services.config.data_dir)
    data["authserver"]["users"] = list(users)
    config = config_from(data)
    assert config.authserver is not None
    app = AuthServerApp(server.services)
    await app.reconfigure(config.authserver)
    return app


def cli_user(username: str) -> UserRecord:
    return UserRecord(
        id=new_user_id(),
        username=username,
        username_key=username_key(username),
        password_hash=hash_password(f"{username}-password"),
        profile={},
        groups=("ops",),
        disabled=False,
        source="cli",
        created_at=1,
        updated_at=1,
    )


async def test_config_users_are_in_the_store_from_the_start(
    make_authserver: Callable[..., AuthServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_authserver(
        with_users(
            {
                "username": "alice",
                "password_hash": ALICE_HASH,
                "profile": {"email": "alice@example.com", "email_verified": True},
                "groups": ["engineering"],
            }
        )
    )
    (synced,) = events(capsys, "users.synced")
    assert (synced["created"], synced["updated"], synced["deleted"]) == (1, 0, 0)
    (alice,) = await server.services.users.list()
    assert (alice.username, alice.source, alice.groups) == ("alice", "config", ("engineering",))
    assert dict(alice.profile) == {"email": "alice@example.com", "email_verified": True}
    outcome = await server.services.users.authenticate("Alice", "alice-password")
    assert outcome == Authenticated(alice)


async def test_a_reload_updates_keeps_ids_deletes_and_leaves_cli_users_alone(
    make_authserver: Callable[..., AuthServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_authserver(
        with_users(
            {"username": "alice", "password_hash": ALICE_HASH},
            {"username": "bob", "password_hash": BOB_HASH},
        )
    )
    store = server.services.store
    carol = cli_user("carol")
    store.add_user(carol)
    ids = {u.username: u.id for u in store.users()}
    capsys.readouterr()

    server.clock.advance(30)
    await reload(server, {"username": "alice", "password_hash": ALICE_HASH, "groups": ["admins"]})
    (synced,) = events(capsys, "users.synced")
    assert (synced["created"], synced["updated"], synced["deleted"]) == (0, 1, 1)
    users = {u.username: u for u in store.users()}
    assert set(users) == {"alice", "carol"}
    assert users["alice"].id == ids["alice"] and users["alice"].groups == ("admins",)
    assert users["alice"].updated_at == users["alice"].created_at + 30
    assert users["carol"] == carol

    await reload(server, {"username": "alice", "password_hash": ALICE_HASH, "groups": ["admins"]})
    assert events(capsys, "users.synced") == []  # nothing changed: nothing written or said
    await reload(server, {"username": "bob", "password_hash": BOB_HASH})
    users = {u.username: u for u in store.users()}
    assert set(users) == {"bob", "carol"} and users["bob"].id != ids["bob"]  # a new bob


async def test_a_config_user_takes_over_a_cli_user_of_the_same_name(
    make_authserver: Callable[..., AuthServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_authserver()
    dave = cli_user("Dave")
    server.services.store.add_user(dave)
    capsys.readouterr()
    await reload(server, {"username": "dave", "password_hash": BOB_HASH})
    (adopted,) = events(capsys, "users.adopted")
    assert (adopted["level"], adopted["username"], adopted["user_id"]) == (
        "warning",
        "dave",
        dave.id,
    )
    taken = server.services.store.user(dave.id)
    assert taken is not None and taken.source == "config" and taken.username == "dave"
    assert verify_password(taken.password_hash, "bob-password")


async def test_an_env_password_is_hashed_once_across_reloads_and_restarts(
    tmp_path: Path,
) -> None:
    def services(password: str) -> AuthServices:
        data = base_config(tmp_path / "data")
        data["authserver"]["users"] = [{"username": "erin", "password": "${ERIN_PASSWORD}"}]
        config = parse_config(yaml.safe_dump(data), {"ERIN_PASSWORD": password})
        assert config.authserver is not None
        assert password not in repr(config)
        built = AuthServices.build(config.authserver, audit=audit, clock=FakeClock())
        built.start()
        return built

    def close(built: AuthServices) -> None:
        built.passwords.close()
        built.io.close()
        built.store.close()

    audit = AuditLog(LineSink(str(tmp_path / "audit.log")))
    first = services("erin-password")
    (erin,) = first.store.users()
    assert verify_password(erin.password_hash, "erin-password")
    await AuthServerApp(first).reconfigure(first.config)  # a reload
    close(first)
    restarted = services("erin-password")  # a restart, or another worker
    assert restarted.store.users() == [erin]  # the same hash: not made again
    close(restarted)
    changed = services("erin-new-password")
    (after,) = changed.store.users()
    assert after.id == erin.id and verify_password(after.password_hash, "erin-new-password")
    close(changed)
    audit.sink.close()


async def test_a_store_that_fails_refuses_the_reload_and_keeps_the_old_config(
    make_authserver: Callable[..., AuthServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_authserver(with_users({"username": "alice", "password_hash": ALICE_HASH}))
    before = server.services.config

    def broken() -> list[UserRecord]:
        raise StoreUnavailable("OperationalError: disk I/O error")

    monkeypatch.setattr(server.services.store, "users", broken)
    with pytest.raises(RuntimeError, match="the store could not be updated"):
        await reload(server, {"username": "bob", "password_hash": BOB_HASH})
    assert server.services.config is before


async def lifespan(app: AuthServerApp) -> list[dict[str, Any]]:
    """Run the app's lifespan: startup, then (if it started) shutdown."""
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    return sent


async def test_the_lifespan_start_applies_the_users_or_fails_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = base_config(tmp_path / "data")
    data["authserver"]["users"] = [{"username": "alice", "password_hash": ALICE_HASH}]
    config = config_from(data).authserver
    assert config is not None
    audit = AuditLog(LineSink(str(tmp_path / "audit.log")))
    started = AuthServices.build(config, audit=audit)
    sent = await lifespan(AuthServerApp(started))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    broken = AuthServices.build(config, audit=audit)
    assert [u.username for u in broken.store.users()] == ["alice"]

    def fail() -> list[UserRecord]:
        raise StoreUnavailable("OperationalError: database is locked")

    monkeypatch.setattr(broken.store, "users", fail)
    (failed,) = await lifespan(AuthServerApp(broken))
    assert failed == {
        "type": "lifespan.startup.failed",
        "message": "OperationalError: database is locked",
    }
    await broken.aclose()
    audit.sink.close()
