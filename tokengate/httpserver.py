"""The HTTP/1.1 server side of every listener: uvicorn's httptools protocol, bounded.

uvicorn's protocol parses with llhttp (through httptools) but bounds neither the
bytes nor the time of a request head, lets chunked-body trailers join the request
headers, and takes whatever ``Host`` it is given. :class:`GuardedProtocol` keeps
its request/response cycle and adds what a listener facing the network needs:

- **Head size.** Request line and headers (trailers too) may take at most
  ``max_header_bytes``; past it, 431 and close. While a head is incomplete only whole
  lines are handed to the parser, so httptools never concatenates a header piece by
  piece (quadratic in a header that arrives a byte at a time).
- **Head time.** A request head must arrive whole within ``header_timeout`` of the
  connection opening (or of its first byte, on a kept-alive connection): 408 and
  close, or just close when nothing was sent.
- **Body time.** A request body that stalls for ``body_idle_timeout`` (the client's
  own stall, not ours: time while reading is paused for backpressure or a
  ``100 Continue`` is owed does not count) ends the request: 408 if no response has
  started, and close.
- **Send time.** A client that takes no response bytes at all for ``send_timeout``
  while tokengate has some to send (the socket's buffers are full) is disconnected:
  it cannot hold a connection and a response's buffers by never reading.
- **Connections.** Beyond ``max_connections`` open connections, a new one is
  answered 503 at once and closed.
- **One host.** A second ``Host`` is 400; so is an HTTP/1.1 request without one, or
  one whose value is not a host. An absolute-form target's authority replaces
  ``Host`` (RFC 9112 section 3.2.2), so every app sees the host the request names.
- **Trailers** are read and dropped: they never become headers.
- **Bodiless statuses.** A 204 or 304 response goes out with no body and no
  ``Content-Length`` or ``Transfer-Encoding``, whatever the app sent (RFC 9110
  sections 6.4.1, 8.6): bytes after such a head would be read as the next response.
  An app's 1xx head (ASGI has no interim responses) becomes an empty 500.
- **Upgrades** are not served: a body-less ``Upgrade`` request (an ``h2c`` or
  WebSocket probe) is answered as plain HTTP/1.1 and the connection closed after
  it; one that declares a body is 400 (llhttp would leave its body unread).

Every refusal is reported through ``on_refusal(reason)`` with one of
:data:`REFUSAL_REASONS`; none is logged per request (an attacker would choose the
log volume). When a request an app is already serving is ended (a stalled body,
endless trailers), the app sees a disconnect, and the scope's extension
``tokengate.refused`` holds ``{"status": ..., "reason": ...}``: what the client was
answered instead. The extension ``tokengate.abort`` is a function an app calls to
end a response it cannot complete (an upstream that failed mid-body): the client sees
the connection close, and nothing is logged as an application error.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokengate.asgi import json_bytes
from tokengate.limits import Limits

REFUSAL_REASONS = (
    "header_too_large",
    "header_timeout",
    "body_timeout",
    "too_many_connections",
    "bad_request",
    "send_timeout",
)
LINGER = 2.0  # seconds a refused connection's late request bytes are read and dropped
LINGER_BYTES = 1024 * 1024  # and at most this many: then it is closed at once
MAX_PIPELINED = 8  # requests parsed ahead of their turn (after a chunked body only)
REFUSED_EXTENSION = "tokengate.refused"  # scope extension: why the listener ended a request
ABORT_EXTENSION = "tokengate.abort"  # scope extension: end a response that cannot complete

_NOT_CRLF = re.compile(rb"[^\r\n]")
# A host as routes can match it: an IP literal, or DNS labels (letters, digits, '-', '_')
# joined by single dots, with at most one trailing dot; then an optional port. RFC 3986
# allows more in a reg-name (sub-delims, percent-encoding), which no route names and
# which upstreams split differently ("a.example.com,evil").
_LABEL = rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:" + _LABEL + rb"\.)*" + _LABEL + rb"\.?)(?::[0-9]{1,5})?"
)
_REASON_PHRASES = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}


def error_response(status: int, error: str, description: str, *extra: bytes) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, with a JSON error body."""
    body = json_bytes({"error": error, "error_description": description})
    return b"".join(
        [
            b"HTTP/1.1 %d %b\r\n" % (status, _REASON_PHRASES[status]),
            b"content-type: application/json\r\n",
            b"cache-control: no-store\r\n",
            *extra,
            b"connection: close\r\n",
            b"content-length: %d\r\n\r\n" % len(body),
            body,
        ]
    )


BAD_REQUEST = error_response(400, "invalid_request", "the request is not valid HTTP/1.1")
NOT_CHUNKED = error_response(
    501, "invalid_request", "only the chunked transfer coding is supported in requests"
)
TOO_LARGE = error_response(431, "invalid_request", "the request header fields are too large")
HEAD_TIMEOUT = error_response(408, "invalid_request", "the request head took too long")
BODY_TIMEOUT = error_response(408, "invalid_request", "the request body stalled")
TOO_MANY = error_response(
    503, "temporarily_unavailable", "too many connections; try again", b"retry-after: 1\r\n"
)


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the protocol answers."""

    def __init__(self, reason: str, response: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


def _bad(description: str) -> _Refused:
    return _Refused("bad_request", error_response(400, "invalid_request", description))


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits in :class:`~tokengate.limits.Limits`."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: Limits,
        on_refusal: Callable[[str], None] = lambda reason: None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.on_refusal = on_refusal
        self.refused = False  # answered and closing: everything further is dropped
        self.in_head = True  # the parser expects (or is inside) a request head
        self.head_bytes = 0  # bytes of the current head given to the parser
        self.partial = bytearray()  # an unfinished line of a request head, not yet parsed
        self.held: tuple[bytes, int] | None = None  # pipelined bytes waiting their turn
        self.message_started = False  # the parser is inside a request
        self.parsed_head = 0  # request line + header bytes the parser reported
        self.framing = 0  # bytes since the last body byte: chunk framing, trailers
        self.body_in_feed = False
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.send_timer: asyncio.TimerHandle | None = None
        self.body_activity = 0.0
        self.continue_owed = False  # the client waits for a 100 Continue to send its body
        self.upgrade_ignored = False
        self.dropped = 0  # bytes read and dropped after the connection was refused
        self.holding = False  # reading paused: pipelined requests wait for a response
        self.body_left: int | None = None  # body bytes still to come, when the length is known

    # -- connection --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self.refused = True
            self.on_refusal("too_many_connections")
            transport.write(TOO_MANY)
            self._linger()
            return
        super().connection_made(transport)
        self.header_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self.flow is None:  # refused before it was served
            self.parser = None  # type: ignore[assignment]
            return
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self.header_timer, self.body_timer, self.send_timer):
            if timer is not None:
                timer.cancel()
        self.header_timer = self.body_timer = self.send_timer = None

    def _linger(self) -> None:
        """Half-close after the answer, drop what the client still sends, close soon:
        closing at once with unread bytes would reset the connection and could destroy
        the answer before the client reads it."""
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER, transport.close)

    def _refuse(self, reason: str, response: bytes | None) -> None:
        """Answer ``response`` (unless a response has started) and close."""
        self.on_refusal(reason)
        self.refused = True
        self._cancel_timers()
        self.partial = bytearray()  # nothing more is parsed: let go of what waited
        self.held = None
        if self.flow is not None:
            self.flow.resume_reading()  # what still arrives is read and dropped
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            status = int(response[9:12]) if response is not None else None
            refused = {"status": status, "reason": reason}
            cycle.scope.setdefault("extensions", {})[REFUSED_EXTENSION] = refused
            if cycle.response_started:
                response = None  # only closing the connection can say it failed now
            cycle.disconnected = True  # the app sees a disconnect; its answer is dropped
            cycle.message_event.set()
        if response is None:
            self.transport.close()
        else:
            self.transport.write(response)
            self._linger()

    # -- bytes in ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.refused or self.upgrade_ignored:
            self.dropped += len(data)
            if self.dropped > LINGER_BYTES:
                self.transport.abort()
            return
        self._unset_keepalive_if_required()
        if self.held is not None:  # more pipelined bytes while a response is in flight
            held, at = self.held
            self.held = None
            data = held[at:] + data
        self._process(data, 0)

    def _process(self, data: bytes, at: int) -> None:
        """Parse as much of ``data[at:]`` as the current request may take. A request
        head is handed to the parser whole lines at a time, never past its end; the
        next request waits, unparsed, until the response before it is complete (as
        nginx reads pipelined requests): however many requests a client pipelines,
        they cost a bounded buffer, not a queue of parsed requests."""
        end = len(data)
        while at < end and not self.refused and not self.upgrade_ignored:
            if not self.in_head:
                at = self._read_body(data, at)
            elif self.cycle is not None and not self.cycle.response_complete:
                self._hold(data, at)
                return
            elif self.partial:
                self.partial += memoryview(data)[at:]
                if data.find(b"\n", at) < 0:  # the line has not ended yet
                    self._check_head_size()
                    return
                data, at, end = bytes(self.partial), 0, len(self.partial)
                self.partial.clear()
            else:
                at = self._read_head(data, at)

    def _hold(self, data: bytes, at: int) -> None:
        """Keep the bytes of pipelined requests until the response before them is
        complete; past ``max_header_bytes`` of them, stop reading the socket too."""
        self.held = (data, at)
        if len(data) - at > self.limits.max_header_bytes and not self.holding:
            self.holding = True
            self.transport.pause_reading()  # not through flow: receive() would resume it

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self.refused:
            return
        if self.holding:
            self.holding = False
            self.transport.resume_reading()
        if self.held is not None:
            self._unset_keepalive_if_required()  # the next request starts now
            data, at = self.held
            self.held = None
            self._process(data, at)

    def _read_head(self, data: bytes, at: int) -> int:
        """Feed whole lines of a request head, up to its end at most; where to go on."""
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(
                self.limits.header_timeout, self._head_timed_out
            )
        end = len(data)
        if not self.message_started:  # blank lines before a request are skipped, counted
            first = _NOT_CRLF.search(data, at)
            start = first.start() if first is not None else end
            self.head_bytes += start - at
            at = start
            self._check_head_size()
            if at == end:
                return end
        # ``at`` is where a line starts: a blank line there ends the head in progress
        if data.startswith(b"\r\n", at):
            cut, whole = at + 2, True
        else:
            found = data.find(b"\r\n\r\n", at)
            whole = found >= 0
            cut = found + 4 if whole else data.rfind(b"\n", at) + 1
            if cut == 0:  # no line ends here
                self.partial += memoryview(data)[at:]
                self._check_head_size()
                return end
        self.head_bytes += cut - at
        if not self._feed(memoryview(data)[at:cut]):
            return end
        if not self.in_head:  # headers complete: the body follows
            if cut == end:
                self._arm_body_timer()
            return cut
        if not whole:  # inside a head: keep the unfinished line
            self.partial += memoryview(data)[cut:]
            self._check_head_size()
            return end
        return cut  # a body-less request is complete; the next one may follow

    def _check_head_size(self) -> None:
        if self.head_bytes + len(self.partial) > self.limits.max_header_bytes:
            self._refuse("header_too_large", TOO_LARGE)

    def _read_body(self, data: bytes, at: int) -> int:
        """Feed body bytes, not past the body's end when its length is known."""
        stop = len(data)
        if self.body_left is not None:
            stop = min(stop, at + self.body_left)
            self.body_left -= stop - at
        self.body_in_feed = False
        if not self._feed(memoryview(data)[at:stop]):
            return len(data)
        if not self.in_head:
            self._arm_body_timer()
            # What is not body between body bytes is chunk framing, a size line and a
            # CRLF; after the last chunk, trailers. Either may take max_header_bytes.
            self.framing = 0 if self.body_in_feed else self.framing + stop - at
            if self.framing > self.limits.max_header_bytes:
                self._refuse("header_too_large", TOO_LARGE)
        return stop

    def _arm_body_timer(self) -> None:
        if self.body_timer is None:
            cycle = self.cycle
            self.continue_owed = cycle is not None and cycle.waiting_for_100_continue
            self.body_activity = self.loop.time()
            self.body_timer = self.loop.call_later(
                self.limits.body_idle_timeout, self._body_timed_out
            )

    def _feed(self, data: bytes) -> bool:
        """Parse ``data``; False when the connection was refused."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # a body-less Upgrade request, answered as plain HTTP; nothing after it is read
            self.upgrade_ignored = True
            if self.cycle is not None:
                self.cycle.keep_alive = False
            self.flow.pause_reading()
            return False
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.reason, refused.response)
            else:
                self._refuse("bad_request", BAD_REQUEST)
            return False
        return True

    # -- timers ------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        self.header_timer = None
        if not self.in_head or self.refused:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # a pipelined head waits for us
            self.header_timer = self.loop.call_later(
                self.limits.header_timeout, self._head_timed_out
            )
            return
        self._refuse("header_timeout", HEAD_TIMEOUT if self.head_bytes or self.partial else None)

    def _body_timed_out(self) -> None:
        self.body_timer = None
        if self.in_head or self.refused:
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self.body_activity = now  # held up by us, not by the client
        elif self.continue_owed:  # the 100 Continue went out since the last look: from now
            self.continue_owed = False
            self.body_activity = now
        idle_until = self.body_activity + self.limits.body_idle_timeout
        if now < idle_until:
            self.body_timer = self.loop.call_at(idle_until, self._body_timed_out)
            return
        answered = cycle is not None and cycle.response_complete  # nothing more to say
        self._refuse("body_timeout", None if answered else BODY_TIMEOUT)

    def abort_response(self) -> None:
        """End the response in progress unfinished: what was sent is flushed, then the
        connection closes, so the client knows the body is incomplete."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's further sends are dropped
            cycle.message_event.set()
        self.refused = True
        self._cancel_timers()
        self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self.limits.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _send_timed_out(self) -> None:
        self.send_timer = None
        self.on_refusal("send_timeout")
        self.refused = True
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope.setdefault("extensions", {})[REFUSED_EXTENSION] = {
                "status": None,
                "reason": "send_timeout",
            }
        self.transport.abort()  # the buffers it would not take are dropped with it

    # -- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {ABORT_EXTENSION: self.abort_response}
        self.in_head = True
        self.message_started = True
        self.parsed_head = 0

    def on_url(self, url: bytes) -> None:
        self.parsed_head += len(url) + 16  # method, version, spaces, CRLF: at least this
        if self.parsed_head > self.limits.max_header_bytes:
            raise _Refused("header_too_large", TOO_LARGE)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:  # a trailer: framing, never a header
            return
        self.parsed_head += len(name) + len(value) + 4
        if self.parsed_head > self.limits.max_header_bytes:
            raise _Refused("header_too_large", TOO_LARGE)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        self.framing = 0
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        parser = self.parser
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise _bad("only HTTP/1.1 and HTTP/1.0 are served")
        if parser.get_method() == b"CONNECT":
            raise _bad("CONNECT is not served: this is not a forward proxy")
        self._one_host()
        self.body_left = None
        chunked = False
        for name, value in self.headers:
            if name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise _Refused("bad_request", NOT_CHUNKED)
                chunked = True
            elif name == b"content-length":
                self.body_left = int(value)  # llhttp took it as a number, and not with chunked
        if parser.should_upgrade() and (chunked or self.body_left):
            # llhttp would stop at the head and leave the body to be read as a request
            raise _bad("an Upgrade request with a body is not supported")
        if len(self.pipeline) >= MAX_PIPELINED:
            raise _bad("too many pipelined requests")
        super().on_headers_complete()
        cycle = self.cycle  # the new request's: its app has not started yet
        if cycle is not None:
            cycle.send = _bodiless_statuses(cycle.send)  # type: ignore[method-assign]

    def _one_host(self) -> None:
        """Exactly one valid Host, the absolute-form target's authority if there is one."""
        headers = self.headers
        at = [i for i, (name, _) in enumerate(headers) if name == b"host"]
        if len(at) > 1:
            raise _bad("more than one Host header")
        url = self.url
        if url[:1] not in (b"/", b"*"):  # absolute-form (RFC 9112 section 3.2.2)
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _bad("the request target is not a valid URL") from None
            if (parsed.schema or b"").lower() not in (b"http", b"https") or not parsed.host:
                raise _bad("an absolute request target must be an http(s) URL")
            if parsed.userinfo is not None:
                raise _bad("the request target must not carry credentials")
            host = parsed.host
            if b":" in host:
                host = b"[%b]" % host
            if parsed.port is not None:
                host += b":%d" % parsed.port
            if not _HOST.fullmatch(host):
                raise _bad("the request target's host is not a valid host")
            if at:
                headers[at[0]] = (b"host", host)
            else:
                headers.append((b"host", host))
            return
        if not at:
            if self.parser.get_http_version() == "1.1":
                raise _bad("an HTTP/1.1 request needs a Host header")
            return
        host = headers[at[0]][1]
        if host and not _HOST.fullmatch(host):  # empty is allowed (RFC 9110 7.2)
            raise _bad("the Host header is not a valid host")

    def on_body(self, body: bytes) -> None:
        self.body_in_feed = True
        self.body_activity = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head = True
        self.message_started = False
        self.head_bytes = 0
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _unsupported_upgrade_warning(self) -> None:
        pass  # answered as plain HTTP; a warning per request would be the client's to set


BODILESS = frozenset((204, 304))
_EMPTY = ((b"content-length", b"0"),)
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))


def _bodiless_statuses(send: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``send`` for one response that drops framing headers and body bytes after a
    204 or 304 head."""
    bodiless = False

    async def guarded(message: Any) -> None:
        nonlocal bodiless
        if message["type"] == "http.response.start" and message["status"] in BODILESS:
            bodiless = True
            headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() not in _FRAMING]
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.start" and message["status"] < 200:
            # ASGI has no interim responses: a 1xx head with a body after it would be
            # read as an interim answer, then the body as the next response
            bodiless = True
            message = {"type": "http.response.start", "status": 500, "headers": _EMPTY}
        elif bodiless and message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b""}
        await send(message)

    return guarded
