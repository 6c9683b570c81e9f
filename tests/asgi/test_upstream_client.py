"""The upstream HTTP/1.1 client against scripted loopback servers that misbehave on cue."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.upstream import (
    HIGH_WATER,
    Origin,
    Response,
    UpstreamClient,
    UpstreamTimeout,
    UpstreamUnavailable,
    request_head,
)

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Server:
    """A loopback server: ``make(server)`` is the handler for every connection it accepts."""

    def __init__(
        self, make: Callable[[Server], Handler], *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.handler = make(self)
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        scheme = "https" if self.tls is not None else "http"
        self.origin = Origin.of(f"{scheme}://127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head


def by_method(**responses: bytes) -> Callable[[Server], Handler]:
    """Answer each request with the response given for its method."""

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await server.read_head(reader)
                writer.write(responses[head.split(b" ", 1)[0].decode()])
                await writer.drain()

        return handler

    return make


def answering(*responses: bytes, then_close: bool = False) -> Callable[[Server], Handler]:
    """Per connection: read a request, send the next response; repeat."""

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for response in responses:
                await server.read_head(reader)
                writer.write(response)
                await writer.drain()
                if then_close:
                    return
            await reader.read()  # hold the connection until the client closes it

        return handler

    return make


async def get(
    client: UpstreamClient, server: Server, method: str = "GET", **kwargs: object
) -> tuple[Response, bytes]:
    response = await client.request(
        server.origin,
        method,
        b"/x",
        [(b"accept", b"*/*")],
        stall_timeout=kwargs.pop("stall_timeout", 2.0),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    body = b""
    try:
        while True:
            chunk, last = await response.next_chunk()
            body += chunk
            if last:
                return response, body
    finally:
        response.release()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient()
    yield upstream
    await upstream.close()


# --------------------------------------------------------------------------- framing


async def test_request_head_and_keep_alive_reuse(client: UpstreamClient) -> None:
    async with Server(answering(OK, OK, OK)) as server:
        for _ in range(3):
            response, body = await get(client, server)
            assert (response.status, body) == (200, b"ok")
    assert server.connections == 1
    host = server.origin.host_header
    assert server.requests[0] == b"GET /x HTTP/1.1\r\nhost: " + host + b"\r\naccept: */*\r\n\r\n"


def test_origins_and_their_host_headers() -> None:
    assert Origin.of("http://svc:8080/base") == Origin("http", "svc", 8080, b"svc:8080")
    assert Origin.of("https://api.example.com").host_header == b"api.example.com"
    assert Origin.of("http://h:80").host_header == b"h"
    assert Origin.of("http://[::1]:9000").host_header == b"[::1]:9000"
    assert Origin.of("http://bücher.example").host_header == b"xn--bcher-kva.example"


def test_a_method_that_is_not_a_token_is_never_sent() -> None:
    with pytest.raises(UpstreamUnavailable):
        request_head("GET / HTTP/1.1\r\nx:", b"/", b"h", [], b"")


async def test_connection_close_is_honoured(client: UpstreamClient) -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with Server(answering(closing, then_close=True)) as server:
        for _ in range(2):
            assert (await get(client, server))[1] == b"ok"
    assert server.connections == 2


async def test_head_responses_have_no_body_and_end_the_connection(
    client: UpstreamClient,
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    async with Server(by_method(HEAD=head, GET=OK)) as server:
        response, body = await get(client, server, "HEAD")
        assert (response.status, response.content_length, body) == (200, 0, b"")
        assert (await get(client, server))[1] == b"ok"
    assert server.connections == 2  # never reused after HEAD


async def test_interim_responses_are_skipped(client: UpstreamClient) -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 201 Created\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok"
    async with Server(answering(hints + final)) as server:
        response, body = await get(client, server)
    assert (response.status, response.headers, body) == (
        201,
        [(b"X-A", b"1"), (b"Content-Length", b"2")],
        b"ok",
    )


async def test_chunked_and_until_close_bodies(client: UpstreamClient) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with Server(answering(chunked)) as server:
        response, body = await get(client, server)
        assert (response.content_length, body) == (None, b"abcde")
    until_close = b"HTTP/1.1 200 OK\r\n\r\nall of it"
    async with Server(answering(until_close, then_close=True)) as server:
        response, body = await get(client, server)
        assert (response.until_close, body) == (True, b"all of it")


async def test_a_response_split_into_single_bytes(client: UpstreamClient) -> None:
    response = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for _ in range(2):
                await server.read_head(reader)
                for i in range(len(response)):
                    writer.write(response[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0)

        return handler

    async with Server(make) as server:
        for _ in range(2):  # and the connection is sound for the next one
            got, body = await get(client, server)
            assert (got.status, got.headers, body) == (
                200,
                [(b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")],
                b"abcde",
            )
    assert server.connections == 1


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",  # chunk cut short
    ],
)
async def test_a_body_cut_short_is_an_error(client: UpstreamClient, response: bytes) -> None:
    async with Server(answering(response, then_close=True)) as server:
        with pytest.raises(UpstreamUnavailable):
            await get(client, server)


@pytest.mark.parametrize(
    "response",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["garbage", "two-lengths", "bad-header", "upgrade", "huge-headers", "999", "600"],
)
async def test_invalid_responses_are_unavailable(client: UpstreamClient, response: bytes) -> None:
    async with Server(answering(response)) as server:
        with pytest.raises(UpstreamUnavailable):
            await get(client, server)


async def test_a_header_that_never_ends_is_cut_off(client: UpstreamClient) -> None:
    sent = 0

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal sent
            await server.read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
            while sent < 10 * 1024 * 1024:
                writer.write(b"a" * 1024)
                sent += 1024
                await writer.drain()
                await asyncio.sleep(0)

        return handler

    async with Server(make) as server:
        with pytest.raises(UpstreamUnavailable, match="too large"):
            await get(client, server, stall_timeout=5)
    assert sent < 1024 * 1024  # cut off long before the upstream ran out


async def test_bytes_after_a_response_never_answer_the_next_request(
    client: UpstreamClient,
) -> None:
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nforged!"

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_head(reader)
            if server.connections == 1:
                writer.write(OK + forged)  # one request, two responses
            else:
                writer.write(OK)
            await reader.read()

        return handler

    async with Server(make) as server:
        assert (await get(client, server))[1] == b"ok"
        await asyncio.sleep(0.05)
        assert (await get(client, server))[1] == b"ok"  # from a new connection
    assert server.connections == 2


async def test_a_stray_response_while_idle_closes_the_connection(client: UpstreamClient) -> None:
    """The attack review's upstream: a second, unsolicited response 300 ms after the
    first. It arrives while the connection is idle in the pool and ends it there."""
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nforged!"

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_head(reader)
            writer.write(OK)
            if server.connections == 1:
                await asyncio.sleep(0.3)
                writer.write(forged)
            await reader.read()

        return handler

    async with Server(make) as server:
        assert (await get(client, server))[1] == b"ok"
        await asyncio.sleep(0.5)
        assert (await get(client, server))[1] == b"ok"  # from a new connection
    assert server.connections == 2


def test_unread_bytes_in_a_pooled_connection_keep_it_from_being_reused() -> None:
    """A stray response already in the socket, which the event loop has not read yet
    (it was busy), is noticed when the connection is picked: a new one is used."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    first_done = threading.Event()
    stray_sent = threading.Event()
    accepted: list[socket.socket] = []

    def serve() -> None:
        for n in range(2):
            conn, _ = listener.accept()
            accepted.append(conn)
            conn.recv(65536)
            conn.sendall(OK)
            if n == 0:
                first_done.wait(5)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nforged!")
                stray_sent.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def run() -> list[bytes]:
        client = UpstreamClient()
        origin = Origin.of(f"http://127.0.0.1:{port}")
        bodies = []
        for i in range(2):
            response = await client.request(origin, "GET", b"/", [], stall_timeout=2)
            body = b""
            while True:
                chunk, last = await response.next_chunk()
                body += chunk
                if last:
                    break
            response.release()
            bodies.append(body)
            if i == 0:
                first_done.set()
                stray_sent.wait(5)  # blocks the loop: the stray bytes stay unread
                time.sleep(0.05)  # noqa: ASYNC251 - blocking the loop is the point
        await client.close()
        return bodies

    try:
        assert asyncio.run(run()) == [b"ok", b"ok"]
        assert len(accepted) == 2  # the second request went out on a new connection
    finally:
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


async def test_a_response_closed_mid_body_drops_its_connection(client: UpstreamClient) -> None:
    closed = asyncio.Event()

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_head(reader)
            if server.connections == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                await reader.read()  # returns at EOF: the client closed the connection
                closed.set()
            else:
                writer.write(OK)
                await reader.read()

        return handler

    async with Server(make) as server:
        response = await client.request(server.origin, "GET", b"/", [], stall_timeout=2)
        assert await response.next_chunk() == (b"partial", False)
        response.close()  # what the gateway does when its client leaves
        await asyncio.wait_for(closed.wait(), 2)
        assert client.idle_connections() == 0
        assert (await get(client, server))[1] == b"ok"
    assert server.connections == 2


# --------------------------------------------------------------------------- stale connections


async def test_a_stale_pooled_connection_is_retried_for_idempotent_requests(
    client: UpstreamClient,
) -> None:
    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_head(reader)
            writer.write(OK)
            await writer.drain()
            await server.read_head(reader)  # takes the next request, then hangs up unanswered

        return handler

    async with Server(make) as server:
        assert (await get(client, server))[1] == b"ok"
        assert (await get(client, server))[1] == b"ok"  # retried on a new connection
        assert server.connections == 2
        with pytest.raises(UpstreamUnavailable):
            await get(client, server, "POST")  # not idempotent: never sent twice
    assert server.connections == 2


async def test_idle_connections_expire(client: UpstreamClient) -> None:
    quick = UpstreamClient(idle_timeout=0.2)
    async with Server(answering(OK, OK)) as server:
        await get(quick, server)
        assert quick.idle_connections() == 1
        await asyncio.sleep(0.5)
        assert quick.idle_connections() == 0
        await get(quick, server)
    await quick.close()
    assert server.connections == 2


async def test_connection_refused_is_unavailable(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamUnavailable):
        await client.request(Origin.of("http://127.0.0.1:9"), "GET", b"/", [], stall_timeout=2)


# --------------------------------------------------------------------------- timeouts


async def test_silence_times_out_but_slow_progress_does_not(client: UpstreamClient) -> None:
    def slow(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
            for byte in b"slow":
                await asyncio.sleep(0.15)  # each pause shorter than the timeout
                writer.write(bytes([byte]))
            await reader.read()

        return handler

    async with Server(slow) as server:
        _, body = await get(client, server, stall_timeout=0.3)
        assert body == b"slow"  # 0.6 s in all, never 0.3 s without progress
    async with Server(lambda s: lambda r, w: r.read()) as server:
        with pytest.raises(UpstreamTimeout):
            await get(client, server, stall_timeout=0.2)


# --------------------------------------------------------------------------- bodies


async def _body(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


def echoing_body(server: Server) -> Handler:
    """Answer every request with the body it carried."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await server.read_head(reader)
            if b"content-length: " in head:
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                received = await reader.readexactly(length)
            else:
                received = b""
                while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
                    received += await reader.readexactly(size)
                    await reader.readexactly(2)
                await reader.readexactly(2)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(received), received)
            )

    return handler


async def test_request_bodies_with_length_or_chunked(client: UpstreamClient) -> None:
    async with Server(echoing_body) as server:
        _, body = await get(client, server, "POST", body=_body(b"abc", b"de"), content_length=b"5")
        assert body == b"abcde"
        _, body = await get(client, server, "POST", body=_body(b"abc", b"", b"defg"))
        assert body == b"abcdefg"
        _, body = await get(client, server, "POST", content_length=b"0")
        assert body == b""
    assert server.connections == 1
    assert b"content-length: 5\r\n" in server.requests[0]
    assert server.requests[2].endswith(b"content-length: 0\r\n\r\n")
    assert b"transfer-encoding: chunked\r\n" in server.requests[1]


async def test_a_failing_request_body_fails_the_exchange(client: UpstreamClient) -> None:
    class Gone(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"abc"
        raise Gone

    async with Server(echoing_body) as server:
        with pytest.raises(Gone):
            await get(client, server, "POST", body=failing(), content_length=b"10")


async def test_an_early_response_ends_the_upload_and_the_connection(
    client: UpstreamClient,
) -> None:
    too_large = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n"
    forever = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        yield b"x" * 1024
        await forever.wait()
        yield b"never"

    async with Server(by_method(PUT=too_large, GET=OK)) as server:
        response, _ = await get(client, server, "PUT", body=endless(), content_length=b"99999")
        assert response.status == 413
        assert (await get(client, server))[1] == b"ok"
    assert server.connections == 2


async def test_an_unread_response_stops_reading_the_upstream(client: UpstreamClient) -> None:
    size = 16 * 1024 * 1024
    sent = 0

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal sent
            await server.read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            block = b"x" * 65536
            while sent < size:
                writer.write(block)
                sent += len(block)
                await writer.drain()

        return handler

    async with Server(make) as server:
        response = await client.request(server.origin, "GET", b"/", [], stall_timeout=5)
        await asyncio.sleep(0.5)  # nobody reads: the upstream is held back
        queued = sum(len(c) for c in response._chunks)
        assert queued < HIGH_WATER + 1024 * 1024  # what arrived before reading paused
        assert sent < size / 2  # the rest waits in the upstream, not in the gateway
        received = 0
        while True:
            chunk, last = await response.next_chunk()
            received += len(chunk)
            if last:
                break
        response.release()
    assert received == size


# --------------------------------------------------------------------------- TLS


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_upstreams_are_verified(tmp_path: Path, client: UpstreamClient) -> None:
    cert, key = _certificate(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    async with Server(answering(OK, OK), tls=server_tls) as server:
        with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await get(client, server)  # the system trust store does not know it
        trusting = UpstreamClient(ssl_context=ssl.create_default_context(cafile=str(cert)))
        assert (await get(trusting, server))[1] == b"ok"
        assert (await get(trusting, server))[1] == b"ok"
        await trusting.close()
