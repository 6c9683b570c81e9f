"""Shared fixtures: configs, an in-process authorization server, a fake clock."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from authserver.app import AuthServerApp, AuthServices
from tokengate.config import Config, parse_config
from tokengate.jsonlog import AuditLog, LineSink

PUBLIC_URL = "http://auth.test"
ISSUER = f"{PUBLIC_URL}/oauth2/default"
TOKEN_URL = f"{ISSUER}/v1/token"
REPORTING_SECRET = "reporting-secret-0123456789abcdefghijklmnop"
ADMIN_SECRET = "admin-secret-0123456789abcdefghijklmnopqrstu"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "last: run after every other test")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(now if now is not None else time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ec_client_key(kid: str = "billing-1") -> tuple[ec.EllipticCurvePrivateKey, dict[str, str]]:
    """A P-256 key for a private_key_jwt client and its public JWK."""
    from authserver.keys import public_members

    key = ec.generate_private_key(ec.SECP256R1())
    return key, {**public_members(key), "kid": kid, "use": "sig"}


def base_config(data_dir: Path, billing_jwk: dict[str, str] | None = None) -> dict[str, Any]:
    clients: list[dict[str, Any]] = [
        {
            "client_id": "reporting",
            "secret": REPORTING_SECRET,
            "scopes": ["orders:read"],
            "servers": ["default"],
            "claims": {"tenant": "acme", "groups": ["ops", "reporting"]},
        },
        {"client_id": "admin", "secret": ADMIN_SECRET},
    ]
    if billing_jwk is not None:
        clients.append(
            {
                "client_id": "billing",
                "auth_method": "private_key_jwt",
                "jwks": {"keys": [billing_jwk]},
                "scopes": ["orders:write"],
            }
        )
    return {
        "authserver": {
            "listen": "127.0.0.1:0",
            "public_url": PUBLIC_URL,
            "data_dir": str(data_dir),
            "jwks_max_age": "60s",
            "leeway": 30,
            "servers": [
                {
                    "name": "default",
                    "audience": "api://default",
                    "access_token_ttl": "1h",
                    "scopes": ["orders:read", "orders:write"],
                },
                {
                    "name": "partners",
                    "audience": "api://partners",
                    "signing_alg": "ES256",
                    "access_token_ttl": "10m",
                    "scopes": ["partners:read"],
                },
            ],
            "clients": clients,
        },
    }


def config_from(data: dict[str, Any]) -> Config:
    return parse_config(yaml.safe_dump(data), environ={})


class AuthServer:
    """An in-process authorization server and what a test needs to inspect it."""

    def __init__(
        self, services: AuthServices, audit: AuditLog, audit_path: Path, clock: FakeClock
    ) -> None:
        self.services = services
        self.audit = audit
        self.app = AuthServerApp(services)
        self.audit_path = audit_path
        self.clock = clock

    def transport(self) -> httpx.ASGITransport:
        return httpx.ASGITransport(app=self.app, client=("203.0.113.7", 51000))

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport(), base_url=PUBLIC_URL, **kwargs)

    def audit_lines(self) -> list[dict[str, Any]]:
        self.audit.sink.flush()
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


@pytest.fixture
def billing_key() -> tuple[ec.EllipticCurvePrivateKey, dict[str, str]]:
    return ec_client_key()


@pytest.fixture
def make_authserver(
    tmp_path: Path, billing_key: tuple[Any, dict[str, str]]
) -> Iterator[Callable[..., AuthServer]]:
    started: list[AuthServer] = []

    def make(
        mutate: Callable[[dict[str, Any]], None] | None = None,
        *,
        clock: FakeClock | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> AuthServer:
        data = copy.deepcopy(base_config(tmp_path / "data", billing_key[1]))
        if mutate is not None:
            mutate(data)
        config = config_from(data)
        assert config.authserver is not None
        clock = clock or FakeClock()
        audit_path = tmp_path / "audit.log"
        audit = AuditLog(LineSink(str(audit_path)))
        services = AuthServices.build(config.authserver, audit=audit, clock=clock, http=http)
        services.start()
        server = AuthServer(services, audit, audit_path, clock)
        started.append(server)
        return server

    yield make
    for server in started:
        server.services.store.close()
        server.audit.sink.close()


@pytest.fixture
def authserver(make_authserver: Callable[..., AuthServer]) -> AuthServer:
    return make_authserver()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose connections see a fresh, empty schema of their own."""
    from tests.pg import fresh_schema

    yield from fresh_schema()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Opens a store (again and again, on the same data) on each backend in turn: the
    store's shared suite runs on both."""
    if request.param == "sqlite":
        from authserver.sqlite_store import SqliteStore

        yield lambda: SqliteStore(tmp_path)
        return
    from authserver.pg_store import PostgresStore
    from tests.pg import fresh_schema

    schemas = fresh_schema()
    url = next(schemas)
    opened: list[PostgresStore] = []

    def open_pg() -> PostgresStore:
        opened.append(PostgresStore(url, pool_size=2))
        return opened[-1]

    yield open_pg
    for store in opened:
        store.close()
    next(schemas, None)  # drops the schema
