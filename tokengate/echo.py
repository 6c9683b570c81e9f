"""A built-in echo upstream, for the demo and for trying routes.

Answers every request with JSON describing what it received: method, path, query,
headers (including the ``X-Auth-*`` identity a gateway adds) and the body's size and
SHA-256 (read as a stream, never held). Query parameters change the answer:

- ``status=N``: answer with status N, 200-599 (204 and 304 without a body, as HTTP
  requires)
- ``delay=S``: wait S seconds before answering
- ``bytes=N``: send N bytes (``Content-Length`` set), streamed in 64 KiB chunks;
  with ``fail_after=M``, drop the connection after M of them (a broken upstream)
- ``chunks=N&interval=S``: send N lines, S seconds apart, chunked
- ``events=N&interval=S``: the same as server-sent events
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

from tokengate.asgi import Receive, Scope, Send, json_bytes, stateless_lifespan
from tokengate.jsonlog import log_event

CHUNK = 64 * 1024
MAX_BYTES = 4 * 1024**3


def _number(query: dict[str, list[str]], name: str, default: float, limit: float) -> float:
    try:
        return min(max(float(query[name][0]), 0.0), limit)
    except (KeyError, ValueError, IndexError):
        return default


class UpstreamFailure(Exception):
    """Raised on purpose: the server closes the connection mid-body."""


class EchoApp:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await stateless_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        digest = hashlib.sha256()
        size = 0
        while True:  # read the body as it arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            digest.update(chunk)
            if not message.get("more_body", False):
                break
        await asyncio.sleep(_number(query, "delay", 0, 3600))
        status = int(_number(query, "status", 200, 599))
        if status < 200:  # an interim (1xx) status is not an answer
            status = 200
        if status in (204, 304):  # no body, so no framing headers either
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if "bytes" in query:
            count = int(_number(query, "bytes", 0, MAX_BYTES))
            fail_after = int(_number(query, "fail_after", count + 1, MAX_BYTES))
            await self._bytes(send, status, count, fail_after)
            return
        for kind in ("chunks", "events"):
            if kind in query:
                count = int(_number(query, kind, 1, 100000))
                interval = _number(query, "interval", 0.1, 60)
                await self._stream(scope, receive, send, status, kind, count, interval)
                return
        body = json_bytes(
            {
                "method": scope["method"],
                "path": scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
                "query": scope.get("query_string", b"").decode("latin-1"),
                "headers": {
                    name.decode("latin-1"): value.decode("latin-1")
                    for name, value in scope["headers"]
                },
                "body_bytes": size,
                "body_sha256": digest.hexdigest(),
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _bytes(send: Send, status: int, count: int, fail_after: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(count).encode()),
                ],
            }
        )
        block = b"x" * CHUNK
        remaining = count
        while remaining > 0:
            if count - remaining >= fail_after:
                raise UpstreamFailure(f"dropping the connection after {fail_after} bytes")
            piece = block if remaining >= CHUNK else block[:remaining]
            remaining -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": remaining > 0})
        if count == 0:
            await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _stream(
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        kind: str,
        count: int,
        interval: float,
    ) -> None:
        content_type = b"text/event-stream" if kind == "events" else b"text/plain"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), (b"cache-control", b"no-cache")],
            }
        )

        async def lines() -> AsyncIterator[bytes]:
            for i in range(count):
                if i:
                    await asyncio.sleep(interval)
                payload = json.dumps({"n": i}).encode()
                yield b"data: " + payload + b"\n\n" if kind == "events" else payload + b"\n"

        async def relay() -> None:
            async for line in lines():
                await send({"type": "http.response.body", "body": line, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        relay_task = asyncio.ensure_future(relay())
        watch_task = asyncio.ensure_future(disconnected())
        done, _ = await asyncio.wait({relay_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in (relay_task, watch_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if relay_task not in done or relay_task.cancelled():
            log_event("echo.stream_cancelled", path=scope["path"])
