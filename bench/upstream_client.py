"""Upstream client cost: aiohttp's ClientSession against tokengate's own client, in one run.

    python bench/upstream_client.py

Both send the same GET with the headers the gateway adds, from 64 concurrent tasks in
one uvloop process, to nginx (Debian package ``nginx-light`` or ``nginx``) answering a
20-byte body, and read the whole response. Printed: CPU time of this process per
request (user + system; nginx runs in its own process) for each client, alternating
over several rounds, and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import NGINX
from token_issuance import free_port

from gateway.upstream import Origin, UpstreamClient

HEADERS = [
    (b"user-agent", b"wrk"),
    (b"accept", b"*/*"),
    (b"x-request-id", b"5f0c1d2e3a4b5c6d00000001"),
    (b"x-forwarded-for", b"127.0.0.1"),
    (b"x-forwarded-proto", b"http"),
    (b"x-forwarded-host", b"127.0.0.1:8080"),
    (b"x-auth-subject", b"bench"),
    (b"x-auth-client-id", b"bench"),
    (b"x-auth-scopes", b"read"),
    (b"x-auth-issuer", b"http://127.0.0.1:9000/oauth2/bench"),
]


async def measure(one: Callable[[], Awaitable[None]], requests: int, tasks: int) -> float:
    """CPU microseconds per request of ``requests`` calls spread over ``tasks`` tasks."""

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    await asyncio.gather(*(worker(50) for _ in range(tasks)))  # warm the pool
    each = requests // tasks
    before = time.process_time()
    await asyncio.gather(*(worker(each) for _ in range(tasks)))
    return (time.process_time() - before) / (each * tasks) * 1e6


async def run(port: int, args: argparse.Namespace) -> dict[str, list[float]]:
    base = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30),
    )
    url = URL(base + "/api/x", encoded=True)
    str_headers = [(k.decode(), v.decode()) for k, v in HEADERS]

    async def with_aiohttp() -> None:
        response = await session.request("GET", url, headers=str_headers, allow_redirects=False)
        async for _ in response.content.iter_any():
            pass
        response.release()

    client = UpstreamClient()
    origin = Origin.of(base)

    async def with_tokengate() -> None:
        response = await client.request(origin, "GET", b"/api/x", HEADERS, stall_timeout=30)
        while not (await response.next_chunk())[1]:
            pass
        response.release()

    results: dict[str, list[float]] = {"aiohttp": [], "tokengate": []}
    for _ in range(args.rounds):
        results["aiohttp"].append(await measure(with_aiohttp, args.requests, args.tasks))
        results["tokengate"].append(await measure(with_tokengate, args.requests, args.tasks))
    await session.close()
    await client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="per client and round")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is required: apt-get install nginx-light")
    with tempfile.TemporaryDirectory(prefix="tokengate-bench-") as tmp:
        port = free_port()
        (Path(tmp) / "nginx.conf").write_text(NGINX.format(dir=tmp, port=port))
        nginx = subprocess.Popen(["nginx", "-c", str(Path(tmp) / "nginx.conf")])
        try:
            time.sleep(0.5)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                results = runner.run(run(port, args))
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=30)
    print(f"{args.requests} GETs per client and round, {args.tasks} tasks, {args.rounds} rounds")
    for name, rounds in results.items():
        listed = ", ".join(f"{us:.0f}" for us in rounds)
        print(f"{name:10s} {statistics.median(rounds):6.1f} us CPU/request (rounds: {listed})")
    ratio = statistics.median(results["aiohttp"]) / statistics.median(results["tokengate"])
    print(f"aiohttp / tokengate: {ratio:.1f}x")


if __name__ == "__main__":
    main()
