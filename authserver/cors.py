"""CORS (the Fetch standard) for the endpoints a browser app calls directly: token,
userinfo, revoke, keys and the discovery documents.

Only origins some client of the server lists in ``allowed_origins`` get an
``Access-Control-Allow-Origin``, echoed exactly, never ``*``, never with credentials
(these endpoints take no cookies). A preflight from such an origin answers 204; from
any other, the request goes on without CORS headers and the browser refuses it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from authserver.config import ClientConfig, ServerConfig
from tokengate.asgi import Message, Receive, Scope, Send, header

Handler = Callable[[ServerConfig, Scope, Receive, Send], Awaitable[None]]
PREFLIGHT_MAX_AGE = b"600"
ALLOWED_HEADERS = b"authorization, content-type"
ALLOWED_METHODS = b"GET, POST"


def server_origins(server: ServerConfig, clients: Iterable[ClientConfig]) -> frozenset[str]:
    """The origins allowed to call ``server``: those of its clients."""
    return frozenset(o for c in clients if server.name in c.servers for o in c.allowed_origins)


def with_cors(handler: Handler, origins: frozenset[str]) -> Handler:
    """``handler`` answering CORS for ``origins``; unchanged when there are none."""
    if not origins:
        return handler

    async def cors(server: ServerConfig, scope: Scope, receive: Receive, send: Send) -> None:
        raw = header(scope, b"origin")
        origin = raw.decode("latin-1") if raw is not None else None
        allowed = origin is not None and origin in origins
        if (
            allowed
            and scope["method"] == "OPTIONS"
            and header(scope, b"access-control-request-method") is not None
        ):
            assert raw is not None
            headers = [
                (b"access-control-allow-origin", raw),
                (b"access-control-allow-methods", ALLOWED_METHODS),
                (b"access-control-allow-headers", ALLOWED_HEADERS),
                (b"access-control-max-age", PREFLIGHT_MAX_AGE),
                (b"vary", b"Origin"),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"vary", b"Origin")]
                if allowed:
                    assert raw is not None
                    extra.append((b"access-control-allow-origin", raw))
                    extra.append((b"access-control-expose-headers", b"www-authenticate"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await handler(server, scope, receive, send_with_cors)

    return cors
