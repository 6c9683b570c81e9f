"""The ``tokengate`` command line: run, check, keys, secret, schema.

Exit status, every command: 0 done; 1 refused by the state of things (``keys rotate``
while a next key is pending); 2 a problem with the command line, the config or the
environment (``path: problem`` lines on stderr); 3 what the config names cannot be
used (a listen address that cannot be bound, a data dir or store that cannot be
opened or, for ``keys``, is not there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sqlite3
import sys
from pathlib import Path
from typing import Any

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

UNUSABLE = 3  # what the config names cannot be used (as `run`'s STARTUP_FAILURE)
DEFAULT_WORKERS = 1
CONFIG_HELP = f"config file (default: $TOKENGATE_CONFIG, else {DEFAULT_PATH})"
ENVIRONMENT = f"""\
environment:
  TOKENGATE_CONFIG     the config file when -c is not given (default: {DEFAULT_PATH})
  {LOG_LEVEL_ENV}  {"|".join(LEVELS)}: the least important stderr event shown
                       (default: {DEFAULT_LEVEL}); audit lines are never filtered

exit status: 0 done, 1 refused (keys rotate with a next key pending), 2 a problem with
the command line, the config or the environment, 3 what the config names cannot be
used (a busy listen address, a missing or unusable data dir or key store)"""


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
        help="serve this side only, with the admin listener (default: every section)",
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


def _keys(args: argparse.Namespace) -> int:
    from authserver.keys import KeyFiles, KeyManager, RotationPending
    from authserver.store import SqliteStore, StoreMissing

    loaded = _load(args)
    if loaded is None:
        return 2
    path, whole = loaded
    config = whole.authserver
    if config is None:
        print(f"{path}: the config has no authserver section", file=sys.stderr)
        return 2
    servers = config.servers
    only = getattr(args, "server", None)
    if only is not None:
        servers = tuple(s for s in servers if s.name == only)
        if not servers:
            print(f"no authorization server named {only!r} in {path}", file=sys.stderr)
            return 2
    try:
        store = SqliteStore(config.data_dir, create=False)
    except StoreMissing:
        print(
            f"authserver.data_dir: no key store in {config.data_dir} (from {path}); nothing "
            "was created. Start the server once with this config (`tokengate run`), or "
            "pass -c with the config the server runs with",
            file=sys.stderr,
        )
        return UNUSABLE
    except (OSError, sqlite3.Error) as exc:
        print(
            f"authserver.data_dir: cannot open the key store in {config.data_dir} "
            f"(from {path}): {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return UNUSABLE
    manager = KeyManager(
        store, KeyFiles(config.data_dir), jwks_max_age=config.jwks_max_age, leeway=config.leeway
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
