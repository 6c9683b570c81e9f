"""What unauthenticated abuse costs a listener: header floods and half-open connections.

    python bench/listener_abuse.py [--source DIR]

Starts ``tokengate run`` (one process: the gateway with a public ``/health`` route to
the built-in echo upstream, and the admin listener), then, one scenario at a time:

1. **flood**: 4 connections each send a request head whose last header never ends,
   64 KiB at a time, up to 64 MiB each, while a probe GETs ``/health`` every 20 ms on
   new connections. Printed: what each flooder got back and how much the server took
   before it did, the server's peak RSS growth and CPU seconds, and the probe's
   latency (median and worst).
2. **whole**: one complete request with a 32 MiB header, sent at once.
3. **half-open**: 2,000 connections send a partial request head and 200 send
   nothing; after ``header_timeout`` + 2 s, how many the server still holds open, and
   the probe's latency meanwhile.
4. **pipelined**: 100 connections each write 250 KB of pipelined requests (to a path
   no route matches, so the gateway answers each itself) and never read the answers.
   Printed: the server's peak RSS growth and CPU seconds, and the probe's latency.

``--source DIR`` runs tokengate from another checkout (a ``git worktree`` of an older
commit, say), so the same attacks can be measured before and after a change in one
run of this script on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_issuance import cpu_seconds, free_port

MIB = 1024 * 1024
HEAD = b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Flood: "


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Probe:
    """GET /health on a new connection every ``interval`` s; keeps the latencies."""

    def __init__(self, url: str, interval: float = 0.02) -> None:
        self.url = url
        self.interval = interval
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                ok = httpx.get(self.url, timeout=30).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                self.latencies.append(time.monotonic() - started)
            else:
                self.failures += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.latencies:
            return f"no successful probe, {self.failures} failed"
        median = statistics.median(self.latencies) * 1000
        worst = max(self.latencies) * 1000
        return (
            f"{len(self.latencies)} probes: median {median:.1f} ms, worst {worst:.1f} ms, "
            f"{self.failures} failed"
        )


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = rss_kib(pid)
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(FileNotFoundError):
                self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def status_line(sock: socket.socket, timeout: float) -> str:
    """The status line the server sent, or what happened instead."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return "no answer"
    except OSError as exc:
        return type(exc).__name__
    return data.split(b"\r\n", 1)[0].decode("latin-1") if data else "closed"


def flood(port: int, limit: int, results: list[str], deadline: float) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sent = 0
    chunk = b"a" * (64 * 1024)
    try:
        sock.sendall(HEAD)
        while sent < limit and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
        outcome = status_line(sock, 5)
    except OSError as exc:
        outcome = status_line(sock, 5) if isinstance(exc, BrokenPipeError) else type(exc).__name__
    finally:
        sock.close()
    results.append(f"{outcome} after {sent / MIB:.2f} MiB sent")


def scenario_flood(port: int, pid: int, health: str) -> None:
    results: list[str] = []
    deadline = time.monotonic() + 60
    cpu_before = cpu_seconds([pid])
    with Probe(health) as probe, PeakRss(pid) as rss:
        threads = [
            threading.Thread(target=flood, args=(port, 64 * MIB, results, deadline))
            for _ in range(4)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        time.sleep(0.5)
    cpu = cpu_seconds([pid]) - cpu_before
    print(f"flood: 4 connections, {elapsed:.1f} s")
    for line in results:
        print(f"  {line}")
    print(f"  server RSS {rss.start // 1024} MiB -> peak {rss.peak // 1024} MiB, CPU {cpu:.2f} s")
    print(f"  /health meanwhile: {probe.summary()}")


def scenario_whole(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    try:
        sock.sendall(HEAD + b"a" * (32 * MIB) + b"\r\n\r\n")
        outcome = status_line(sock, 30)
    except OSError:
        outcome = status_line(sock, 5)
    finally:
        sock.close()
    print(f"whole 32 MiB header: {outcome} in {time.monotonic() - started:.2f} s")


@contextlib.contextmanager
def held(count: int, data: bytes, port: int) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            if data:
                sock.sendall(data)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def still_open(socks: list[socket.socket]) -> int:
    """Connections the server has neither answered nor closed."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    return len(socks) - len(poller.poll(0))


def scenario_half_open(port: int, pid: int, health: str, header_timeout: float) -> None:
    with Probe(health, interval=0.1) as probe:
        started = time.monotonic()
        with (
            held(2000, b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Part", port) as partial,
            held(200, b"", port) as silent,
        ):
            opened = time.monotonic() - started
            fds_during = len(os.listdir(f"/proc/{pid}/fd"))
            time.sleep(max(0.0, header_timeout + 2 - (time.monotonic() - started)))
            left = still_open(partial) + still_open(silent)
            time.sleep(3)  # refused connections linger up to 2 s for their answer to arrive
            fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    print(
        f"half-open: 2,000 partial heads + 200 silent connections, opened in {opened:.1f} s; "
        f"{left} still open after {header_timeout + 2:g} s; server fds {fds_during}, "
        f"{fds_after} 3 s later"
    )
    print(f"  /health meanwhile: {probe.summary()}")


def scenario_pipelined(port: int, pid: int, health: str) -> None:
    one = b"GET /nowhere HTTP/1.1\r\nHost: bench\r\n\r\n"
    burst = one * (250_000 // len(one))
    cpu_before = cpu_seconds([pid])
    socks = []
    with Probe(health) as probe, PeakRss(pid) as rss:
        for _ in range(100):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(burst)
            socks.append(sock)
        time.sleep(10)
        for sock in socks:
            sock.close()
        time.sleep(0.5)
    cpu = cpu_seconds([pid]) - cpu_before
    print(
        f"pipelined: 100 connections x {len(burst) // 1000} KB of pipelined requests, unread, "
        f"for 10 s: server RSS {rss.start // 1024} MiB -> peak {rss.peak // 1024} MiB, "
        f"CPU {cpu:.2f} s"
    )
    print(f"  /health meanwhile: {probe.summary()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--source", type=Path, help="run tokengate from this checkout")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gw, echo, admin = free_port(), free_port(), free_port()
    config = {
        "gateway": {
            "listen": f"127.0.0.1:{gw}",
            "routes": [
                {
                    "name": "health",
                    "match": {"path": "/health"},
                    "upstream": f"http://127.0.0.1:{echo}",
                    "public": True,
                }
            ],
        },
        "echo": {"listen": f"127.0.0.1:{echo}"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "audit": {"path": os.devnull},
    }
    env = dict(os.environ)
    if args.source is not None:
        env["PYTHONPATH"] = str(args.source.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokengate.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokengate", "run", "-c", str(path)],
            cwd=tmp,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200:
                        break
                time.sleep(0.1)
            health = f"http://127.0.0.1:{gw}/health"
            print(f"tokengate from {args.source or 'this checkout'} (pid {proc.pid})")
            scenario_flood(gw, proc.pid, health)
            scenario_whole(gw)
            scenario_half_open(gw, proc.pid, health, header_timeout=10)
            scenario_pipelined(gw, proc.pid, health)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
