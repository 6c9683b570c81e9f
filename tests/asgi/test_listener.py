"""The listener protocol (tokengate.httpserver) over real loopback sockets: head size
and time, body stalls, the connection cap, one Host, trailers and upgrades."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn

from tokengate.asgi import Receive, Scope, Send, json_bytes, send_bytes
from tokengate.httpserver import REFUSED_EXTENSION, GuardedProtocol
from tokengate.limits import Limits
from tokengate.serve import QuietServer

pytestmark = pytest.mark.anyio

FAST = Limits(
    max_header_bytes=8192,
    header_timeout=0.5,
    body_idle_timeout=0.5,
    max_connections=8,
    send_timeout=0.5,
)


@dataclass
class Seen:
    """What the app saw of each request."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: list[dict[str, Any]] = field(default_factory=list)
    receive_delay: float = 0.0
    gate: asyncio.Event | None = None  # when set, requests wait for it before answering


def echo_app(seen: Seen) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/big":  # 64 MiB, for a client that does not read
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(1024):
                await send({"type": "http.response.body", "body": b"b" * 65536, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"].startswith("/framed/"):  # a status with a body, right or wrong
            status = int(scope["path"].rsplit("/", 1)[1])
            await send_bytes(send, status, b"a body", [(b"Content-Length", b"6")])
            return
        if scope["path"] == "/early":  # answered before the body is read
            await send_bytes(send, 200, b"early")
            return
        if seen.gate is not None:
            await seen.gate.wait()
        await asyncio.sleep(seen.receive_delay)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen.disconnects.append(dict(scope))
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        record = {
            "path": scope["path"],
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
            "body": body.decode("latin-1"),
        }
        seen.requests.append(record)
        await send_bytes(send, 200, json_bytes(record), [(b"content-type", b"application/json")])

    return app


@dataclass
class Listening:
    port: int
    refusals: list[str]
    seen: Seen
    server: QuietServer

    def protocols(self) -> list[GuardedProtocol]:
        return list(self.server.server_state.connections)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def listening(limits: Limits = FAST) -> AsyncIterator[Listening]:
    seen = Seen()
    refusals: list[str] = []
    config = uvicorn.Config(
        echo_app(seen),
        http=functools.partial(GuardedProtocol, limits=limits, on_refusal=refusals.append),  # type: ignore[arg-type]
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_keep_alive=30,
    )
    server = QuietServer(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    try:
        yield Listening(sock.getsockname()[1], refusals, seen, server)
    finally:
        server.should_exit = True
        await task
        sock.close()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection (within 5 s)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    return b"".join(chunks)


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await connect(port)
    writer.write(raw)
    await writer.drain()
    try:
        return await read_all(reader)
    finally:
        writer.close()


async def one_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if x)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> Any:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


# --------------------------------------------------------------------------- head size


async def test_a_head_within_the_limit_is_served() -> None:
    async with listening() as at:
        value = "v" * 7000
        response = await exchange(
            at.port,
            f"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {value}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status_of(response) == 200
        assert ["x-big", value] in body_of(response)["headers"]
        assert at.refusals == []


async def test_a_header_line_that_never_ends_is_cut_off_at_the_limit() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Flood: ")
        sent = 0
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 1 MiB offered; the server stops long before
                writer.write(b"a" * 16384)
                await writer.drain()
                sent += 16384
        response = await read_all(reader)
        writer.close()
        assert status_of(response) == 431
        assert body_of(response) == {
            "error": "invalid_request",
            "error_description": "the request header fields are too large",
        }
        assert b"connection: close" in response
        assert at.refusals == ["header_too_large"]
        assert at.seen.requests == []


async def test_a_whole_head_over_the_limit_in_one_piece_is_refused() -> None:
    async with listening() as at:
        many = "".join(f"X-H{i}: {'v' * 40}\r\n" for i in range(400))  # ~20 KB of short headers
        response = await exchange(at.port, f"GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
        assert status_of(response) == 431
        assert at.refusals == ["header_too_large"]
        assert at.seen.requests == []


async def test_a_long_request_line_is_refused() -> None:
    async with listening() as at:
        response = await exchange(at.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(response) == 431


def test_a_head_sent_a_byte_at_a_time_is_parsed_line_by_line() -> None:
    """httptools concatenates a header piece by piece; the protocol hands it whole
    lines only, so a header that trickles in costs linear time."""

    class Transport:
        def __init__(self) -> None:
            self.out = b""
            self.closing = False

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("127.0.0.1", 1) if name in ("peername", "sockname") else default

        def write(self, data: bytes) -> None:
            self.out += data

        def is_closing(self) -> bool:
            return self.closing

        def close(self) -> None:
            self.closing = True

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

        def can_write_eof(self) -> bool:
            return False

    async def run() -> tuple[int, float, list[bytes]]:
        app_saw: list[bytes] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            app_saw.extend(v for n, v in scope["headers"] if n == b"x-slow")
            await send_bytes(send, 204, b"")

        config = uvicorn.Config(app, ws="none", lifespan="off", log_config=None)
        config.load()
        server = QuietServer(config)
        limits = Limits(max_header_bytes=64 * 1024, header_timeout=60, max_connections=10)
        protocol = GuardedProtocol(config, server.server_state, {}, limits=limits)
        protocol.connection_made(Transport())  # type: ignore[arg-type]
        fed: list[bytes] = []
        parser = protocol.parser

        class Counting:  # counts what reaches the parser
            def feed_data(self, data: bytes) -> None:
                fed.append(data)
                parser.feed_data(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(parser, name)

        protocol.parser = Counting()  # type: ignore[assignment]
        raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 60000 + b"\r\n\r\n"
        started = time.perf_counter()
        for i in range(len(raw)):
            protocol.data_received(raw[i : i + 1])
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0)
        protocol.connection_lost(None)
        return len(fed), elapsed, app_saw

    feeds, elapsed, app_saw = asyncio.run(run())
    assert feeds == 4  # request line, Host, X-Slow, the blank line: one feed each
    assert app_saw == [b"s" * 60000]
    assert elapsed < 2.0


# --------------------------------------------------------------------------- head time


async def test_a_head_that_stalls_is_answered_408_and_closed() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        response = await read_all(reader)
        elapsed = time.monotonic() - started
        writer.close()
        assert status_of(response) == 408
        assert body_of(response)["error_description"] == "the request head took too long"
        assert 0.4 < elapsed < 3.5  # 0.5 s, then at most the linger
        assert at.refusals == ["header_timeout"]


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        started = time.monotonic()
        assert await read_all(reader) == b""
        assert 0.4 < time.monotonic() - started < 2.0
        writer.close()
        assert at.refusals == ["header_timeout"]


async def test_a_trickled_head_must_still_arrive_in_time() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        started = time.monotonic()
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ab":
            writer.write(bytes([byte]))  # a byte every 50 ms for 1.25 s; the head never ends
            await writer.drain()
            await asyncio.sleep(0.05)
        response = await read_all(reader)
        assert status_of(response) == 408
        assert time.monotonic() - started < 3.5
        writer.close()


async def test_the_head_timer_of_a_kept_alive_connection_starts_at_its_first_byte() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await one_response(reader))[0] == 200
        await asyncio.sleep(0.8)  # idle past the head timeout: keep-alive covers it
        writer.write(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await one_response(reader)
        assert status == 200 and json.loads(body)["path"] == "/2"
        writer.close()
        assert at.refusals == []


# --------------------------------------------------------------------------- body time


async def test_a_body_that_stalls_ends_the_request_with_408() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        response = await read_all(reader)
        writer.close()
        assert status_of(response) == 408
        assert body_of(response)["error_description"] == "the request body stalled"
        assert at.refusals == ["body_timeout"]
        assert at.seen.requests == []
        assert len(at.seen.disconnects) == 1
        assert at.seen.disconnects[0]["extensions"][REFUSED_EXTENSION] == {
            "status": 408,
            "reason": "body_timeout",
        }


async def test_a_body_that_never_starts_ends_the_request_with_408() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        response = await read_all(reader)
        writer.close()
        assert status_of(response) == 408
        assert at.refusals == ["body_timeout"]


async def test_a_slow_but_moving_body_is_not_cut_off() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        for piece in (b"ab", b"cd", b"ef"):
            await asyncio.sleep(0.3)  # each gap under the 0.5 s idle timeout; 0.9 s in all
            writer.write(piece)
        status, _, body = await one_response(reader)
        writer.close()
        assert status == 200 and json.loads(body)["body"] == "abcdef"


async def test_time_owed_a_100_continue_is_not_the_clients_stall() -> None:
    async with listening() as at:
        at.seen.receive_delay = 1.0  # the app reads the body only after a second
        reader, writer = await connect(at.port)
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"data")
        status, _, body = await one_response(reader)
        writer.close()
        assert status == 200 and json.loads(body)["body"] == "data"
        assert at.refusals == []


# --------------------------------------------------------------------------- connections


async def test_connections_beyond_the_cap_are_answered_503_and_closed() -> None:
    limits = Limits(max_header_bytes=8192, header_timeout=30, max_connections=3)
    async with listening(limits) as at:
        held = [await connect(at.port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await connect(at.port)
        response = await read_all(reader)
        assert status_of(response) == 503
        assert b"retry-after: 1\r\n" in response
        assert body_of(response)["error"] == "temporarily_unavailable"
        writer.close()
        assert at.refusals == ["too_many_connections"]
        for _, w in held[:1]:
            w.close()
        await asyncio.sleep(0.1)
        response = await exchange(
            at.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status_of(response) == 200
        for _, w in held[1:]:
            w.close()


# --------------------------------------------------------------------------- one host


@pytest.mark.parametrize(
    ("raw", "description"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: a.example.com,evil\r\n\r\n",
            "the Host header is not a valid host",
        ),
        (b"GET / HTTP/1.1\r\nHost: a.example.com..\r\n\r\n", "the Host header is not a valid host"),
        (b"GET / HTTP/1.1\r\nHost: a..example.com\r\n\r\n", "the Host header is not a valid host"),
        (
            b"GET / HTTP/1.1\r\nHost: %61dmin.example.com\r\n\r\n",
            "the Host header is not a valid host",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: admin.example.com;x\r\n\r\n",
            "the Host header is not a valid host",
        ),
        (b"GET / HTTP/1.1\r\nHost: a:99999999\r\n\r\n", "the Host header is not a valid host"),
        (
            b"GET http://a..b/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "the request target's host is not a valid host",
        ),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "only HTTP/1.1 and HTTP/1.0 are served"),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", None),
        (
            b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT is not served: this is not a forward proxy",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", "more than one Host header"),
        (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", "an HTTP/1.1 request needs a Host header"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "the Host header is not a valid host"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "the Host header is not a valid host"),
        (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", "the Host header is not a valid host"),
        (
            b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "an absolute request target must be an http(s) URL",
        ),
        (
            b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "the request target must not carry credentials",
        ),
    ],
)
async def test_host_must_be_one_valid_host(raw: bytes, description: str | None) -> None:
    async with listening() as at:
        response = await exchange(at.port, raw)
        assert status_of(response) == 400
        if description is not None:
            assert body_of(response) == {
                "error": "invalid_request",
                "error_description": description,
            }
        assert at.refusals == ["bad_request"]
        assert at.seen.requests == []


@pytest.mark.parametrize("host", [b"a_b.internal", b"[::1]:80", b"", b"Admin.Example.com.:8443"])
async def test_hosts_that_are_hosts_pass(host: bytes) -> None:
    async with listening() as at:
        response = await exchange(
            at.port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
        )
        assert status_of(response) == 200


async def test_an_http10_request_may_come_without_host() -> None:
    async with listening() as at:
        response = await exchange(at.port, b"GET /old HTTP/1.0\r\n\r\n")
        assert status_of(response) == 200


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"http://Admin.Example.com/health", "Admin.Example.com"),
        (b"http://admin.example.com:8443/health", "admin.example.com:8443"),
        (b"https://[::1]:9/health", "[::1]:9"),
    ],
)
async def test_an_absolute_form_targets_authority_replaces_host(target: bytes, host: str) -> None:
    async with listening() as at:
        response = await exchange(
            at.port, b"GET " + target + b" HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n"
        )
        seen = body_of(response)
        assert seen["path"] == "/health"
        assert [v for n, v in seen["headers"] if n == "host"] == [host]


# --------------------------------------------------------------------------- trailers, upgrades


async def test_trailers_never_become_headers() -> None:
    async with listening() as at:
        response = await exchange(
            at.port,
            b"POST /t HTTP/1.1\r\nHost: public\r\nTransfer-Encoding: chunked\r\nConnection: close"
            b"\r\n\r\n3\r\nabc\r\n0\r\nHost: admin\r\nX-Auth-Subject: root\r\n\r\n",
        )
        seen = body_of(response)
        assert seen["body"] == "abc"
        names = [n for n, _ in seen["headers"]]
        assert names == ["host", "transfer-encoding", "connection"]
        assert [v for n, v in seen["headers"] if n == "host"] == ["public"]


async def test_trailers_that_never_end_are_cut_off() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(
            b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: "
        )
        with contextlib.suppress(ConnectionError):
            for _ in range(64):
                writer.write(b"t" * 16384)
                await writer.drain()
        response = await read_all(reader)
        writer.close()
        assert status_of(response) == 431
        assert at.refusals == ["header_too_large"]


async def test_an_upgrade_request_is_answered_as_plain_http_then_closed() -> None:
    async with listening() as at:
        response = await exchange(
            at.port,
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        assert status_of(response) == 200
        assert response.count(b"HTTP/1.1 ") == 1
        assert [r["path"] for r in at.seen.requests] == ["/ws"]


async def test_an_upgrade_request_with_a_body_is_refused() -> None:
    async with listening() as at:
        response = await exchange(
            at.port,
            b"POST /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        assert status_of(response) == 400
        assert at.seen.requests == []


async def test_garbage_is_a_json_400() -> None:
    async with listening() as at:
        response = await exchange(at.port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        assert status_of(response) == 400
        assert body_of(response) == {
            "error": "invalid_request",
            "error_description": "the request is not valid HTTP/1.1",
        }
        assert at.refusals == ["bad_request"]


async def test_a_refused_client_that_keeps_sending_is_cut_off() -> None:
    async with listening() as at:
        _, writer = await connect(at.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Flood: ")
        started = time.monotonic()
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < 64 * 1024 * 1024 and time.monotonic() - started < 5:
                writer.write(b"a" * 65536)
                await writer.drain()
                sent += 65536
        # the server reads at most LINGER_BYTES after its answer, then resets
        assert sent < 16 * 1024 * 1024
        assert time.monotonic() - started < 2.0
        writer.close()
        assert at.refusals == ["header_too_large"]


async def test_a_transfer_coding_other_than_chunked_is_501() -> None:
    async with listening() as at:
        response = await exchange(
            at.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
        )
        assert status_of(response) == 501
        assert at.seen.requests == []


async def test_blank_lines_before_a_request_count_against_the_head_limit() -> None:
    async with listening() as at:
        response = await exchange(at.port, b"\r\n" * 5000 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(response) == 431
        ok = await exchange(
            at.port, b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status_of(ok) == 200


async def test_pipelined_requests_wait_unparsed_for_their_turn() -> None:
    """A client that pipelines hundreds of requests in one write costs a buffer, not a
    queue of parsed requests: the next head is parsed only when the response before
    it is complete. Every request is still answered, in order."""
    async with listening() as at:
        at.seen.gate = asyncio.Event()
        reader, writer = await connect(at.port)
        count = 300
        writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(count)))
        await writer.drain()
        await asyncio.sleep(0.3)
        (protocol,) = at.protocols()
        assert len(protocol.pipeline) == 0  # nothing parsed ahead of its turn
        assert protocol.held is not None
        at.seen.gate.set()
        paths = []
        for _ in range(count):
            status, _, body = await one_response(reader)
            assert status == 200
            paths.append(json.loads(body)["path"])
        writer.close()
        assert paths == [f"/{i}" for i in range(count)]
        assert at.refusals == []


async def test_pipelined_requests_after_a_body_wait_too() -> None:
    async with listening() as at:
        at.seen.gate = asyncio.Event()
        reader, writer = await connect(at.port)
        post = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        writer.write(post + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        await writer.drain()
        await asyncio.sleep(0.3)
        (protocol,) = at.protocols()
        assert len(protocol.pipeline) == 0
        at.seen.gate.set()
        first = await one_response(reader)
        assert json.loads(first[2])["body"] == "hello"
        for _ in range(50):
            assert json.loads((await one_response(reader))[2])["path"] == "/after"
        writer.close()


async def test_a_body_timer_after_the_answer_closes_quietly() -> None:
    """The app answered without reading the whole body; the client stalls: the
    connection is closed with no second, unsolicited response."""

    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(b"PUT /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        response = await read_all(reader)
        writer.close()
        assert response.count(b"HTTP/1.1 ") == 1 and status_of(response) == 200
        assert at.refusals == ["body_timeout"]


async def test_a_client_that_never_reads_its_response_is_disconnected() -> None:
    async with listening() as at:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", at.port))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        while "send_timeout" not in at.refusals and time.monotonic() - started < 5:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        sock.close()
        assert at.refusals == ["send_timeout"]
        assert 0.4 < elapsed < 3.0
        assert at.protocols() == []


# --------------------------------------------------------------------------- bodiless


@pytest.mark.parametrize("status", [204, 304])
async def test_a_bodiless_status_goes_out_without_body_or_framing(status: int) -> None:
    """An app that sends a body (and its Content-Length) with a 204 or 304 head made
    uvicorn write those bytes after the head: a client reads them as the start of the
    next response, which then fails to parse."""
    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(b"GET /framed/%d HTTP/1.1\r\nHost: x\r\n\r\n" % status)
        writer.write(b"GET /framed/200 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status)
        assert b"content-length" not in head.lower()
        assert b"transfer-encoding" not in head.lower()
        after = await one_response(reader)  # the very next bytes are the next response
        assert (after[0], after[2]) == (200, b"a body")
        writer.close()
        assert at.refusals == []


async def test_an_apps_interim_status_becomes_an_empty_500() -> None:
    async with listening() as at:
        reader, writer = await connect(at.port)
        writer.write(b"GET /framed/103 HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write(b"GET /framed/200 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        status, headers, body = await one_response(reader)
        assert (status, headers["content-length"], body) == (500, "0", b"")
        after = await one_response(reader)
        assert (after[0], after[2]) == (200, b"a body")
        writer.close()
