"""The ``tokengate`` command line: run, check, keys, secret."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from tokengate.config import Config, default_path, load_config
from tokengate.yamlconf import ConfigErrors


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokengate",
        description="API gateway with an embedded OAuth 2.0 authorization server.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "config file (default: $TOKENGATE_CONFIG, else config/tokengate.yaml)"

    run = sub.add_parser("run", help="serve every section of the config")
    run.add_argument("-c", "--config", type=Path, help=config_help)
    run.add_argument("--workers", type=_positive, default=1, help="worker processes")
    run.add_argument("--only", choices=("gateway", "authserver"), help="serve one side only")
    run.set_defaults(func=_run)

    check = sub.add_parser("check", help="validate the config; exit 2 listing every problem")
    check.add_argument("-c", "--config", type=Path, help=config_help)
    check.set_defaults(func=_check)

    keys = sub.add_parser("keys", help="list or rotate signing keys")
    keys.add_argument("action", choices=("list", "rotate"))
    keys.add_argument("-c", "--config", type=Path, help=config_help)
    keys.add_argument("--server", help="one authorization server (default: all)")
    keys.set_defaults(func=_keys)

    secret = sub.add_parser("secret", help="print a new client secret and its hash")
    secret.set_defaults(func=_secret)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _load(args: argparse.Namespace, *, to_serve: bool = False) -> tuple[Path, Config] | None:
    """The config, or None once its problems are on stderr. ``to_serve``: also refuse
    what ``run`` could not start with (an audit file it cannot open)."""
    path = args.config or default_path()
    try:
        return path, load_config(path, check_files=to_serve)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    from tokengate.serve import run

    loaded = _load(args, to_serve=True)
    if loaded is None:
        return 2
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
    from authserver.store import SqliteStore

    loaded = _load(args)
    if loaded is None:
        return 2
    config = loaded[1].authserver
    if config is None:
        print("the config has no authserver section", file=sys.stderr)
        return 2
    servers = config.servers
    if args.server is not None:
        servers = tuple(s for s in servers if s.name == args.server)
        if not servers:
            print(f"no authorization server named {args.server!r}", file=sys.stderr)
            return 2
    store = SqliteStore(config.data_dir)
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
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _secret(args: argparse.Namespace) -> int:
    secret = secrets.token_urlsafe(32)  # 256 bits, 43 URL-safe characters
    print(f"secret: {secret}")
    print(f"secret_hash: sha256:{hashlib.sha256(secret.encode()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
