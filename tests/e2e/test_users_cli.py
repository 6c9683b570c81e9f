"""``tokengate users`` as a real process: passwords from standard input, exit codes,
config users read-only, no store created, and a running server applying the config's
users while the command line manages its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from authserver.passwords import hash_password, verify_password
from authserver.sqlite_store import SqliteStore
from tests.conftest import REPORTING_SECRET
from tests.e2e.conftest import free_port
from tests.e2e.test_cli_process import TOKENGATE, serving

ALICE_HASH = hash_password("alice-password")
ERIN_PASSWORD = "erin-env-password-1"  # searched for in every log, too
ID = re.compile(r"u[A-Za-z0-9_-]{22}")
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def write_config(directory: Path, *users: dict[str, Any], port: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokengate.yaml"
    config = {
        "authserver": {
            "listen": f"127.0.0.1:{port}",
            "data_dir": "data",
            "jwks_max_age": "1s",
            "servers": [{"name": "default", "audience": "api://default"}],
            "clients": [{"client_id": "reporting", "secret": REPORTING_SECRET}],
            "users": list(users),
        }
    }
    path.write_text(yaml.safe_dump(config))
    return path


def users(
    *args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``tokengate users ARGS``; what it printed is also kept in ``cwd/users-cli.log``,
    which tests/test_zz_no_secrets_in_logs.py searches for passwords and hashes."""
    result = subprocess.run(
        [TOKENGATE, "users", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    with (cwd / "users-cli.log").open("a") as log:
        log.write(result.stdout + result.stderr)
    return result


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config with one declared user, and its store as a first start leaves it."""
    path = write_config(
        tmp_path / "etc",
        {"username": "alice", "password_hash": ALICE_HASH, "profile": {"name": "Alice"}},
    )
    SqliteStore(tmp_path / "etc" / "data").close()
    return path


def test_add_list_show_and_change_a_user(config: Path, tmp_path: Path) -> None:
    c = str(config)
    added = users(
        "add", "Bob", "--email", "bob@example.com", "--name", "Bob Builder",
        "--group", "ops", "--group", "dev", "--password-stdin", "-c", c,
        cwd=tmp_path, stdin="bob-password\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    (bob_id,) = ID.findall(added.stdout)
    assert added.stdout == f"added Bob: id {bob_id}\n" and added.stderr == ""

    listed = users("list", "-c", c, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "USERNAME", "NAME", "EMAIL", "GROUPS", "DISABLED", "SOURCE"]
    assert [row.split()[1] for row in rows] == ["Bob"]  # alice: not applied until a start
    bob = [bob_id, "Bob", "Bob", "Builder", "bob@example.com", "dev,ops", "no", "cli"]
    assert rows[0].split() == bob
    assert header.index("USERNAME") == rows[0].index("Bob")  # aligned columns

    shown = users("show", "BOB", "-c", c, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    user = json.loads(shown.stdout)
    assert user["id"] == bob_id and user["source"] == "cli"
    assert user["profile"] == {"email": "bob@example.com", "name": "Bob Builder"}
    assert RFC3339.fullmatch(user["created_at"]) and RFC3339.fullmatch(user["updated_at"])
    assert "argon2" not in shown.stdout and "hash" not in shown.stdout
    assert json.loads(users("show", bob_id, "-c", c, cwd=tmp_path).stdout) == user

    for argv, out in (
        (["disable", "bob"], "disabled Bob\n"),
        (["enable", "bob"], "enabled Bob\n"),
        (["groups", "bob", "--add", "admins", "--remove", "dev"], "admins\nops\n"),
        (["groups", "bob"], "admins\nops\n"),
    ):
        result = users(*argv, "-c", c, cwd=tmp_path)
        assert (result.returncode, result.stdout) == (0, out), result.stderr
    changed = users(
        "set-password", "bob", "--password-stdin", "-c", c, cwd=tmp_path, stdin="new-password\n"
    )
    assert changed.returncode == 0, changed.stderr
    store = SqliteStore(config.parent / "data", create=False)
    record = store.user(bob_id)
    store.close()
    assert record is not None and verify_password(record.password_hash, "new-password")
    assert not record.disabled and record.groups == ("admins", "ops")

    deleted = users("delete", "bob", "-c", c, cwd=tmp_path)
    assert deleted.returncode == 0 and deleted.stdout == f"deleted Bob ({bob_id})\n"
    assert users("show", "bob", "-c", c, cwd=tmp_path).returncode == 1


@pytest.mark.parametrize(
    ("argv", "stdin", "status", "message"),
    [
        (["add", "ALICE", "--password-stdin"], "pw-pw-pw-pw\n", 1, "declared in the config"),
        (["add", "carol", "--password-stdin"], "short\n", 2, "password: must be at least 8"),
        (["add", "carol", "--password-stdin"], "x" * 1025 + "\n", 2, "at most 1024"),
        (["add", "carol", "--password-stdin"], "\n", 2, "password: must be at least 8"),
        (["add", "carol"], None, 2, "not a terminal to ask on; pass --password-stdin"),
        (["add", " carol", "--password-stdin"], "pw-pw-pw-pw\n", 2, "username: must not"),
        (["add", "carol", "--email", "nope", "--password-stdin"], "pw-pw-pw-pw\n", 2, "email"),
        (["show", "nobody"], None, 1, "no user 'nobody'"),
        (["delete", "nobody"], None, 1, "no user 'nobody'"),
        (["disable", "nobody"], None, 1, "no user 'nobody'"),
        (["set-password", "carol", "--password-stdin"], "pw-pw-pw-pw\n", 1, "no user"),
        (["add"], None, 2, "the following arguments are required: USERNAME"),
        (["rename", "x"], None, 2, "invalid choice"),
    ],
)
def test_refusals_and_their_exit_statuses(
    config: Path, tmp_path: Path, argv: list[str], stdin: str | None, status: int, message: str
) -> None:
    result = users(*argv, "-c", str(config), cwd=tmp_path, stdin=stdin)
    assert result.returncode == status, result.stderr
    assert message in result.stderr and result.stdout == ""
    if stdin and stdin.strip():
        assert stdin.strip() not in result.stderr


def test_an_existing_username_is_refused_in_any_case_or_width(config: Path, tmp_path: Path) -> None:
    c = str(config)
    first = users("add", "carol", "--password-stdin", "-c", c, cwd=tmp_path, stdin="pw-pw-pw-pw\n")
    assert first.returncode == 0, first.stderr
    for name in ("CAROL", "\uff43\uff41\uff52\uff4f\uff4c"):
        again = users("add", name, "--password-stdin", "-c", c, cwd=tmp_path, stdin="pw-pw-pw-pw\n")
        assert again.returncode == 1 and "exists already" in again.stderr


def test_config_users_are_read_only(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "etc", {"username": "alice", "password_hash": ALICE_HASH}, port=port
    )
    with serving(config, f"http://127.0.0.1:{port}/oauth2/default/v1/keys", cwd=tmp_path):
        pass  # the first start creates the store and applies the config's users
    c = str(config)
    listed = users("list", "-c", c, cwd=tmp_path)
    assert listed.stdout.splitlines()[1].split()[1:] == ["alice", "-", "-", "-", "no", "config"]
    for argv, stdin in (
        (["disable", "alice"], None),
        (["enable", "Alice"], None),
        (["delete", "alice"], None),
        (["groups", "alice", "--add", "x"], None),
        (["set-password", "alice", "--password-stdin"], "pw-pw-pw-pw\n"),
    ):
        result = users(*argv, "-c", c, cwd=tmp_path, stdin=stdin)
        assert result.returncode == 1, (argv, result.stderr)
        assert result.stderr == (
            "'alice' is declared in the config (authserver.users): change it there\n"
        )
    assert users("groups", "alice", "-c", c, cwd=tmp_path).returncode == 0  # reading is fine
    assert users("show", "alice", "-c", c, cwd=tmp_path).returncode == 0


@pytest.mark.parametrize(
    "argv", [["list"], ["show", "alice"], ["add", "bob", "--password-stdin"], ["delete", "x"]]
)
def test_users_refuse_to_create_a_store(tmp_path: Path, argv: list[str]) -> None:
    config = write_config(tmp_path / "etc")
    result = users(*argv, "-c", str(config), cwd=tmp_path, stdin="pw-pw-pw-pw\n")
    assert result.returncode == 3
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"authserver.data_dir: no store in {tmp_path / 'etc' / 'data'} ")
    assert not (tmp_path / "etc" / "data").exists() and not (tmp_path / "data").exists()


def test_hash_password_prints_only_the_hash(tmp_path: Path) -> None:
    empty = subprocess.run(
        [TOKENGATE, "users", "hash-password", "--password-stdin"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert empty.returncode == 2 and empty.stderr == "password: must be at least 8 characters\n"
    hashed = subprocess.run(
        [TOKENGATE, "users", "hash-password", "--password-stdin"],
        cwd=tmp_path,
        input="a password with spaces \n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert hashed.returncode == 0 and hashed.stderr == ""
    (phc,) = hashed.stdout.splitlines()
    assert phc.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_password(phc, "a password with spaces ")  # only the newline is dropped
    assert list(tmp_path.iterdir()) == []  # no config, no store (and this output is no log)


def test_a_running_server_applies_config_users_and_keeps_cli_users(tmp_path: Path) -> None:
    """The config's users reach the store at start and on a reload, with stable ids;
    a user made with the command line meanwhile is never touched; a password from the
    environment is hashed once and appears in no output."""
    port = free_port()
    etc = tmp_path / "etc"
    env = {"ERIN_PASSWORD": ERIN_PASSWORD}
    alice = {"username": "alice", "password_hash": ALICE_HASH, "groups": ["eng"]}
    erin = {"username": "erin", "password": "${ERIN_PASSWORD}"}
    config = write_config(etc, alice, erin, port=port)
    c = str(config)

    def listing() -> dict[str, list[str]]:
        result = users("list", "-c", c, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        return {row.split()[1]: row.split() for row in result.stdout.splitlines()[1:]}

    def store_hash(username: str) -> str:
        store = SqliteStore(etc / "data", create=False)
        record = store.user_by_key(username)
        store.close()
        assert record is not None
        return record.password_hash

    ready = f"http://127.0.0.1:{port}/oauth2/default/v1/keys"
    with serving(config, ready, cwd=tmp_path, env=env) as proc:
        before = listing()
        assert before["alice"][-1] == before["erin"][-1] == "config"
        erin_hash = store_hash("erin")
        assert verify_password(erin_hash, ERIN_PASSWORD)
        added = users(
            "add", "carol", "--password-stdin", "-c", c, cwd=tmp_path, stdin="carol-pw-1\n", env=env
        )
        assert added.returncode == 0, added.stderr

        bob = {"username": "bob", "password_hash": ALICE_HASH}
        write_config(etc, {**alice, "groups": ["eng", "admins"]}, erin, bob, port=port)
        deadline = time.monotonic() + 15
        while "bob" not in listing():
            assert time.monotonic() < deadline, "the reload did not reach the store"
            time.sleep(0.2)
        after = listing()
        assert after["alice"][0] == before["alice"][0]  # the same id
        assert after["alice"][-3] == "admins,eng"
        assert after["carol"][-1] == "cli"
        assert store_hash("erin") == erin_hash  # not hashed again

        write_config(etc, erin, bob, port=port)
        deadline = time.monotonic() + 15
        while "alice" in listing():
            assert time.monotonic() < deadline, "the removed user is still there"
            time.sleep(0.2)
        assert set(listing()) == {"bob", "carol", "erin"}
    with serving(config, ready, cwd=tmp_path, env=env) as restarted:
        assert store_hash("erin") == erin_hash  # a restart does not hash it again either
    assert proc.returncode == 0 and restarted.returncode == 0
    assert proc.stderr is not None
    err = proc.stderr.read()
    (tmp_path / "server-stderr.log").write_text(err)  # for the search for secrets
    for secret in (ERIN_PASSWORD, "alice-password", "carol-pw-1", "$argon2"):
        assert secret not in err
    synced = [json.loads(line) for line in err.splitlines() if '"users.synced"' in line]
    assert [(e["created"], e["updated"], e["deleted"]) for e in synced] == [
        (2, 0, 0),
        (1, 1, 0),
        (0, 0, 1),
    ]


def test_sessions_are_listed_and_revoked_with_their_refresh_tokens(tmp_path: Path) -> None:
    """``tokengate sessions``: list live sessions (by user too); revoke one by sid or
    all of a user's, which also ends the refresh tokens issued in them."""
    from authserver.store import Grant, SessionRecord

    path = write_config(tmp_path, {"username": "alice", "password_hash": ALICE_HASH})
    assert users("list", "-c", str(path), cwd=tmp_path).returncode == 3  # no store yet
    store = SqliteStore(tmp_path / "data")
    from authserver.passwords import PasswordWorker
    from authserver.store import StoreWorker
    from authserver.users import UserDirectory  # the config's users, as `run` applies them
    from tokengate.config import load_config

    config = load_config(path)
    assert config.authserver is not None
    io, passwords = StoreWorker(), PasswordWorker(1)
    UserDirectory(store, io, passwords).apply_config(config.authserver.users)
    passwords.close()
    io.close()
    [alice] = store.users()
    now = int(time.time())
    for sid in ("sid-one", "sid-two"):
        store.add_session(
            f"hash-{sid}", SessionRecord(sid, alice.id, now, now, now + 3600, now + 600)
        )
    grant = Grant(
        "fam", "default", "portal", alice.id, "sid-one", ("openid",), now, False, now + 86400
    )
    assert store.start_family(grant, "refresh-hash", now + 600, "jti-1", now + 300)
    store.close()

    def sessions(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TOKENGATE, "sessions", *args, "-c", str(path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = sessions("list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "SID",
        "USER",
        "USER",
        "ID",
        "SIGNED",
        "IN",
        "IDLE",
        "UNTIL",
        "ENDS",
    ]
    assert sorted(line.split()[0] for line in lines[1:]) == ["sid-one", "sid-two"]
    assert all(line.split()[1] == "alice" for line in lines[1:])
    assert sessions("revoke").returncode == 2  # a sid or --user: one of them
    assert sessions("revoke", "sid-none").returncode == 1
    ended = sessions("revoke", "sid-one")
    assert ended.stdout == "ended session sid-one (1 access tokens revoked)\n"
    assert [line.split()[0] for line in sessions("list").stdout.splitlines()[1:]] == ["sid-two"]
    store = SqliteStore(tmp_path / "data", create=False)
    assert store.is_revoked("jti-1") and store.refresh_grant("refresh-hash", now) is None
    store.close()
    assert (
        sessions("revoke", "--user", "ALICE").stdout
        == "ended session sid-two (0 access tokens revoked)\n"
    )
    assert sessions("list", "--user", "alice").stdout.splitlines()[1:] == []
