"""HTTP/1.1 to upstreams: pooled keep-alive connections, both bodies streamed.

Responses are parsed by llhttp in its strict mode (through httptools, the parser
uvicorn runs for the gateway's own listener). This module is the client's part of
HTTP/1.1 (RFC 9112) around it:

- One request per connection at a time. A connection goes back to its origin's pool
  only after a complete response to a completely sent request, when neither side
  asked to close, and never after a HEAD request (whose response a non-conforming
  upstream might follow with a body).
- Bytes arriving when no response is expected end the connection, and so do bytes
  waiting unread in the socket when a pooled connection is picked for a request: a
  stray response is never read as the answer to a later request, unless the
  upstream sends it while that later request is already on its way (no HTTP/1.1
  client can tell the two apart then; see the README).
- A pooled connection the upstream closed while idle is dropped on checkout; a
  request that fails on a reused connection before any response byte arrives is
  retried once on a new connection when it is idempotent and has no body
  (RFC 9112 section 9.3.1).
- Interim 1xx responses are skipped. A body with neither Content-Length nor chunked
  framing ends when the upstream closes; any other body cut short is an error.
- ``stall_timeout`` bounds connecting, the wait for the response, and every stall of
  either body that the upstream causes (not the client's own slowness).
- Response bodies are queued up to ``HIGH_WATER`` bytes, then the upstream socket
  stops being read until the client has taken them: memory stays flat whatever the
  body's size. Request bodies wait for the upstream socket to drain the same way.
- Response headers (and trailers, which are dropped) are limited to
  ``MAX_HEADER_BYTES``.

No cookies, no redirects, no decompression, no proxy settings from the environment.
"""

from __future__ import annotations

import asyncio
import collections
import re
import select
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
MAX_HEADER_BYTES = 64 * 1024
HIGH_WATER = 256 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CHUNKED_END = b"0\r\n\r\n"


class UpstreamError(Exception):
    """The upstream failed; ``str()`` says how, for logs."""


class UpstreamUnavailable(UpstreamError):
    """Refused, unreachable, reset, or an invalid response: 502."""


class UpstreamTimeout(UpstreamError):
    """No progress from the upstream within the timeout: 504."""


class _Stale(UpstreamUnavailable):
    """A reused connection failed before any response byte: safe to retry."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream URL's requests go, and the ``Host`` header they carry."""

    scheme: str
    host: str
    port: int
    host_header: bytes

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default = 443 if scheme == "https" else 80
        port = parts.port or default
        name = host.encode("idna") if not host.isascii() else host.encode("ascii")
        if b":" in name:
            name = b"[%b]" % name  # IPv6
        return cls(scheme, host, port, name if port == default else b"%b:%d" % (name, port))


def request_head(
    method: str,
    target: bytes,
    host: bytes,
    headers: list[tuple[bytes, bytes]],
    framing: bytes,
) -> bytes:
    """The request line and header block; ``framing`` is a Content-Length or
    Transfer-Encoding header line, or empty."""
    if not _TOKEN.fullmatch(method):
        raise UpstreamUnavailable(f"not a valid method: {method!r}")
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (framing, b"\r\n")
    return b"".join(parts)


class Response:
    """One upstream response: status and headers at once, the body as it arrives.

    End it with :meth:`release` (its connection may be reused) or :meth:`close`
    (its connection is dropped).
    """

    __slots__ = (
        "_chunks",
        "_conn",
        "_error",
        "_waiter",
        "complete",
        "content_length",
        "headers",
        "status",
        "until_close",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.until_close = False  # the body ends when the upstream closes
        self.complete = False  # every byte of the response has arrived
        self._chunks: collections.deque[bytes] = collections.deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def next_chunk(self) -> tuple[bytes, bool]:
        """The body bytes received so far (waiting for some if none), and whether they
        end the body. ``(b"", True)`` once it has ended."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                if self._conn is not None:
                    self._conn.taken()
                return data, self.complete
            if self._error is not None:
                raise self._error
            if self.complete:
                return b"", True
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def release(self) -> None:
        """Done with the response: its connection returns to the pool if it can."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish(reusable=self.complete and self._error is None)

    def close(self) -> None:
        """Done with the response, unfinished: its connection is closed, not reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish(reusable=False)

    # -- fed by the connection ---------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def _end(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One upstream connection; parses its responses and moves its bodies."""

    def __init__(self, pool: UpstreamClient, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.poller: select.poll | None = None  # is anything unread in the socket?
        self.parser = HttpResponseParser(self)
        self.lost = False
        self.used = False  # has carried a request before this one
        self.idle_since = 0.0
        # the exchange in progress
        self.response: Response | None = None
        self.headers_ready: asyncio.Future[Response] | None = None
        self.head_request = False
        self.interim = False  # parsing a 1xx response
        self.got_bytes = False
        self.header_bytes = 0  # in header lines parsed, trailers included
        self.head_bytes = 0  # received before the headers were complete
        self.request_sent = False
        self.keep_alive = False
        self.timeout = 0.0
        self.activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.queued = 0
        self.reading_paused = False
        self.waiting_on_client = False
        self.writing_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.pump: asyncio.Task[None] | None = None

    # -- one exchange ------------------------------------------------------------

    async def exchange(
        self,
        head: bytes,
        *,
        head_request: bool,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        stall_timeout: float,
    ) -> Response:
        assert self.transport is not None and self.response is None
        self.response = Response(self)
        self.headers_ready = self.loop.create_future()
        self.head_request = head_request
        self.interim = self.got_bytes = self.request_sent = self.keep_alive = False
        self.header_bytes = self.head_bytes = self.queued = 0
        self.timeout = stall_timeout
        self.activity = self.loop.time()
        self.timer = self.loop.call_at(self.activity + stall_timeout, self._on_timer)
        self.transport.write(head)
        if body is None:
            self.request_sent = True
        else:
            self.pump = self.loop.create_task(self._send_body(body, chunked))
        try:
            return await self.headers_ready
        except BaseException:
            self.finish(reusable=False)
            raise

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        assert self.transport is not None
        try:
            while True:
                self.waiting_on_client = True
                try:
                    chunk = await anext(body)
                except StopAsyncIteration:
                    break
                finally:
                    self.waiting_on_client = False
                self.activity = self.loop.time()
                if not chunk:
                    continue  # an empty chunk would end a chunked body
                self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if self.writing_paused:
                    await self._drain()
            if chunked:
                self._write(_CHUNKED_END)
            self.request_sent = True
        except UpstreamError:
            pass  # the connection failed; the response says so
        except Exception as exc:  # the client's side of the body failed: so does the exchange
            self._fail(exc)
            self._abort()

    def _write(self, data: bytes) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise UpstreamUnavailable("the connection to the upstream is closed")
        self.transport.write(data)

    async def _drain(self) -> None:
        self.drained = self.loop.create_future()
        try:
            await self.drained
        finally:
            self.drained = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.response is None or self.lost:
            return
        now = self.loop.time()
        if self.reading_paused or self.waiting_on_client:
            self.activity = now  # held up by our client, not by the upstream
        if now - self.activity >= self.timeout:
            self._fail(UpstreamTimeout(f"no progress from the upstream in {self.timeout:g} s"))
            self._abort()
            return
        self.timer = self.loop.call_at(self.activity + self.timeout, self._on_timer)

    def taken(self) -> None:
        """The reader took every queued byte: read from the upstream again."""
        self.queued = 0
        if self.reading_paused and self.transport is not None and not self.lost:
            self.reading_paused = False
            self.activity = self.loop.time()
            self.transport.resume_reading()

    def finish(self, *, reusable: bool) -> None:
        """End the exchange; back to the pool, or closed."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
            reusable = False
        self.pump = None
        reusable = (
            reusable
            and self.request_sent
            and self.keep_alive
            and not self.head_request
            and not self.lost
        )
        self.response = self.headers_ready = None
        self.used = True
        if reusable:
            self.pool.checkin(self)
        else:
            self.close()

    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def quiet(self) -> bool:
        """Nothing waits unread in the socket: no stray bytes, no close from the
        upstream that the event loop has not delivered yet."""
        return self.poller is None or not self.poller.poll(0)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: BaseException) -> None:
        ready = self.headers_ready
        if ready is not None and not ready.done():
            ready.set_exception(error)
        elif self.response is not None:
            self.response._fail(error)

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing was asked: never read it as an answer
            self.close()
            return
        self.activity = self.loop.time()
        try:
            self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            cause = exc.__context__
            reason = str(cause) if isinstance(cause, UpstreamError) else f"invalid response: {exc}"
            self._fail(UpstreamUnavailable(reason))
            self._abort()
            return
        ready = self.headers_ready
        if ready is not None and not ready.done():
            # the parser holds a header until it ends: bound what waits for the headers
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEADER_BYTES:
                self._fail(UpstreamUnavailable("the response headers are too large"))
                self._abort()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.drained is not None and not self.drained.done():
            self.drained.set_exception(UpstreamUnavailable("the upstream closed the connection"))
        response = self.response
        if response is None or response.complete:
            return
        ready = self.headers_ready
        if ready is not None and not ready.done():
            if self.used and not self.got_bytes:
                self._fail(_Stale("a reused connection was closed by the upstream"))
            else:
                self._fail(UpstreamUnavailable(f"the upstream closed the connection ({exc})"))
        elif response.until_close:
            self.keep_alive = False
            response._end()
        else:
            response._fail(UpstreamUnavailable("the upstream closed the connection mid-body"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.activity = self.loop.time()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # -- llhttp callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.got_bytes = True
        if self.response is None or self.headers_ready is None or self.headers_ready.done():
            raise UpstreamUnavailable("a response nobody asked for")
        self.header_bytes = 0
        self.response.headers = []

    def on_status(self, status: bytes) -> None:
        self.header_bytes += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > MAX_HEADER_BYTES:
            raise UpstreamUnavailable("the response headers are too large")
        assert self.response is not None and self.headers_ready is not None
        if not self.headers_ready.done():  # after them come trailers, which are dropped
            self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None and self.headers_ready is not None
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:  # llhttp takes any three digits; no client would
            raise UpstreamUnavailable(f"not an HTTP status: {status}")
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamUnavailable("the upstream switched protocols unasked")
            self.interim = True  # 103 Early Hints and the like: the answer follows
            return
        response.status = status
        chunked = False
        for name, value in response.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                response.content_length = int(value)
            elif lowered == b"transfer-encoding":
                chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        if self.head_request or status in (204, 304):
            response.content_length = 0
        elif response.content_length is None and not chunked:
            response.until_close = True
        self.headers_ready.set_result(response)
        if self.head_request:  # no body follows; llhttp cannot be told, so stop here
            self.keep_alive = False
            response._end()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is None or response.complete:
            raise UpstreamUnavailable("a body where none belongs")
        response._feed(body)
        self.queued += len(body)
        if self.queued >= HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        response = self.response
        if response is None or response.complete:
            return
        self.keep_alive = self.parser.should_keep_alive()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        response._end()


class UpstreamClient:
    """Connections to every upstream origin, pooled; one client per process."""

    def __init__(
        self,
        *,
        idle_timeout: float = 15.0,
        max_idle: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle  # per origin
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def request(
        self,
        origin: Origin,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        body: AsyncIterator[bytes] | None = None,
        content_length: bytes | None = None,
        stall_timeout: float,
    ) -> Response:
        """Send a request and wait for its response's status and headers.

        ``body`` streams the request body: with ``content_length`` as given, else
        chunked. A body-less request may still declare ``content_length`` (``b"0"``).
        Raises :class:`UpstreamUnavailable` or :class:`UpstreamTimeout`, or whatever
        ``body`` raised.
        """
        if content_length is not None:
            framing = b"content-length: %b\r\n" % content_length
        elif body is not None:
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b""
        head = request_head(method, target, origin.host_header, headers, framing)
        conn = self._pooled(origin)
        retry = body is None and method in IDEMPOTENT
        while True:
            if conn is None:
                conn = await self._connect(origin, stall_timeout)
            try:
                return await conn.exchange(
                    head,
                    head_request=method == "HEAD",
                    body=body,
                    chunked=content_length is None,
                    stall_timeout=stall_timeout,
                )
            except _Stale:
                if not retry:
                    raise
                retry = False
                conn = None  # once more, on a new connection

    async def _connect(self, origin: Origin, connect_timeout: float) -> _Connection:
        conn = _Connection(self, origin)
        tls = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            async with asyncio.timeout(connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting took longer than {connect_timeout:g} s") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS
            raise UpstreamUnavailable(f"cannot connect: {exc}") from None
        return conn

    def _pooled(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.usable() and now - conn.idle_since < self.idle_timeout and conn.quiet():
                return conn
            conn.close()
        return None

    def checkin(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if self.closed or len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than ``idle_timeout``."""
        self._sweeper = None
        now = self.loop.time()
        for origin, idle in list(self._idle.items()):
            keep = [c for c in idle if c.usable() and now - c.idle_since < self.idle_timeout]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]
        if self._idle and not self.closed:
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def close(self) -> None:
        """Close every idle connection; requests in flight finish on their own."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
