"""Stream an allowed request to its upstream and the response back, buffering nothing.

The upstream side is :mod:`gateway.upstream`: one pooled client per process,
keep-alive, no cookies, no redirects, no decompression. Upstream failures are
translated here: refused, reset or invalid -> 502, no progress within the route's
timeout -> 504. When the client goes away mid-stream the upstream exchange is
closed, so its connection is not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

from gateway.errors import Denied, Reason
from gateway.headers import downstream_headers
from gateway.upstream import (
    Origin,
    Response,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
)
from tokengate.asgi import Receive, Scope, Send
from tokengate.httpserver import REFUSED_EXTENSION
from tokengate.jsonlog import EventLimiter, log_event

# Responses longer than this (or of unknown length) are watched for a client
# disconnect while they stream; shorter ones finish on their own.
WATCH_ABOVE = 64 * 1024
REPORT_EVERY = 10.0  # seconds between reports of one origin's failures


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


def body_framing(scope: Scope) -> tuple[bool, bytes | None]:
    """Does the request have a body, and its Content-Length if it declares one
    (``Content-Length: 0`` is passed on as sent: some servers require it)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value.strip()
            if length.isdigit():
                return int(length) > 0, length
            return True, None  # never sent as it came: the body goes chunked
        if name == b"transfer-encoding":
            return True, None
    return False, None


class Forwarder:
    def __init__(self, client: UpstreamClient) -> None:
        self.client = client
        self._reports = EventLimiter(REPORT_EVERY)

    def _report(self, origin: Origin, error: UpstreamError) -> None:
        """Why an upstream failed, on stderr: at most once per ``REPORT_EVERY`` seconds
        per origin, with the number of failures left unreported in between."""
        unreported = self._reports.due(origin)
        if unreported is None:
            return
        log_event(
            "gateway.upstream_failed",
            upstream=f"{origin.scheme}://{origin.host_header.decode()}",
            error=str(error),
            unreported=unreported,
        )

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        origin: Origin,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        stall_timeout: float,
        request_id: bytes,
        exchange: Exchange,
        response_headers: Sequence[tuple[bytes, bytes]] = (),
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
        else:
            exchange.body_done = True
        started = time.perf_counter()
        try:
            upstream = await self.client.request(
                origin,
                scope["method"],
                target,
                headers,
                body=body,
                content_length=length,
                stall_timeout=stall_timeout,
            )
        except ClientGone:  # mid-upload: the client left, or the listener ended the request
            refused = scope.get("extensions", {}).get(REFUSED_EXTENSION)
            exchange.status = refused["status"] if refused and refused["status"] else 499
            return
        except UpstreamError as exc:
            exchange.upstream_seconds = time.perf_counter() - started
            self._report(origin, exc)
            if isinstance(exc, UpstreamTimeout):
                raise Denied(
                    Reason.UPSTREAM_TIMEOUT, "the upstream did not answer in time"
                ) from None
            raise Denied(Reason.UPSTREAM_UNAVAILABLE, "the upstream is unavailable") from None
        try:
            exchange.status = upstream.status
            sent = downstream_headers(upstream.headers, request_id, upstream.status)
            if response_headers:
                sent.extend(response_headers)
            await send({"type": "http.response.start", "status": upstream.status, "headers": sent})
            length = upstream.content_length
            if (
                exchange.body_done
                and not upstream.complete
                and (length is None or length > WATCH_ABOVE)
            ):
                await _until_disconnect(_relay(upstream, send, exchange), receive)
            else:
                await _relay(upstream, send, exchange)
        except ClientGone:
            upstream.close()  # the connection is not reused
            exchange.status = 499
        except UpstreamError as exc:
            upstream.close()
            self._report(origin, exc)
            exchange.reason = (
                Reason.UPSTREAM_TIMEOUT
                if isinstance(exc, UpstreamTimeout)
                else Reason.UPSTREAM_UNAVAILABLE
            )
            raise  # the response has started: only closing the connection says it failed
        finally:
            upstream.release()
            exchange.upstream_seconds = time.perf_counter() - started


async def _relay(upstream: Response, send: Send, exchange: Exchange) -> None:
    while True:
        chunk, last = await upstream.next_chunk()
        exchange.bytes_out += len(chunk)
        if chunk or last:
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        if last:
            return


async def _until_disconnect(relay: Awaitable[None], receive: Receive) -> None:
    """Run ``relay``; if the client disconnects first, cancel it and raise ClientGone."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    relay_task = asyncio.ensure_future(relay)
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
