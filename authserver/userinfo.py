"""``{issuer}/v1/userinfo`` (OIDC Core 5.3): who the bearer of an access token is.

The token must be one of this server's access tokens, live, not revoked, granted
``openid``, and its user must still be allowed in; the answer is ``sub`` plus the
claims of the granted scopes. Errors are RFC 6750 section 3: a ``WWW-Authenticate:
Bearer`` challenge (with ``error`` once a token was presented), never a page.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from authserver.config import ClientConfig, ServerConfig
from authserver.errors import NO_STORE, OAuthError, send_error
from authserver.forms import read_form
from authserver.oidc import userinfo_claims
from authserver.usergrants import may_use
from authserver.users import UserDirectory
from tokengate.asgi import (
    JSON_TYPE,
    Receive,
    Scope,
    Send,
    header,
    header_count,
    json_bytes,
    send_bytes,
)

Verify = Callable[[ServerConfig, str], Awaitable[tuple[dict[str, Any] | None, str]]]
FORM_TYPE = b"application/x-www-form-urlencoded"


class BearerError(Exception):
    """An RFC 6750 error: status, and ``error`` for the challenge (None: no token)."""

    def __init__(self, status: int, error: str | None, description: str = "") -> None:
        super().__init__(error or "no token")
        self.status = status
        self.error = error
        self.description = description


class UserInfo:
    def __init__(
        self,
        *,
        verify: Verify,
        users: UserDirectory,
        clients: Mapping[str, ClientConfig],
        max_body_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.verify = verify  # access tokens of a server: (claims, reason)
        self.users = users
        self.clients = clients
        self.max_body_bytes = max_body_bytes
        self.clock = clock

    async def __call__(
        self, server: ServerConfig, scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            body = await self._claims(server, scope, receive)
        except BearerError as exc:
            await _challenge(send, server, exc)
            return
        except OAuthError as exc:  # the store is unavailable: 503, retry
            await send_error(send, exc)
            return
        await send_bytes(send, 200, json_bytes(body), [JSON_TYPE, *NO_STORE])

    async def _claims(self, server: ServerConfig, scope: Scope, receive: Receive) -> dict[str, Any]:
        if scope["method"] not in ("GET", "POST"):
            raise BearerError(405, "invalid_request", "use GET or POST")
        token = await self._token(scope, receive)
        claims, _ = await self.verify(server, token)
        if claims is None or claims.get("token_type") != "Bearer" or "auth_time" not in claims:
            raise BearerError(401, "invalid_token", "the access token is invalid or expired")
        scopes = tuple(str(claims.get("scope", "")).split())
        if "openid" not in scopes:
            raise BearerError(403, "insufficient_scope", "the access token lacks openid")
        user = await self.users.get(str(claims["sub"]))
        client = self.clients.get(str(claims.get("client_id")))
        if client is None or not may_use(client, user):
            raise BearerError(401, "invalid_token", "the user may no longer sign in")
        assert user is not None
        return userinfo_claims(server, user, scopes)

    async def _token(self, scope: Scope, receive: Receive) -> str:
        """RFC 6750 2.1 (Authorization header) or 2.2 (form body); not both, once."""
        if header_count(scope, b"authorization") > 1:
            raise BearerError(400, "invalid_request", "more than one Authorization header")
        in_body: str | None = None
        content_type = (header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if scope["method"] == "POST" and content_type == FORM_TYPE:
            try:
                form = await read_form(scope, receive, self.max_body_bytes)
            except OAuthError as exc:
                raise BearerError(400, "invalid_request", exc.description) from None
            in_body = form.get("access_token")
        authorization = header(scope, b"authorization")
        if authorization is not None:
            if in_body is not None:
                raise BearerError(400, "invalid_request", "the token was sent twice")
            scheme, _, value = authorization.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise BearerError(401, None)
            return value.strip()
        if in_body is None:
            raise BearerError(401, None)
        return in_body


async def _challenge(send: Send, server: ServerConfig, exc: BearerError) -> None:
    challenge = f'Bearer realm="{server.issuer}"'
    if exc.error is not None:
        challenge += f', error="{exc.error}"'
        if exc.description:
            challenge += f', error_description="{exc.description}"'
        if exc.error == "insufficient_scope":
            challenge += ', scope="openid"'
    headers = [JSON_TYPE, *NO_STORE, (b"www-authenticate", challenge.encode())]
    if exc.status == 405:
        headers.append((b"allow", b"GET, POST"))
    body: dict[str, str] = {}
    if exc.error is not None:
        body = {"error": exc.error, "error_description": exc.description}
    await send_bytes(send, exc.status, json_bytes(body), headers)
