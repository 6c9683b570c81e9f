"""Stream an allowed request to its upstream and the response back, buffering nothing.

One pooled aiohttp ClientSession per process: keep-alive, no cookie jar (one
caller's cookies never reach another), no redirects followed, no decompression,
no default headers added. Upstream failures are translated here: refused or reset
-> 502, slower than the route's timeout -> 504. When the client goes away
mid-stream the upstream response is closed, so its connection is not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gateway.errors import Denied, Reason
from gateway.headers import downstream_headers
from tokengate.asgi import Receive, Scope, Send

# Responses longer than this (or of unknown length) are watched for a client
# disconnect while they stream; shorter ones finish on their own.
WATCH_ABOVE = 64 * 1024


class ClientGone(Exception):
    pass


@dataclass(slots=True)
class Exchange:
    """What the audit line needs to know about one forwarded request."""

    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reason: Reason = Reason.OK
    body_done: bool = False  # the request body has been read to its end
    client_gone: bool = False  # the client disconnected before the exchange finished
    upstream_seconds: float | None = None  # set once the upstream was called


def new_session(limit: int = 1000) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=60, keepalive_timeout=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def body_framing(scope: Scope) -> tuple[bool, bytes | None]:
    """Does the request have a body, and its Content-Length if it declares one."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() != b"0", value
        if name == b"transfer-encoding":
            return True, None
    return False, None


class Forwarder:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        url: URL,
        headers: list[tuple[str, str]],
        limits: aiohttp.ClientTimeout,
        request_id: bytes,
        exchange: Exchange,
    ) -> None:
        async def request_body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    exchange.client_gone = True
                    raise ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    exchange.bytes_in += len(chunk)
                    yield chunk
                if not message.get("more_body", False):
                    exchange.body_done = True
                    return

        body = None
        with_body, length = body_framing(scope)
        if with_body:
            body = request_body()
            if length is not None:
                headers = [*headers, ("Content-Length", length.decode("latin-1"))]
        else:
            exchange.body_done = True
        started = time.perf_counter()
        try:
            upstream = await self.session.request(
                scope["method"],
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=limits,
            )
        except (ClientGone, aiohttp.ClientError, TimeoutError) as exc:
            if exchange.client_gone:  # mid-upload: aiohttp reports it as a send failure
                exchange.status = 499
                return
            exchange.upstream_seconds = time.perf_counter() - started
            if isinstance(exc, TimeoutError):
                raise Denied(
                    Reason.UPSTREAM_TIMEOUT, "the upstream did not answer in time"
                ) from None
            raise Denied(Reason.UPSTREAM_UNAVAILABLE, "the upstream is unavailable") from None
        try:
            exchange.status = upstream.status
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": downstream_headers(upstream.raw_headers, request_id),
                }
            )
            length = upstream.content_length
            if exchange.body_done and (length is None or length > WATCH_ABOVE):
                await _until_disconnect(self._relay(upstream, send, exchange), receive)
            else:
                await self._relay(upstream, send, exchange)
        except ClientGone:
            upstream.close()  # the connection is not reused
            exchange.status = 499
        except TimeoutError:
            upstream.close()
            exchange.reason = Reason.UPSTREAM_TIMEOUT
            raise  # the response has started: only closing the connection says it failed
        except aiohttp.ClientError:
            upstream.close()
            exchange.reason = Reason.UPSTREAM_UNAVAILABLE
            raise
        finally:
            upstream.release()
            exchange.upstream_seconds = time.perf_counter() - started

    @staticmethod
    async def _relay(upstream: aiohttp.ClientResponse, send: Send, exchange: Exchange) -> None:
        length = upstream.content_length
        if length == 0 or upstream.method == "HEAD" or upstream.status in (204, 304):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        async for chunk in upstream.content.iter_any():
            exchange.bytes_out += len(chunk)
            last = length is not None and exchange.bytes_out >= length
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            if last:  # the whole body went out with its last chunk
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(relay: object, receive: Receive) -> None:
    """Run ``relay``; if the client disconnects first, cancel it and raise ClientGone."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    relay_task = asyncio.ensure_future(relay)  # type: ignore[arg-type]
    watch_task = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({relay_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if relay_task in done:
            relay_task.result()
            return
        relay_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay_task
        raise ClientGone
    finally:
        watch_task.cancel()
        relay_task.cancel()
