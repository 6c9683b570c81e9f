"""The listeners' limits (DESIGN.md, "Limits, trust and failure"), against real
``tokengate run`` processes over loopback sockets: bytes on the wire, no client
library in the way. Every limit is small here so that the whole file runs fast."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import itertools
import json
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Tokengate, e2e_config, free_port, health_route
from tests.e2e.test_gateway_process import PeakRss, Stack, audit, rss_bytes
from tokengate.httpserver import REFUSAL_REASONS

MIB = 1024 * 1024
FLOOD_SECONDS = 1.5
FLOOD_OFFER = 16 * MIB
TRUNCATED = "...[truncated]"

# --------------------------------------------------------------------------- processes

Routes = Callable[[str], list[dict[str, Any]]]


def default_routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "orders",
            "match": {"path": "/orders/**"},
            "upstream": upstream,
            "timeout": "5s",
            "require": {"scopes": ["orders:read"]},
        },
        health_route(upstream),
    ]


class PipedTokengate(Tokengate):
    """A ``tokengate run`` whose stdout is a pipe: a FIFO in place of ``stdout.log``
    (``Tokengate.start`` opens that path for the child), read line by line by a thread."""

    def start(self, ready_url: str, timeout: float = 30) -> None:
        os.mkfifo(self.stdout_path)
        # the read end first, non-blocking, so that opening the write end does not block
        fd = os.open(self.stdout_path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        self.pipe = os.fdopen(fd, "rb")
        self.lines: list[bytes] = []
        super().start(ready_url, timeout)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.pipe:  # until every writer (the process and its workers) is gone
            self.lines.append(line)


def start_hardened(
    workdir: Path,
    started: list[Tokengate],
    *args: str,
    gateway_limits: dict[str, Any] | None = None,
    authserver: dict[str, Any] | None = None,
    admin_limits: dict[str, Any] | None = None,
    routes: Routes = default_routes,
    audit_path: str | None = None,
    kind: type[Tokengate] = Tokengate,
) -> Stack:
    """``start_stack`` with limits and routes of the test's choosing; every process is
    put in ``started`` as soon as it exists, so the fixture ends it whatever happens."""
    up_port, auth_port, gw_port, admin_port = (free_port() for _ in range(4))
    (workdir / "upstream").mkdir(parents=True)
    (workdir / "main").mkdir()
    upstream = Tokengate(workdir / "upstream", {"echo": {"listen": f"127.0.0.1:{up_port}"}})
    started.append(upstream)
    upstream.start(f"http://127.0.0.1:{up_port}/")
    config = e2e_config(workdir / "main" / "data", auth_port, **(authserver or {}))
    issuer = f"http://127.0.0.1:{auth_port}/oauth2/default"
    config["gateway"] = {
        "listen": f"127.0.0.1:{gw_port}",
        "issuers": [{"issuer": issuer, "audiences": ["api://default"]}],
        "routes": routes(f"http://127.0.0.1:{up_port}"),
    }
    if gateway_limits:
        config["gateway"]["limits"] = gateway_limits
    config["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    if admin_limits:
        config["admin"]["limits"] = admin_limits
    config["audit"] = {"path": audit_path or str(workdir / "main" / "audit.log")}
    main = kind(workdir / "main", config, *args)
    started.append(main)
    main.start(f"http://127.0.0.1:{admin_port}/readyz")
    return Stack(main, upstream, auth_port, gw_port, admin_port)


def end(process: Tokengate) -> None:
    """Kill a ``tokengate run`` and the workers it spawned (they would outlive it)."""
    proc = process.proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGSTOP)  # no worker is replaced while we look
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        proc.kill()
        proc.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    if isinstance(process, PipedTokengate) and hasattr(process, "pipe"):
        if hasattr(process, "reader"):
            process.reader.join(timeout=5)
        process.pipe.close()


@pytest.fixture
def hardened(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    started: list[Tokengate] = []

    def make(*args: str, **kwargs: Any) -> Stack:
        return start_hardened(tmp_path / f"stack{len(started)}", started, *args, **kwargs)

    yield make
    for process in started:
        end(process)


class Recorder(http.server.ThreadingHTTPServer):
    """An upstream in the test process that remembers every request target it got."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.targets: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        assert isinstance(self.server, Recorder)
        self.server.targets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


# --------------------------------------------------------------------------- the wire


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Reply(int(status_line.split(" ")[1]), headers, body)


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, request: bytes, timeout: float = 5) -> Reply:
    """Send ``request`` whole on a new connection and read the answer to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return parse_reply(read_to_eof(sock))


def get(path: str, host: str = "x", *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *extra, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


@dataclass
class Pushed:
    sent: int  # bytes the client managed to write
    write_error: OSError | None  # how writing ended, if it did not run out of bytes
    answer: bytes  # everything read back, to EOF


def push(port: int, first: bytes, then: Iterable[bytes] = ()) -> Pushed:
    """Write ``first`` and then each of ``then`` until the server stops taking them,
    while a thread reads whatever it answers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)  # little held client-side
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    received: list[bytes] = []

    def read() -> None:
        with contextlib.suppress(OSError):  # a reset after the answer, a timeout
            while chunk := sock.recv(65536):
                received.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    sent, error = 0, None
    with sock:
        try:
            for data in itertools.chain((first,), then):
                sock.sendall(data)
                sent += len(data)
        except OSError as exc:  # EPIPE / ECONNRESET once the server has closed
            error = exc
        reader.join(timeout=10)
    return Pushed(sent, error, b"".join(received))


def flood_header(port: int, offer: int = FLOOD_OFFER) -> Pushed:
    """A request head that never ends: one header, ``offer`` bytes of it in 64 KiB writes."""
    chunk = b"a" * 65536
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: "
    return push(port, head, itertools.repeat(chunk, offer // len(chunk)))


def refusals(stack: Stack) -> dict[tuple[str, str], float]:
    """The refusals counted so far (every listener's series exist at 0 from the start)."""
    text = httpx.get(f"{stack.admin}/metrics").text
    counted = {
        (sample.labels["listener"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tokengate_listener_refusals_total"
    }
    listeners = {listener for listener, _ in counted}
    assert set(counted) == {(x, r) for x in listeners for r in REFUSAL_REASONS}
    return {key: value for key, value in counted.items() if value}


def refusal_line(listener: str, reason: str, count: int) -> str:
    return f'tokengate_listener_refusals_total{{listener="{listener}",reason="{reason}"}} {count}.0'


def bytes_read(pid: int) -> int:
    """What a process has read from files and sockets (``rchar``; uvloop reads with read())."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar")


def ensure_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed


def wait_for(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------- tests


def test_a_header_flood_is_431_and_costs_neither_memory_nor_latency(
    hardened: Callable[..., Stack], recorder: Recorder
) -> None:
    def routes(upstream: str) -> list[dict[str, Any]]:
        record = {"name": "record", "match": {"path": "/record/**"}, "upstream": recorder.url}
        return [*default_routes(upstream), {**record, "public": True}]

    stack = hardened(routes=routes)
    port = port_of(stack.gateway)
    assert stack.main.proc is not None
    assert exchange(port, get("/health")).status == 200  # warm: pools, first-request costs

    floods: list[Pushed] = []
    checks: list[tuple[float, int, float]] = []  # started, status, seconds
    until = time.monotonic() + FLOOD_SECONDS

    def flooder() -> None:  # one never-ending head after another: each is cut off
        while time.monotonic() < until:
            floods.append(flood_header(port))

    def health() -> None:
        while time.monotonic() < until or len(checks) < 20:
            started = time.monotonic()
            status = exchange(port, get("/health")).status
            checks.append((started, status, time.monotonic() - started))

    read_before = bytes_read(stack.main.proc.pid)
    with PeakRss(stack.main.proc.pid) as memory:
        threads = [threading.Thread(target=t) for t in (health, *[flooder] * 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    after = rss_bytes(stack.main.proc.pid)
    read_by_server = bytes_read(stack.main.proc.pid) - read_before

    assert len(floods) >= 4
    for flood in floods:
        answer = parse_reply(flood.answer)
        assert answer.status == 431, flood.answer[:200]
        assert answer.headers["connection"] == "close"
        assert answer.json() == {
            "error": "invalid_request",
            "error_description": "the request header fields are too large",
        }
        # once it has answered, the server closes while the client still writes
        assert flood.write_error is not None and flood.sent < FLOOD_OFFER, (
            f"the client wrote {flood.sent} bytes of a refused head (limit 64 KiB) "
            f"and the server never closed; writing ended with {flood.write_error!r}"
        )
    # ... having read a bounded amount of each: the rest went unread (kernel buffers,
    # dropped with the connection), long before the 16 MB on offer
    assert read_by_server < len(floods) * 2 * MIB + 4 * MIB, (read_by_server, len(floods))
    assert sum(started < until for started, _, _ in checks) >= 10  # during the flood
    latencies = [(status, seconds) for _, status, seconds in checks]
    assert latencies and all(status == 200 for status, _ in latencies), latencies
    assert max(seconds for _, seconds in latencies) < 1.0, latencies
    assert memory.peak - memory.baseline < 30 * MIB, (memory.baseline, memory.peak)
    assert after - memory.baseline < 30 * MIB, (memory.baseline, after)

    # a complete 1 MB header in one go: 431, and neither the upstream nor the audit see it
    assert exchange(port, get("/record/small")).status == 200  # the route does reach it
    big = push(port, get("/record/big", "x", "X-Big: " + "b" * MIB))
    assert parse_reply(big.answer).status == 431
    assert recorder.targets == ["/record/small"]
    audited = [x["path"] for x in audit(stack) if x["event"] == "gateway.request"]
    assert "/record/small" in audited and "/record/big" not in audited
    assert refusals(stack) == {("gateway", "header_too_large"): len(floods) + 1}


def test_half_open_connections_are_closed_after_the_header_timeout(
    hardened: Callable[..., Stack],
) -> None:
    stack = hardened(gateway_limits={"header_timeout": "1s"})
    port = port_of(stack.gateway)
    ensure_open_files(1024)
    partial, silent = 300, 50

    async def scenario() -> tuple[list[tuple[float, bytes]], Reply]:
        async def hold(send: bytes) -> tuple[float, bytes]:
            opened = time.monotonic()  # before the server can have started its timer
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if send:
                writer.write(send)
            try:
                data = await asyncio.wait_for(reader.read(), timeout=5)
            except ConnectionResetError:
                data = b"<reset>"
            except TimeoutError:
                data = b"<still open>"
            closed = time.monotonic() - opened
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return closed, data

        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Partial: yes"  # no end of line, no end
        tasks = [asyncio.create_task(hold(head)) for _ in range(partial)]
        tasks += [asyncio.create_task(hold(b"")) for _ in range(silent)]
        await asyncio.sleep(0.2)  # they are connected and waiting
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/health"))
        legit = parse_reply(await asyncio.wait_for(reader.read(), timeout=5))
        writer.close()
        await writer.wait_closed()
        return list(await asyncio.gather(*tasks)), legit

    started = time.monotonic()
    held, legit = asyncio.run(scenario())
    assert legit.status == 200
    assert time.monotonic() - started < 4.5
    for closed, data in held[:partial]:
        assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
        assert parse_reply(data).json()["error_description"] == "the request head took too long"
        assert 0.9 < closed < 3, closed
    for closed, data in held[partial:]:
        assert data in (b"", b"<reset>"), data  # nothing sent: just closed
        assert 0.9 < closed < 3, closed

    metrics = httpx.get(f"{stack.admin}/metrics").text
    assert refusal_line("gateway", "header_timeout", partial + silent) in metrics
    refused = [e for e in stack.main.log_events() if e["event"] == "listener.refused"]
    assert refused and {(e["listener"], e["reason"]) for e in refused} == {
        ("gateway", "header_timeout")
    }
    assert len(refused) <= 2  # rate-limited: not one line per refusal


def test_beyond_max_connections_is_503_with_retry_after(hardened: Callable[..., Stack]) -> None:
    stack = hardened(gateway_limits={"max_connections": 20, "header_timeout": "30s"})
    port = port_of(stack.gateway)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        for _ in range(3):
            answer = exchange(port, get("/health"))
            assert (answer.status, answer.headers["retry-after"]) == (503, "1")
            assert answer.headers["connection"] == "close"
            assert answer.json() == {
                "error": "temporarily_unavailable",
                "error_description": "too many connections; try again",
            }
        # a connection that sends nothing is told the same at once
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            assert parse_reply(read_to_eof(idle)).status == 503
        for sock in held:  # still open: the 20 were never refused
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        metrics = httpx.get(f"{stack.admin}/metrics").text
        assert refusal_line("gateway", "too_many_connections", 4) in metrics
    finally:
        for sock in held:
            sock.close()
    assert wait_for(lambda: exchange(port, get("/health")).status == 200, timeout=3)


def test_host_rules_hold_on_the_real_listener(hardened: Callable[..., Stack]) -> None:
    def routes(upstream: str) -> list[dict[str, Any]]:
        return [
            {
                "name": "admin-health",
                "match": {"path": "/health", "host": "admin.example.com"},
                "upstream": upstream,
                "require": {"scopes": ["orders:write"]},
            },
            {
                "name": "public-health",
                "match": {"path": "/health"},
                "upstream": upstream,
                "public": True,
            },
        ]

    stack = hardened(routes=routes)
    port = port_of(stack.gateway)
    token = stack.token()

    def send(rid: str, method_target: str, *headers: str, body: bytes = b"") -> Reply:
        lines = [method_target + " HTTP/1.1", *headers, f"X-Request-Id: {rid}", "Connection: close"]
        return exchange(port, "\r\n".join([*lines, "", ""]).encode() + body)

    chunked = b"5\r\nhello\r\n0\r\nHost: admin.example.com\r\nX-Auth-Client-Id: spoof\r\n\r\n"
    expected: dict[str, tuple[str, int]] = {}

    # (a) a trailer naming another host neither moves the request nor becomes a header
    for rid, method in (("trailer-post", "POST"), ("trailer-get", "GET")):
        answer = send(
            rid,
            f"{method} /health",
            "Host: public.example.com",
            "Transfer-Encoding: chunked",
            body=chunked,
        )
        assert answer.status == 200, answer
        seen = answer.json()
        assert seen["body_bytes"] == 5
        assert seen["headers"]["x-forwarded-host"] == "public.example.com"
        assert "x-auth-client-id" not in seen["headers"]
        expected[rid] = ("public-health", 200)
    back = chunked.replace(b"admin.example.com", b"public.example.com")
    answer = send(
        "trailer-back",
        "POST /health",
        "Host: admin.example.com",
        "Transfer-Encoding: chunked",
        body=back,
    )
    assert answer.status == 401
    expected["trailer-back"] = ("admin-health", 401)

    # (b) a second Host is 400 and goes nowhere
    answer = send("two-hosts", "GET /health", "Host: public.example.com", "Host: admin.example.com")
    assert answer.status == 400
    assert answer.json() == {
        "error": "invalid_request",
        "error_description": "more than one Host header",
    }

    # (c) matched lower-case, without a trailing dot or a port
    for rid, host in (("dot", "admin.example.com."), ("case-port", "ADMIN.example.com:8080")):
        answer = send(rid, "GET /health", f"Host: {host}")
        assert answer.status == 401, (host, answer)
        assert answer.headers["www-authenticate"] == 'Bearer realm="tokengate"'
        expected[rid] = ("admin-health", 401)
    answer = send(
        "case-port-token",
        "GET /health",
        "Host: ADMIN.example.com:8080",
        f"Authorization: Bearer {token}",
    )
    assert answer.status == 200
    assert answer.json()["headers"]["x-auth-client-id"] == "admin"
    expected["case-port-token"] = ("admin-health", 200)

    # (d) an absolute-form target's authority is the host, whatever Host says
    answer = send(
        "absolute-admin", "GET http://admin.example.com/health", "Host: public.example.com"
    )
    assert answer.status == 401
    expected["absolute-admin"] = ("admin-health", 401)
    answer = send(
        "absolute-public", "GET http://public.example.com/health", "Host: admin.example.com"
    )
    assert answer.status == 200
    assert answer.json()["headers"]["x-forwarded-host"] == "public.example.com"
    expected["absolute-public"] = ("public-health", 200)

    lines = {x["request_id"]: x for x in audit(stack) if x["event"] == "gateway.request"}
    assert {rid: (x["route"], x["status"]) for rid, x in lines.items()} == expected
    assert refusals(stack) == {("gateway", "bad_request"): 1}


def test_a_stalled_upload_is_408_and_audited_as_408(hardened: Callable[..., Stack]) -> None:
    stack = hardened(gateway_limits={"body_idle_timeout": "1s"})
    port = port_of(stack.gateway)
    token = stack.token()
    head = (
        "POST /orders/upload HTTP/1.1\r\nHost: x\r\nX-Request-Id: stalled\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()  # before the server can have seen a body byte
        sock.sendall(head + b"0123456789")
        answer = parse_reply(read_to_eof(sock))
        waited = time.monotonic() - started
    assert answer.status == 408
    assert answer.json() == {
        "error": "invalid_request",
        "error_description": "the request body stalled",
    }
    assert 0.9 < waited < 3, waited
    assert wait_for(lambda: any(x.get("request_id") == "stalled" for x in audit(stack)))
    (line,) = [x for x in audit(stack) if x.get("request_id") == "stalled"]
    assert (line["route"], line["status"], line["bytes_in"]) == ("orders", 408, 10)
    assert (line["decision"], line["client_id"]) == ("allow", "admin")
    assert refusals(stack) == {("gateway", "body_timeout"): 1}


def test_a_long_chunked_upload_of_small_chunks_is_not_mistaken_for_endless_framing(
    hardened: Callable[..., Stack],
) -> None:
    """Chunk framing (size lines, CRLFs) is bounded per chunk and for the trailers,
    not summed over a whole upload: a client streaming 1 KiB pieces is no attacker."""
    stack = hardened()
    port = port_of(stack.gateway)
    piece = bytes(range(256)) * 4  # 1 KiB: 7 framing bytes a chunk ("400\r\n", "\r\n")
    count = 12 * 1024  # 12 MiB of body, 84 KiB of framing in all

    def body() -> Iterator[bytes]:  # httpx sends each piece as one chunk
        for _ in range(count):
            yield piece

    response = httpx.post(f"{stack.gateway}/health", content=body(), timeout=30)
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.json()["body_bytes"] == count * len(piece)
    assert refusals(stack) == {}

    # trailers that never end are still cut off
    head = b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    endless = push(
        port, head + b"1\r\na\r\n0\r\n", itertools.repeat(b"X-T: " + b"t" * 1000 + b"\r\n", 16384)
    )
    assert parse_reply(endless.answer).status == 431
    assert endless.write_error is not None


def test_two_workers_write_whole_audit_lines_to_one_pipe(hardened: Callable[..., Stack]) -> None:
    stack = hardened("--workers", "2", audit_path="-", kind=PipedTokengate)
    main = stack.main
    assert isinstance(main, PipedTokengate)
    port = port_of(stack.gateway)
    token = stack.token()
    total, threads = 600, 6

    def path(i: int) -> str:
        prefix = f"/orders/{i:04d}/" if i % 3 == 0 else f"/nope/{i:04d}/"
        if i % 5 == 4:
            return prefix + "short"
        return prefix + "p" * (3000 + (i * 7919) % 17000)  # 3,000 to 20,000 bytes

    statuses: dict[int, int] = {}

    def client(first: int) -> None:
        for i in range(first, total, threads):
            auth = (f"Authorization: Bearer {token}",) if i % 3 == 0 else ()
            statuses[i] = exchange(port, get(path(i), "x", *auth)).status

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert {i: s for i, s in statuses.items() if s != (200 if i % 3 == 0 else 404)} == {}

    def audited() -> int:
        return sum(b'"event":"gateway.request"' in line for line in list(main.lines))

    wait_for(lambda: audited() >= total, timeout=10)
    assert main.stop() == 0
    main.reader.join(timeout=5)
    assert not main.reader.is_alive()

    def whole(line: bytes) -> bool:
        with contextlib.suppress(ValueError):
            return line.endswith(b"\n") and isinstance(json.loads(line), dict)
        return False

    assert [line[:200] for line in main.lines if len(line) >= 4096] == []
    assert [line[:200] for line in main.lines if not whole(line)] == []  # none torn
    lines = [x for x in map(json.loads, main.lines) if x["event"] == "gateway.request"]
    assert len(lines) == total
    by_request = {int(x["path"].split("/")[2]): x for x in lines}
    assert sorted(by_request) == list(range(total))
    for i, line in by_request.items():
        sent = path(i)
        if line["path"] != sent:
            assert line["path"].endswith(TRUNCATED)
            assert sent.startswith(line["path"].removesuffix(TRUNCATED))
        if len(sent) >= 4096:
            assert line["path"].endswith(TRUNCATED), i
        assert line["status"] == statuses[i]
    assert sum(x["path"].endswith(TRUNCATED) for x in lines) > total // 2
    # both workers wrote: generated request ids start with a per-process prefix
    assert len({x["request_id"][:16] for x in lines}) == 2


def test_the_authserver_and_admin_listeners_have_the_same_limits(
    hardened: Callable[..., Stack],
) -> None:
    stack = hardened(
        authserver={"limits": {"max_header_bytes": 16384}},
        admin_limits={"header_timeout": "1s"},
    )
    auth_port, admin_port = port_of(stack.issuer), port_of(stack.admin)
    slow = socket.create_connection(("127.0.0.1", admin_port), timeout=5)
    with slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the end of it
        flood = flood_header(auth_port)
        assert parse_reply(flood.answer).status == 431
        big = get("/oauth2/default/.well-known/openid-configuration", "x", "X-Big: " + "b" * 20000)
        assert exchange(auth_port, big).status == 431  # its own 16 KiB, not the default 64
        fits = get("/oauth2/default/.well-known/openid-configuration", "x", "X-Ok: " + "b" * 8000)
        assert exchange(auth_port, fits).status == 200
        two_hosts = b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"
        answer = exchange(admin_port, two_hosts)
        assert answer.status == 400
        assert answer.json()["error_description"] == "more than one Host header"
        assert parse_reply(read_to_eof(slow)).status == 408
    stack.token()  # the authorization server still serves
    counts = refusals(stack)
    assert counts == {
        ("authserver", "header_too_large"): 2,
        ("admin", "bad_request"): 1,
        ("admin", "header_timeout"): 1,
    }
