"""The command line's conventions, in process: help and defaults for every command,
--version, RFC 3339 times, log levels, `keys` and `users` refusing to start a store,
and `users` asking for a password twice. Real processes (exit codes, a busy port) are
in tests/e2e/test_cli_process.py and tests/e2e/test_users_cli.py."""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from authserver.config import ServerConfig
from authserver.keys import KeyFiles, KeyManager, RotationPending
from authserver.passwords import verify_password
from authserver.sqlite_store import SqliteStore
from authserver.store import StoreMissing
from tests.conftest import REPORTING_SECRET, FakeClock
from tokengate.cli import _parser, main
from tokengate.jsonlog import (
    EVENT_LEVELS,
    LEVELS,
    AuditLog,
    LineSink,
    configure_logging,
    level_from_env,
    log_event,
    log_level,
    log_level_problem,
    rfc3339,
    set_log_level,
    uvicorn_log_level,
)

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture
def level() -> Iterator[None]:
    """Restore the log level, and the logging set-up, that a test changes."""
    before = log_level()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    set_log_level(before)
    for lg, handlers, lvl, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(lvl)
        lg.propagate = propagate


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                assert helps.get(name), f"{child.prog} has no one-line help"
                yield child.prog, child
                yield from subcommands(child)


def test_every_command_has_help_and_states_its_defaults() -> None:
    commands = dict(subcommands(_parser()))
    assert set(commands) == {
        "tokengate run",
        "tokengate check",
        "tokengate keys",
        "tokengate keys list",
        "tokengate keys rotate",
        "tokengate db",
        "tokengate db migrate",
        *(
            f"tokengate users{action}"
            for action in (
                "",
                " add",
                " list",
                " show",
                " disable",
                " enable",
                " delete",
                " set-password",
                " groups",
                " mfa",
                " hash-password",
            )
        ),
        "tokengate sessions",
        "tokengate sessions list",
        "tokengate sessions revoke",
        "tokengate explain",
        "tokengate secret",
        "tokengate schema",
    }
    for prog, parser in commands.items():
        assert parser.description, prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            assert action.help, f"{prog} {action.option_strings}: no help"
            if action.option_strings and action.default is not argparse.SUPPRESS:
                assert "(default: " in action.help, f"{prog} {action.option_strings}"
        text = parser.format_help()
        assert "TOKENGATE_LOG_LEVEL" in text and "exit status" in text, prog
    run_help = commands["tokengate run"].format_help()
    assert "(default: 1)" in run_help  # --workers
    assert "$TOKENGATE_CONFIG, else" in run_help and "config/tokengate.yaml" in run_help


def test_keys_options_go_before_or_after_the_action() -> None:
    for argv in (
        ["keys", "list", "-c", "x.yaml", "--server", "s"],
        ["keys", "-c", "x.yaml", "--server", "s", "list"],
    ):
        args = _parser().parse_args(argv)
        assert (args.action, args.config, args.server) == ("list", Path("x.yaml"), "s")
    args = _parser().parse_args(["keys", "rotate"])
    assert not hasattr(args, "config") and not hasattr(args, "server")


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    expected = importlib.metadata.version("tokengate")
    assert capsys.readouterr().out == f"tokengate {expected}\n"


def test_rfc3339() -> None:
    assert rfc3339(1_796_407_200) == "2026-12-04T18:00:00Z"
    assert rfc3339(0.9) == "1970-01-01T00:00:00Z"


# --------------------------------------------------------------------------- levels


def test_log_levels_are_checked() -> None:
    for good in (None, "", "debug", "info", "WARNING", " error "):
        assert log_level_problem(good) is None
    assert log_level_problem("verbose") == (
        "TOKENGATE_LOG_LEVEL: must be one of debug, info, warning, error; got 'verbose'"
    )
    assert level_from_env({}) == "info"
    assert level_from_env({"TOKENGATE_LOG_LEVEL": "Warning"}) == "warning"
    assert level_from_env({"TOKENGATE_LOG_LEVEL": "nonsense"}) == "info"
    assert set(EVENT_LEVELS.values()) <= set(LEVELS)


def test_each_event_carries_its_level_and_lower_ones_are_dropped(
    capsys: pytest.CaptureFixture[str], level: None
) -> None:
    def emitted() -> list[tuple[str, str]]:
        return [(e["event"], e["level"]) for e in map(json.loads, capsys.readouterr().err.split())]

    set_log_level("debug")
    log_event("listening", listener="gateway")
    log_event("config.reload_failed", problems=[])
    log_event("jwks.fetch_failed")
    log_event("keys.reloaded")
    log_event("something.new")
    log_event("listening", level="error")  # a call may say otherwise
    assert emitted() == [
        ("listening", "info"),
        ("config.reload_failed", "error"),
        ("jwks.fetch_failed", "warning"),
        ("keys.reloaded", "debug"),
        ("something.new", "info"),
        ("listening", "error"),
    ]
    set_log_level("warning")
    for event in ("listening", "keys.reloaded", "jwks.fetch_failed", "startup_failed"):
        log_event(event)
    assert emitted() == [("jwks.fetch_failed", "warning"), ("startup_failed", "error")]
    set_log_level("error")
    log_event("jwks.fetch_failed")
    log_event("audit.write_failed")
    assert emitted() == [("audit.write_failed", "error")]


def test_the_events_operators_act_on_are_warnings_or_errors() -> None:
    for event in ("startup_failed", "config.reload_failed", "audit.write_failed"):
        assert EVENT_LEVELS[event] == "error"
    for event in ("jwks.fetch_failed", "gateway.upstream_failed", "worker.replaced"):
        assert EVENT_LEVELS[event] == "warning"


def test_audit_lines_are_never_filtered(tmp_path: Path, level: None) -> None:
    set_log_level("error")
    sink = LineSink(str(tmp_path / "audit.log"))
    AuditLog(sink).emit("token.issued", client_id="reporting")
    sink.close()
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    assert json.loads(line)["event"] == "token.issued" and "level" not in json.loads(line)


@pytest.mark.parametrize(
    ("chosen", "uvicorn", "libraries"),
    [
        ("debug", "debug", logging.WARNING),
        ("info", "warning", logging.WARNING),  # uvicorn's info repeats our own events
        ("warning", "warning", logging.WARNING),
        ("error", "error", logging.ERROR),
    ],
)
def test_library_logging_follows_the_level(
    chosen: str, uvicorn: str, libraries: int, level: None
) -> None:
    set_log_level(chosen)
    configure_logging()
    assert uvicorn_log_level() == uvicorn
    assert logging.getLogger("uvicorn.error").getEffectiveLevel() == LEVELS[uvicorn]
    assert logging.getLogger().level == libraries


# --------------------------------------------------------------------------- keys


def write_config(
    directory: Path, data_dir: str, *, listen: str = "127.0.0.1:0", jwks_max_age: str = "5m"
) -> Path:
    """A config with one authorization server and one client, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokengate.yaml"
    config = {
        "authserver": {
            "listen": listen,
            "data_dir": data_dir,
            "jwks_max_age": jwks_max_age,
            "servers": [{"name": "default", "audience": "api://default"}],
            "clients": [{"client_id": "reporting", "secret": REPORTING_SECRET}],
        }
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_store_that_is_not_there_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(StoreMissing) as missing:
        SqliteStore(tmp_path / "data", create=False)
    assert str(missing.value) == f"no key store in {tmp_path / 'data'}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreMissing):
        SqliteStore(tmp_path / "empty", create=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert list((tmp_path / "empty").iterdir()) == []
    SqliteStore(tmp_path / "data").close()  # the server's first start creates it
    store = SqliteStore(tmp_path / "data", create=False)
    assert store.keys() == []
    store.close()


@pytest.mark.parametrize("action", ["list", "rotate"])
def test_keys_refuses_a_missing_store_and_creates_nothing(
    tmp_path: Path,
    action: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = write_config(tmp_path / "etc", "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["keys", action, "-c", str(config)]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith(f"authserver.data_dir: no store in {tmp_path / 'etc' / 'data'} ")
    assert str(config) in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["elsewhere", "etc", "tokengate.yaml"]


def test_keys_finds_the_store_next_to_the_config_from_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "etc", "data")
    SqliteStore(tmp_path / "etc" / "data").close()  # as `tokengate run` leaves it
    monkeypatch.chdir(tmp_path)
    assert main(["keys", "rotate", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "next key" in out and "is published now" in out
    when = re.search(r"signs from (\S+)", out)
    assert when and RFC3339.fullmatch(when.group(1))
    assert main(["keys", "list", "-c", str(config)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[3] for row in rows] == ["active", "next"]
    for row in rows:
        times = row.split()[4:]
        assert all(RFC3339.fullmatch(t) or t == "-" for t in times), row
    assert not (tmp_path / "data").exists()


def test_a_refused_rotation_names_its_time_in_rfc3339(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ServerConfig("default", "http://i/oauth2/default", "api://d", "ES256", 3600, ())
    clock = FakeClock(1_796_407_200)
    store = SqliteStore(tmp_path)
    manager = KeyManager(store, KeyFiles(tmp_path), jwks_max_age=298, leeway=30, clock=clock)
    manager.rotate(server)
    with pytest.raises(RotationPending) as pending:
        manager.rotate(server)
    store.close()
    assert "it starts signing at 2026-12-04T18:05:00Z" in str(pending.value)
    assert not re.search(r"\b\d{9,}\b", str(pending.value))  # no raw epoch


def test_keys_rotate_with_another_key_encryption_key_is_refused_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "data")
    data = yaml.safe_load(config.read_text())
    sealed_with, other = os.urandom(32), os.urandom(32)
    data["authserver"]["key_encryption_key"] = base64.b64encode(other).decode()
    config.write_text(yaml.safe_dump(data))
    server = ServerConfig("default", "http://i/oauth2/default", "api://default", "RS256", 300, ())
    store = SqliteStore(tmp_path / "data")
    first = KeyManager(
        store, KeyFiles(tmp_path / "data"), jwks_max_age=300, leeway=30, kek=sealed_with
    ).ensure(server)
    assert first is not None
    assert main(["keys", "rotate", "-c", str(config)]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"default: signing key {first.kid} of server 'default' does not open with "
        "authserver.key_encryption_key: either it is not the key the store was written "
        "with, or the stored key is damaged; nothing was created\n"
    )
    assert [r.kid for r in store.keys("default")] == [first.kid]
    store.close()


def test_keys_without_an_authserver_section_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("echo: {listen: 127.0.0.1:0}\n")
    assert main(["keys", "list", "-c", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: the config has no authserver section\n"


def test_check_refuses_an_invalid_log_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, str(tmp_path / "data"))
    monkeypatch.setenv("TOKENGATE_LOG_LEVEL", "loud")
    assert main(["check", "-c", str(config)]) == 2
    assert "TOKENGATE_LOG_LEVEL: must be one of debug, info, warning, error; got 'loud'" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("TOKENGATE_LOG_LEVEL", "ERROR")
    assert main(["check", "-c", str(config)]) == 0


def test_schema_prints_the_config_schema(capsys: pytest.CaptureFixture[str]) -> None:
    from tokengate.schema import config_schema

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == config_schema()


# --------------------------------------------------------------------------- users


class _Terminal:
    """Standard input that is a terminal: the password is asked with getpass."""

    def isatty(self) -> bool:
        return True


def test_users_add_asks_for_the_password_twice_without_echo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "etc", "data")
    SqliteStore(tmp_path / "etc" / "data").close()
    answers = iter(["first-password", "other-password", "same-password", "same-password"])
    prompts: list[str] = []

    def getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("getpass.getpass", getpass)
    monkeypatch.setattr("sys.stdin", _Terminal())
    assert main(["users", "add", "dana", "-c", str(config)]) == 2
    assert capsys.readouterr().err == "password: the two passwords differ\n"
    assert main(["users", "-c", str(config), "add", "dana"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("added dana: id u") and err == ""
    assert prompts == ["Password: ", "Again: "] * 2
    store = SqliteStore(tmp_path / "etc" / "data", create=False)
    (dana,) = store.users()
    store.close()
    assert verify_password(dana.password_hash, "same-password")


def test_users_mfa_shows_and_resets_a_second_factor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from authserver.store import UserRecord

    config = write_config(tmp_path / "etc", "data")
    store = SqliteStore(tmp_path / "etc" / "data")
    store.add_user(UserRecord("u_dana", "dana", "dana", "x", {}, (), False, "cli", 0, 0))
    base = ["users", "mfa", "-c", str(config)]
    assert main([*base, "show", "dana"]) == 0
    assert capsys.readouterr().out == "dana: no authenticator app\n"
    assert store.begin_totp("u_dana", b"raw1secret", 1_800_000_000)
    assert store.confirm_totp("u_dana", 60_000_000, 1_800_000_000, ["h1", "h2"])
    assert store.use_recovery_code("u_dana", "h1", 1_800_000_100)
    assert main([*base, "show", "dana"]) == 0
    assert capsys.readouterr().out == (
        "dana: authenticator app since 2027-01-15T08:00:00Z, 1 recovery codes left\n"
    )
    from authserver.store import PasskeyRecord

    key = PasskeyRecord("AbCdEfGhIjKlMnOpQrStUv", "u_dana", b"k", 0, True, (), "a", 1_800_000_000)
    assert store.add_passkey(key)
    assert store.use_passkey(key.credential_id, 0, 1_800_000_060)
    assert main([*base, "show", "dana"]) == 0
    assert capsys.readouterr().out == (
        "dana: authenticator app since 2027-01-15T08:00:00Z, 1 recovery codes left\n"
        "dana: passkey AbCdEfGhIjKlMnOp (synced) since 2027-01-15T08:00:00Z, "
        "last used 2027-01-15T08:01:00Z\n"
    )
    other = PasskeyRecord("ZyXwVuTsRqPoNmLkJi", "u_dana", b"k2", 0, False, (), "a", 1_800_000_001)
    assert store.add_passkey(other)
    store.remember_device("device-hash", "u_dana", 1_800_000_002)
    assert main([*base, "show", "dana", "--passkey", "AbCdEfGh"]) == 2
    assert "--passkey goes with reset" in capsys.readouterr().err
    assert main([*base, "reset", "dana", "--passkey", "AbCd"]) == 1  # too short to tell
    assert "give at least the 8 first characters" in capsys.readouterr().err
    assert main([*base, "reset", "dana", "--passkey", "AbCdEfGh"]) == 0
    assert capsys.readouterr().out == (
        "removed passkey AbCdEfGhIjKlMnOp of dana; its remembered browsers are forgotten too\n"
    )
    assert [p.credential_id for p in store.passkeys("u_dana")] == ["ZyXwVuTsRqPoNmLkJi"]
    assert not store.device_known("device-hash", "u_dana", 0)
    assert store.totp("u_dana") is not None  # the app stays
    assert main([*base, "reset", "dana", "--passkey", "AbCdEfGh"]) == 1  # gone already
    capsys.readouterr()
    assert main([*base, "reset", "dana"]) == 0
    assert capsys.readouterr().out == (
        "reset the second factor of dana: it enrolls again at its next sign-in\n"
    )
    assert store.totp("u_dana") is None and store.recovery_codes_left("u_dana") == 0
    assert store.passkeys("u_dana") == []
    assert main([*base, "reset", "dana"]) == 0
    assert capsys.readouterr().out == "dana has no second factor\n"
    assert main([*base, "reset", "nobody"]) == 1
    store.close()


def test_users_refuse_a_missing_store_and_ask_for_no_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "etc", "data")
    monkeypatch.setattr("getpass.getpass", lambda prompt="": pytest.fail("asked"))
    monkeypatch.setattr("sys.stdin", _Terminal())
    assert main(["users", "add", "dana", "-c", str(config)]) == 3
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"authserver.data_dir: no store in {tmp_path / 'etc' / 'data'} ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["etc", "tokengate.yaml"]
