"""An in-process gateway in front of a real loopback upstream, trusting an in-process
authorization server (JWKS over httpx's ASGITransport)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.app import GatewayApp
from tests.conftest import ADMIN_SECRET, ISSUER, REPORTING_SECRET, AuthServer, config_from
from tokengate.asgi import Receive, Scope, Send
from tokengate.echo import EchoApp
from tokengate.jsonlog import AuditLog, LineSink
from tokengate.serve import QuietServer

PARTNERS = "http://auth.test/oauth2/partners"


class RecordingUpstream:
    """The echo upstream, remembering every request that reached it."""

    def __init__(self) -> None:
        self.echo = EchoApp()
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope.get("raw_path") or b""))
        await self.echo(scope, receive, send)


async def serve_on_loopback(app: Any) -> tuple[QuietServer, asyncio.Task[None], int]:
    server = QuietServer(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[RecordingUpstream, str]]:
    app = RecordingUpstream()
    server, task, port = await serve_on_loopback(app)
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


def gateway_section(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "issuers": [
            {
                "issuer": ISSUER,
                "audiences": ["api://default"],
                "algorithms": ["RS256", "ES256"],
                "jwks_cache_min": "30s",
            },
            {"issuer": PARTNERS, "audiences": ["api://partners"], "algorithms": ["ES256"]},
        ],
        "routes": [
            {
                "name": "orders-read",
                "match": {"path": "/orders/**", "methods": ["GET", "HEAD"]},
                "upstream": upstream_url,
                "require": {"scopes": ["orders:read"], "claims": {"tenant": "acme"}},
            },
            {
                "name": "orders-write",
                "match": {"path": "/orders/**", "methods": ["POST", "PUT"]},
                "upstream": upstream_url,
                "timeout": "1s",
                "require": {"scopes": ["orders:write"]},
            },
            {
                "name": "admin",
                "match": {"path": "/admin/**"},
                "upstream": upstream_url,
                "require": {"scopes": ["admin"]},
            },
            {
                "name": "partners",
                "match": {"path": "/partners/**"},
                "upstream": upstream_url,
                "strip_prefix": "/partners",
                "forward_token": True,
                "require": {"issuer": PARTNERS},
            },
            {
                "name": "public",
                "match": {"path": "/public/**"},
                "upstream": upstream_url,
                "public": True,
            },
            {
                "name": "dead",
                "match": {"path": "/dead/**"},
                "upstream": "http://127.0.0.1:9",
                "public": True,
            },
        ],
        **extra,
    }


class Gateway:
    def __init__(self, app: GatewayApp, authserver: AuthServer, audit_path: Path) -> None:
        self.app = app
        self.authserver = authserver
        self.audit_path = audit_path

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=("198.51.100.9", 4321))
        return httpx.AsyncClient(transport=transport, base_url="http://api.test")

    async def token(self, client: str = "reporting", issuer: str = ISSUER) -> str:
        secret = {"reporting": REPORTING_SECRET, "admin": ADMIN_SECRET}[client]
        async with self.authserver.client() as http:
            response = await http.post(
                f"{issuer}/v1/token",
                data={"grant_type": "client_credentials"},
                auth=(client, secret),
            )
        assert response.status_code == 200, response.text
        return response.json()["access_token"]  # type: ignore[no-any-return]

    def sign(self, claims: dict[str, Any], *, server: str = "default", **header: Any) -> str:
        """A token signed by the authorization server's real key, with any claims/header."""
        key = self.authserver.services.keyring.current(server).signer
        now = int(time.time())
        body = {
            "iss": ISSUER if server == "default" else PARTNERS,
            "sub": "reporting",
            "aud": "api://default",
            "iat": now,
            "exp": now + 300,
            "jti": "crafted",
            "client_id": "reporting",
            "scope": "orders:read",
            "tenant": "acme",
            **claims,
        }
        head = {"alg": key.alg, "kid": key.kid, "typ": "at+jwt", **header}
        head = {k: v for k, v in head.items() if v is not None}
        body = {k: v for k, v in body.items() if v is not None}
        signing_input = f"{_b64(head)}.{_b64(body)}".encode()
        from jwt.algorithms import get_default_algorithms

        signature = get_default_algorithms()[key.alg].sign(signing_input, key.private_key)
        return (
            signing_input.decode() + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
        )

    def audit_lines(self) -> list[dict[str, Any]]:
        self.app.audit.sink.flush()
        if not self.audit_path.exists():
            return []
        return [json.loads(x) for x in self.audit_path.read_text().splitlines()]

    async def raw(
        self,
        method: str,
        raw_path: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        query: bytes = b"",
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """Call the ASGI app with a raw path no client library would normalize."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": raw_path.decode("latin-1"),
            "raw_path": raw_path,
            "query_string": query,
            "headers": [(b"host", b"api.test"), *(headers or [])],
            "client": ("198.51.100.9", 4321),
            "server": ("127.0.0.1", 8080),
        }
        sent: list[dict[str, Any]] = []
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = sent[0]
        body = b"".join(m.get("body", b"") for m in sent[1:])
        return start["status"], dict(start["headers"]), body


def _b64(document: dict[str, Any]) -> str:
    raw = json.dumps(document, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture
async def make_gateway(
    make_authserver: Callable[..., AuthServer],
    upstream: tuple[RecordingUpstream, str],
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    started: list[GatewayApp] = []

    async def make(**extra: Any) -> Gateway:
        authserver = make_authserver()
        config = config_from({"gateway": gateway_section(upstream[1], **extra)})
        assert config.gateway is not None
        audit_path = tmp_path / "gateway-audit.log"
        app = GatewayApp(
            config.gateway,
            audit=AuditLog(LineSink(str(audit_path))),
            http=httpx.AsyncClient(transport=authserver.transport()),
        )
        await app.startup()
        started.append(app)
        return Gateway(app, authserver, audit_path)

    yield make
    for app in started:
        await app.shutdown()
        app.audit.sink.close()
