"""The ``tokengate`` command line: run, check, keys, users, secret, schema.

Exit status, every command: 0 done; 1 refused by the state of things (``keys rotate``
while a next key is pending, ``users`` naming a user that is not there, exists already
or is declared in the config); 2 a problem with the command line, the config or the
environment (``path: problem`` lines on stderr; a password too short, or no terminal
to ask for it); 3 what the config names cannot be used (a listen address that cannot
be bound, a data dir or store that cannot be opened or, for ``keys`` and ``users``,
is not there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import hashlib
import json
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokengate.config import DEFAULT_PATH, Config, default_path, load_config
from tokengate.jsonlog import (
    DEFAULT_LEVEL,
    LEVELS,
    LOG_LEVEL_ENV,
    level_from_env,
    log_level_problem,
    rfc3339,
    set_log_level,
)
from tokengate.version import VERSION
from tokengate.yamlconf import ConfigErrors

if TYPE_CHECKING:
    from authserver import explain
    from authserver.config import AuthServerConfig
    from authserver.sqlstore import SqlStore
    from authserver.users import User, UserDirectory


UNUSABLE = 3  # what the config names cannot be used (as `run`'s STARTUP_FAILURE)
DEFAULT_WORKERS = 1
CONFIG_HELP = f"config file (default: $TOKENGATE_CONFIG, else {DEFAULT_PATH})"
ENVIRONMENT = f"""\
environment:
  TOKENGATE_CONFIG     the config file when -c is not given (default: {DEFAULT_PATH})
  {LOG_LEVEL_ENV}  {"|".join(LEVELS)}: the least important stderr event shown
                       (default: {DEFAULT_LEVEL}); audit lines are never filtered

exit status: 0 done, 1 refused (keys rotate with a next key pending; a user that is not
there, exists already or is declared in the config), 2 a problem with the command
line, the config or the environment, 3 what the config names cannot be used (a busy
listen address, a missing or unusable data dir or key store)"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; defaults are spelled out in each help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokengate",
        description="API gateway with an embedded OAuth 2.0 authorization server.",
        epilog=ENVIRONMENT + "\n\n`tokengate COMMAND --help` tells more about each command.",
        formatter_class=_Help,
    )
    parser.add_argument(
        "--version", action="version", version=f"tokengate {VERSION}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=description,
            epilog=ENVIRONMENT,
            formatter_class=_Help,
        )

    run = command(
        "run",
        "serve every section of the config",
        "Serve every section of the config: the authorization server, the gateway, the\n"
        "admin listener (/healthz, /readyz, /metrics) and the echo upstream. Every\n"
        "listener is bound before anything starts; the config file is watched and\n"
        "reloaded on change or SIGHUP. SIGTERM or SIGINT drains and exits 0.",
    )
    _config_option(run)
    run.add_argument(
        "--workers",
        type=_positive,
        default=DEFAULT_WORKERS,
        metavar="N",
        help=f"worker processes sharing the listeners (default: {DEFAULT_WORKERS})",
    )
    run.add_argument(
        "--only",
        choices=("gateway", "authserver"),
        help="serve this side only, with the admin listener and, for the gateway, the "
        "echo upstream when configured (default: every section)",
    )
    run.set_defaults(func=_run)

    check = command(
        "check",
        "validate the config; exit 2 listing every problem",
        "Validate the config as `run` would, without serving it: exit 0 printing\n"
        "`FILE: ok` (and any warnings), or 2 with one `path: problem` line per problem.",
    )
    _config_option(check)
    check.set_defaults(func=_check)

    keys = command(
        "keys",
        "list or rotate the authorization servers' signing keys",
        "List or rotate the signing keys in the key store of authserver.data_dir. The\n"
        "store must exist (the server creates it on its first start): a missing one is\n"
        "an error, never a new, empty store.",
    )
    _keys_options(keys)
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, summary, description in (
        (
            "list",
            "print every key: state, creation, when it signs, retires, leaves the JWKS",
            "Print every signing key of each authorization server: its kid, algorithm,\n"
            "state (next, active, retired, expired) and, in RFC 3339 UTC, when it was\n"
            "created, starts signing, was retired and leaves the JWKS.",
        ),
        (
            "rotate",
            "publish a next key now; it starts signing one JWKS cache lifetime later",
            "Publish a next signing key now; it starts signing one JWKS cache lifetime\n"
            "(authserver.jwks_max_age, plus 2 s) later, so every cache holds it first.\n"
            "A running server picks it up within 2 s. Exits 1 for a server that already\n"
            "has a next key pending.",
        ),
    ):
        action = actions.add_parser(
            name, help=summary, description=description, epilog=ENVIRONMENT, formatter_class=_Help
        )
        _keys_options(action)
    keys.set_defaults(func=_keys)

    db = command(
        "db",
        "apply the store's schema migrations",
        "Manage the authorization server's store (authserver.store, else the SQLite\n"
        "store in authserver.data_dir).",
    )
    _config_option(db, default=argparse.SUPPRESS)
    db_actions = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    migrate = db_actions.add_parser(
        "migrate",
        help="apply the migrations the store lacks, and print its schema version",
        description="Apply the versioned schema migrations the store lacks, in order, in one\n"
        "transaction under the store's lock (replicas starting at the same time wait,\n"
        "then find nothing to do), and print the schema version. `tokengate run` does\n"
        "the same at start; run this first to upgrade a fleet (a Helm pre-upgrade Job).\n"
        "Migrations only add: replicas of the previous release keep working meanwhile.",
        epilog=ENVIRONMENT,
        formatter_class=_Help,
    )
    _config_option(migrate, default=argparse.SUPPRESS)
    db.set_defaults(func=_db)

    _users_commands(command)
    _sessions_commands(command)
    _explain_command(command)

    secret = command(
        "secret",
        "print a new client secret and its hash",
        "Print a new client secret (`secret: ...`, hand it to the client once) and its\n"
        "hash (`secret_hash: sha256:...`, for the client's entry in the config).",
    )
    secret.set_defaults(func=_secret)

    schema = command(
        "schema",
        "print the config file's JSON Schema",
        "Print a JSON Schema (draft 2020-12) of the config file, for editors that\n"
        "validate and complete YAML:\n"
        "  tokengate schema > tokengate.schema.json\n"
        "then start the config file with\n"
        "  # yaml-language-server: $schema=./tokengate.schema.json",
    )
    schema.set_defaults(func=_schema)
    return parser


def _config_option(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
    parser.add_argument("-c", "--config", type=Path, metavar="FILE", help=CONFIG_HELP, **kwargs)


def _keys_options(parser: argparse.ArgumentParser) -> None:
    """-c and --server, before or after the action: SUPPRESS keeps the action's parser
    from resetting what was given before it."""
    _config_option(parser, default=argparse.SUPPRESS)
    parser.add_argument(
        "--server",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="one authorization server (default: every one)",
    )


USERS_ACTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "add",
        "add a user; asks for its password twice, without echo",
        "Add a user to the directory in the store of authserver.data_dir. Its password is\n"
        "asked twice on the terminal, without echo, or read as one line from standard\n"
        "input with --password-stdin. Prints the user's id (the sub of its tokens).\n"
        "Exits 1 if the username is taken, here or in the config's authserver.users.",
    ),
    (
        "list",
        "print every user: id, username, name, email, groups, disabled, source",
        "Print every user in aligned columns: its id, username, name and email (from\n"
        "its profile), groups, whether it is disabled, and its source (config: declared\n"
        "in authserver.users; cli: made with `tokengate users add`).",
    ),
    (
        "show",
        "print one user as JSON",
        "Print one user as JSON: id, username, profile, groups, disabled, source and, in\n"
        "RFC 3339 UTC, when it was created and last changed. Never its password hash.",
    ),
    (
        "disable",
        "stop a user from signing in",
        "Disable a user: its password no longer signs it in. Exits 1 for a config user.",
    ),
    ("enable", "let a disabled user sign in again", "Enable a disabled user again."),
    (
        "delete",
        "delete a user",
        "Delete a user. Its id is never given again. Exits 1 for a config user (remove\n"
        "it from authserver.users instead).",
    ),
    (
        "set-password",
        "set a user's password; asks twice, without echo",
        "Set a user's password: asked twice on the terminal, without echo, or read as\n"
        "one line from standard input with --password-stdin.",
    ),
    (
        "groups",
        "print a user's groups, or add and remove some",
        "Print a user's groups, one a line, after adding those of --add and removing\n"
        "those of --remove.",
    ),
    (
        "mfa",
        "show or reset a user's second factors (authenticator app, passkeys, recovery codes)",
        "show: whether the user has an authenticator app, their passkeys and how many\n"
        "recovery codes are left. reset: forget the app, the passkeys and the recovery\n"
        "codes (a lost phone); the user enrolls again at their next sign-in that needs a\n"
        "factor. Works for users declared in the config too: their factors live in the\n"
        "store.",
    ),
    (
        "hash-password",
        "read a password, print its argon2id hash for authserver.users",
        "Read a password (asked twice without echo, or one line of standard input with\n"
        "--password-stdin) and print only its argon2id PHC string, for a user's\n"
        "password_hash in authserver.users. Needs no config and no store.",
    ),
)
USER_REF_HELP = "the user's username (compared ignoring case), or its id"


def _users_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    users = command(
        "users",
        "manage the user directory: add, list, show, disable, set passwords, groups",
        "Manage the users in the store of authserver.data_dir. The store must exist (the\n"
        "server creates it on its first start): a missing one is an error, never a new,\n"
        "empty store. Users declared in the config (authserver.users) are shown but\n"
        "never changed here: the config file manages them.",
    )
    _config_option(users, default=argparse.SUPPRESS)
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, summary, description in USERS_ACTIONS:
        action = actions.add_parser(
            name, help=summary, description=description, epilog=ENVIRONMENT, formatter_class=_Help
        )
        if name != "hash-password":
            _config_option(action, default=argparse.SUPPRESS)
        if name == "add":
            action.add_argument("username", metavar="USERNAME", help="the new user's username")
            action.add_argument("--email", metavar="E", help="its email (default: none)")
            action.add_argument("--name", metavar="N", help="its full name (default: none)")
            action.add_argument(
                "--group",
                metavar="G",
                action="append",
                default=[],
                help="a group it is in; again for more (default: none)",
            )
        elif name not in ("list", "hash-password"):
            if name == "mfa":
                action.add_argument(
                    "operation", choices=("show", "reset"), help="what to do (show or reset)"
                )
                action.add_argument(
                    "--passkey",
                    metavar="ID",
                    help="reset: forget only this passkey (its id, or at least the first 8 "
                    "characters show prints) and keep the other factors (default: forget all)",
                )
            action.add_argument("user", metavar="USER", help=USER_REF_HELP)
        if name == "groups":
            for flag, what in (("--add", "add the user to"), ("--remove", "remove it from")):
                action.add_argument(
                    flag,
                    metavar="G",
                    action="append",
                    default=[],
                    help=f"{what} this group; again for more (default: none)",
                )
        if name in ("add", "set-password", "hash-password"):
            action.add_argument(
                "--password-stdin",
                action="store_true",
                help="read the password as one line of standard input (default: ask on the "
                "terminal, twice, without echo)",
            )
    users.set_defaults(func=_users)


def _sessions_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    sessions = command(
        "sessions",
        "list or end users' browser sessions",
        "List or end the org-wide browser sessions in the store of authserver.data_dir.\n"
        "Ending a session signs its user out of every application at their next sign-in\n"
        "request, and stops the refresh tokens issued in it without offline_access (and\n"
        "the access tokens those gave).",
    )
    _config_option(sessions, default=argparse.SUPPRESS)
    actions = sessions.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="list live sessions",
        description="List live sessions, newest first.",
        epilog=ENVIRONMENT,
        formatter_class=_Help,
    )
    revoke = actions.add_parser(
        "revoke",
        help="end one session, or every session of a user",
        description="End the session SID, or with --user every session of that user.",
        epilog=ENVIRONMENT,
        formatter_class=_Help,
    )
    for action in (listing, revoke):
        _config_option(action, default=argparse.SUPPRESS)
        action.add_argument("--user", metavar="U", help=USER_REF_HELP + " (default: every user)")
    revoke.add_argument("sid", metavar="SID", nargs="?", help="the session's id (its sid claim)")
    sessions.set_defaults(func=_sessions)


def _explain_command(command: Callable[..., argparse.ArgumentParser]) -> None:
    explain = command(
        "explain",
        "say what an authorization server would decide on a token request, and why",
        "Say what an authorization server would decide on a token request, step by\n"
        "step, as the server decides it: the client's own limits (its servers, grant\n"
        "types, scopes, groups), then each access policy and rule in order (which one\n"
        "decides, and why each one before it did not match), then what would be issued\n"
        "(scopes, token lifetimes, a refresh token). Nothing is issued or changed.\n"
        "The user is read from the store, or from authserver.users when the store does\n"
        "not exist yet; --group instead of --user explains for any user in those groups.\n"
        "Exits 0 when the request would be allowed, 1 when it would be denied.",
    )
    _config_option(explain)
    required = {"required": True, "default": argparse.SUPPRESS}
    explain.add_argument("--server", metavar="S", help="the authorization server", **required)
    explain.add_argument("--client", metavar="C", help="the client's client_id", **required)
    explain.add_argument(
        "--grant",
        metavar="G",
        help="the grant type: client_credentials, authorization_code, refresh_token, "
        "password or implicit",
        **required,
    )
    explain.add_argument(
        "--scope",
        metavar="SCOPE",
        action="append",
        default=[],
        help="a scope asked for, space-separated or again for more (default: what the "
        "server gives when none is asked)",
    )
    who = explain.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="U", help=USER_REF_HELP + " (default: no user)")
    who.add_argument(
        "--group",
        metavar="G",
        action="append",
        help="instead of --user: a user in this group; again for more (default: none)",
    )
    explain.add_argument(
        "--json", action="store_true", help="print JSON instead of text (default: text)"
    )
    explain.set_defaults(func=_explain)


def _explain(args: argparse.Namespace) -> int:
    from authserver import explain

    loaded = _load_authserver(args)
    if loaded is None:
        return 2
    path, config = loaded
    server = next((s for s in config.servers if s.name == args.server), None)
    if server is None:
        print(f"no authorization server named {args.server!r} in {path}", file=sys.stderr)
        return 2
    person: explain.Person | None = None
    if args.group:
        person = explain.Person("(any user)", None, tuple(dict.fromkeys(args.group)))
    elif args.user is not None:
        try:
            person = _explain_person(config, path, args.user)
        except _Refused as exc:
            print(exc, file=sys.stderr)
            return exc.status
    scopes = tuple(dict.fromkeys(w for s in args.scope for w in s.split()))
    client = next((c for c in config.clients if c.client_id == args.client), None)
    result = explain.explain(
        server, client, args.client, args.grant, scopes or None, person, config.sign_on
    )
    if args.json:
        print(json.dumps(explain.as_json(result), indent=2))
    else:
        sys.stdout.write(explain.render(result))
    return 0 if result.allowed else 1


def _explain_person(config: AuthServerConfig, path: Path, ref: str) -> explain.Person:
    """The user ``ref`` names: from the store, else (no store yet) from the config."""
    from authserver.explain import Person
    from authserver.sqlite_store import SqliteStore
    from authserver.userrules import username_key

    if config.store is None and not (config.data_dir / SqliteStore.FILENAME).is_file():
        declared = next((u for u in config.users if u.username_key == username_key(ref)), None)
        if declared is None:
            raise _Refused(f"no user {ref!r} in authserver.users (and no store yet)", 1)
        return Person(declared.username, None, declared.groups, declared.disabled)
    with _directory(config, path) as (_, directory):
        user = asyncio.run(directory.resolve(ref))
    if user is None:
        raise _Refused(f"no user {ref!r}", 1)
    return Person(user.username, user.id, user.groups, user.disabled)


def _sessions(args: argparse.Namespace) -> int:
    if args.action == "revoke" and (args.sid is None) == (args.user is None):
        print("sessions revoke: give a SID or --user U (one of them)", file=sys.stderr)
        return 2
    loaded = _load_authserver(args)
    if loaded is None:
        return 2
    try:
        with _directory(loaded[1], loaded[0]) as (store, directory):
            return _sessions_action(args, store, directory)
    except _Refused as exc:
        print(exc, file=sys.stderr)
        return exc.status


def _sessions_action(args: argparse.Namespace, store: SqlStore, directory: UserDirectory) -> int:
    now = int(time.time())
    user_id = None
    if args.user is not None:
        user = asyncio.run(directory.resolve(args.user))
        if user is None:
            print(f"no user {args.user!r}", file=sys.stderr)
            return 1
        user_id = user.id
    found = directory.io.run(store.sessions, now, user_id)
    if args.action == "list":
        names = {u.id: u.username for u in asyncio.run(directory.list())}
        rows = [("SID", "USER", "USER ID", "SIGNED IN", "IDLE UNTIL", "ENDS")]
        rows += [
            (
                s.sid,
                names.get(s.user_id, "-"),
                s.user_id,
                _time(s.auth_time),
                _time(s.idle_expires_at),
                _time(s.expires_at),
            )
            for s in found
        ]
        _print_table(rows)
        return 0
    targets = [s for s in found if args.sid is None or s.sid == args.sid]
    if args.sid is not None and not targets:
        print(f"no live session {args.sid!r}", file=sys.stderr)
        return 1
    for session in targets:
        directory.io.run(store.end_session_sid, session.sid)
        revoked = directory.io.run(store.end_session_grants, session.sid, now)
        print(f"ended session {session.sid} ({len(revoked)} access tokens revoked)")
    if not targets:
        print("no live sessions")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _load(args: argparse.Namespace, *, to_serve: bool = False) -> tuple[Path, Config] | None:
    """The config, or None once its problems are on stderr. ``to_serve``: also refuse
    what ``run`` could not start with (an audit file it cannot open, an invalid
    ``TOKENGATE_LOG_LEVEL``)."""
    path = getattr(args, "config", None) or default_path()
    errors: list[str] = []
    if to_serve:
        problem = log_level_problem(os.environ.get(LOG_LEVEL_ENV))
        if problem is not None:
            errors.append(problem)
    try:
        config = load_config(path, check_files=to_serve)
    except ConfigErrors as exc:
        errors.extend(str(error) for error in exc.errors)
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        return None
    return path, config


def _run(args: argparse.Namespace) -> int:
    from tokengate.serve import run

    loaded = _load(args, to_serve=True)
    if loaded is None:
        return 2
    set_log_level(level_from_env())
    path, config = loaded
    return run(path, config, workers=args.workers, only=args.only)


def _check(args: argparse.Namespace) -> int:
    loaded = _load(args, to_serve=True)  # what `run` would refuse, `check` reports
    if loaded is None:
        return 2
    for warning in loaded[1].warnings:
        print(f"warning: {warning}")
    print(f"{loaded[0]}: ok")
    return 0


def _load_authserver(args: argparse.Namespace) -> tuple[Path, AuthServerConfig] | None:
    """The config's authserver section, or None once the problem is on stderr."""
    loaded = _load(args)
    if loaded is None:
        return None
    path, whole = loaded
    if whole.authserver is None:
        print(f"{path}: the config has no authserver section", file=sys.stderr)
        return None
    return path, whole.authserver


def _keys(args: argparse.Namespace) -> int:
    from authserver.keys import KeyFiles, KeyManager, RotationPending
    from authserver.keyseal import KeyUnsealError

    loaded = _load_authserver(args)
    if loaded is None:
        return 2
    path, config = loaded
    servers = config.servers
    only = getattr(args, "server", None)
    if only is not None:
        servers = tuple(s for s in servers if s.name == only)
        if not servers:
            print(f"no authorization server named {only!r} in {path}", file=sys.stderr)
            return 2
    try:
        store = _open_store(config, path)
    except _Refused as exc:
        print(exc, file=sys.stderr)
        return exc.status
    manager = KeyManager(
        store,
        KeyFiles(config.data_dir),
        jwks_max_age=config.jwks_max_age,
        leeway=config.leeway,
        kek=config.key_encryption_key,
    )
    try:
        if args.action == "rotate":
            status = 0
            for server in servers:
                try:
                    record = manager.rotate(server)
                except RotationPending as exc:
                    print(f"{server.name}: {exc}", file=sys.stderr)
                    status = 1
                    continue
                except KeyUnsealError as exc:  # nothing was created
                    print(f"{server.name}: {exc}; nothing was created", file=sys.stderr)
                    return 3
                print(
                    f"{server.name}: next key {record.kid} ({record.alg}) is published now "
                    f"and signs from {_time(record.activate_at)} "
                    f"(in {manager.rotation_lead}s, one JWKS cache lifetime)"
                )
            return status
        print(
            f"{'SERVER':<12} {'KID':<44} {'ALG':<6} {'STATE':<8} {'CREATED':<21} "
            f"{'ACTIVE FROM':<21} {'RETIRED':<21} LEAVES JWKS"
        )
        for server in servers:
            for s in manager.schedule(server):
                r = s.record
                print(
                    f"{r.server:<12} {r.kid:<44} {r.alg:<6} {s.state:<8} "
                    f"{_time(r.created_at):<21} {_time(r.activate_at):<21} "
                    f"{_time(s.retired_at):<21} {_time(s.unpublish_at)}"
                )
        return 0
    finally:
        store.close()


class _Refused(Exception):
    """A users command that cannot go on: its message, and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _users(args: argparse.Namespace) -> int:
    try:
        if args.action == "hash-password":
            from authserver.passwords import hash_password

            print(hash_password(_read_password(args)))
            return 0
        return _users_in_store(args)
    except _Refused as exc:
        print(exc, file=sys.stderr)
        return exc.status


def _users_in_store(args: argparse.Namespace) -> int:
    from authserver.users import UserError

    loaded = _load_authserver(args)
    if loaded is None:
        return 2
    path, config = loaded
    try:
        with _directory(config, path) as (_, directory):
            return _users_action(args, config, directory, asyncio.run)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1


@contextlib.contextmanager
def _directory(config: AuthServerConfig, path: Path) -> Iterator[tuple[SqlStore, UserDirectory]]:
    """The store of ``config`` (never created: _Refused) and its user directory, closed
    after; a store that fails meanwhile is _Refused with exit 3."""
    from authserver.passwords import PasswordWorker
    from authserver.store import StoreUnavailable, StoreWorker
    from authserver.users import UserDirectory

    store = _open_store(config, path)
    io, passwords = StoreWorker(), PasswordWorker(1)
    try:
        yield store, UserDirectory(store, io, passwords)
    except StoreUnavailable as exc:
        raise _Refused(f"the store {store}: {exc}", UNUSABLE) from None
    finally:
        passwords.close()
        io.close()
        store.close()


def _users_action(
    args: argparse.Namespace,
    config: AuthServerConfig,
    directory: UserDirectory,
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> int:
    from authserver.users import (
        UserExists,
        UserNotFound,
        UserReadOnly,
        check_new_user,
        username_key,
    )

    action = args.action
    if action == "list":
        _print_users(run(directory.list()))
        return 0
    if action == "add":
        profile = {k: v for k, v in (("email", args.email), ("name", args.name)) if v}
        # everything is checked before the password is asked for (and again in add())
        check_new_user(args.username, profile, args.group)
        key = username_key(args.username)
        if any(u.username_key == key for u in config.users):
            raise UserReadOnly(args.username)
        if run(directory.find(args.username)) is not None:
            raise UserExists(args.username)
        user = run(
            directory.add(args.username, _read_password(args), profile=profile, groups=args.group)
        )
        print(f"added {user.username}: id {user.id}")
        return 0
    user = run(directory.resolve(args.user))
    if user is None:
        raise UserNotFound(args.user)
    if action == "show":
        print(json.dumps(user.to_json(), indent=2, ensure_ascii=False))
        return 0
    if action == "mfa":
        return _users_mfa(args.operation, user, directory, args.passkey)
    if action == "groups":
        if args.add or args.remove:
            user = run(directory.change_groups(user.id, args.add, args.remove))
        for group in user.groups:
            print(group)
        return 0
    if user.source == "config":
        raise UserReadOnly(user.username)
    if action in ("disable", "enable"):
        run(directory.set_disabled(user.id, action == "disable"))
        print(f"{action}d {user.username}")
    elif action == "delete":
        run(directory.delete(user.id))
        print(f"deleted {user.username} ({user.id})")
    elif action == "set-password":
        run(directory.set_password(user.id, _read_password(args)))
        print(f"set the password of {user.username}")
    return 0


def _users_mfa(
    operation: str, user: User, directory: UserDirectory, passkey: str | None = None
) -> int:
    from authserver.users import InvalidUser, UserError

    store, run = directory.store, directory.io.run
    if passkey is not None:
        if operation != "reset":
            raise InvalidUser("--passkey goes with reset")
        matches = [p for p in run(store.passkeys, user.id) if p.credential_id.startswith(passkey)]
        if len(passkey) < 8 or len(matches) != 1:
            found = "no passkey" if not matches else f"{len(matches)} passkeys"
            raise UserError(
                f"{found} of {user.username} with an id starting {passkey!r}: give at least "
                "the 8 first characters `users mfa show` prints"
            )
        run(store.remove_passkey, user.id, matches[0].credential_id)
        print(
            f"removed passkey {matches[0].credential_id[:16]} of {user.username}; "
            "its remembered browsers are forgotten too"
        )
        return 0
    if operation == "reset":
        if run(store.reset_mfa, user.id):
            print(
                f"reset the second factor of {user.username}: it enrolls again at its next sign-in"
            )
        else:
            print(f"{user.username} has no second factor")
        return 0
    record = run(store.totp, user.id)
    passkeys = run(store.passkeys, user.id)
    left = run(store.recovery_codes_left, user.id)
    if record is None or record.confirmed_at is None:
        print(f"{user.username}: no authenticator app")
    else:
        print(
            f"{user.username}: authenticator app since {_time(record.confirmed_at)}, "
            f"{left} recovery codes left"
        )
    for passkey in passkeys:
        kind = "synced" if passkey.backup_eligible else "bound to its device"
        used = "never" if passkey.last_used_at is None else _time(passkey.last_used_at)
        print(
            f"{user.username}: passkey {passkey.credential_id[:16]} ({kind}) since "
            f"{_time(passkey.created_at)}, last used {used}"
        )
    if passkeys and (record is None or record.confirmed_at is None):
        print(f"{user.username}: {left} recovery codes left")
    return 0


def _print_users(users: list[User]) -> None:
    rows = [("ID", "USERNAME", "NAME", "EMAIL", "GROUPS", "DISABLED", "SOURCE")]
    for u in users:
        rows.append(
            (
                u.id,
                u.username,
                _cell(u.profile.get("name")),
                _cell(u.profile.get("email")),
                ",".join(u.groups) or "-",
                "yes" if u.disabled else "no",
                u.source,
            )
        )
    _print_table(rows)


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows as columns padded to their widest cell, the header first."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(" ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    return "-" if value in (None, "") else str(value)


def _read_password(args: argparse.Namespace) -> str:
    """One line of standard input (--password-stdin), or asked twice on the terminal
    without echo; checked for length. Never echoed, printed or logged."""
    from authserver.passwords import password_problem

    if args.password_stdin:
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError:
            raise _Refused("password: standard input is not UTF-8", 2) from None
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        if not sys.stdin.isatty():
            raise _Refused(
                "password: standard input is not a terminal to ask on; pass --password-stdin "
                "to read the password from it",
                2,
            )
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise _Refused("password: the two passwords differ", 2)
    problem = password_problem(password)
    if problem is not None:
        raise _Refused(f"password: {problem}", 2)
    return password


def _open_store(config: AuthServerConfig, path: Path, *, create: bool = False) -> SqlStore:
    """The store of ``config``, migrated; a SQLite one is never created here unless
    ``create``. Exit 3 (as _Refused) when it cannot be opened."""
    from authserver.store import StoreMissing, StoreUnavailable
    from authserver.stores import open_store

    where = (
        f"authserver.store: {_redacted(config.store)}"
        if config.store is not None
        else f"authserver.data_dir: {config.data_dir}"
    )
    try:
        store = open_store(config, create=create)
    except StoreMissing:
        raise _Refused(
            f"authserver.data_dir: no store in {config.data_dir} (from {path}); "
            "nothing was created. Start the server once with this config (`tokengate run`), "
            "or pass -c with the config the server runs with",
            UNUSABLE,
        ) from None
    except (OSError, sqlite3.Error, StoreUnavailable) as exc:
        raise _Refused(
            f"{where}: cannot open the store (from {path}): {type(exc).__name__}: {exc}",
            UNUSABLE,
        ) from None
    if store.migration is not None and store.migration.ahead:
        print(f"warning: {_ahead(store)}", file=sys.stderr)
    return store


def _redacted(url: str) -> str:
    from authserver.pg_store import redact

    return redact(url)


def _ahead(store: SqlStore) -> str:
    assert store.migration is not None
    return (
        f"{store} is at schema version {store.migration.version}, newer than this "
        f"release's {store.migration.known}: a newer tokengate migrated it (migrations "
        "only add, so this one still works; upgrade it)"
    )


def _db(args: argparse.Namespace) -> int:
    loaded = _load_authserver(args)
    if loaded is None:
        return 2
    path, config = loaded
    try:
        store = _open_store(config, path, create=True)
    except _Refused as exc:
        print(exc, file=sys.stderr)
        return exc.status
    try:
        result = store.migration
        assert result is not None
        if result.applied:
            applied = ", ".join(str(v) for v in result.applied)
            print(f"{store}: applied migrations {applied}; at schema version {result.version}")
        else:
            print(f"{store}: at schema version {result.version}, nothing to apply")
        return 0
    finally:
        store.close()


def _time(ts: int | None) -> str:
    return "-" if ts is None else rfc3339(ts)


def _secret(args: argparse.Namespace) -> int:
    secret = secrets.token_urlsafe(32)  # 256 bits, 43 URL-safe characters
    print(f"secret: {secret}")
    print(f"secret_hash: sha256:{hashlib.sha256(secret.encode()).hexdigest()}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from tokengate.schema import config_schema

    print(json.dumps(config_schema(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
