"""Revocation reaching the gateways: from a revoke to every gateway worker refusing the token.

    python bench/revocation_delay.py --rounds 50
    python bench/revocation_delay.py --store postgresql://postgres@127.0.0.1:5432/test

Starts an authorization server (``tokengate run --only authserver``) and a gateway
with 2 workers (``tokengate run --only gateway --workers 2``, the echo upstream in
the same process) that follows the authorization server's revocation feed, each on
free loopback ports with a throwaway config in a scratch directory. Then, each round:

1. gets a new client-credentials token;
2. warms it on both gateway workers: requests, each on a new connection, until both
   workers have answered 200 (so both hold it in their verified-token cache);
3. revokes it at ``/v1/revoke`` and, from the revoke's answer on, sends a request on a
   new connection every 10 ms until both workers have answered 401; the delay is the
   time from the revoke's answer to the answer that completed the pair;
4. checks that a further 8 requests are all refused.

Which worker answered is read from /proc: the gateway worker holding the accepted
socket of the connection (Linux, same user). Printed: p50, p90, p99 and max of the
delays in ms (and p50, p99 of the delay to the first worker's refusal), and the
command line. The delays include the 10 ms poll spacing: a refusal is seen up to
10 ms (more on a busy machine) after it starts.

``--store URL`` runs the authorization server on PostgreSQL: the run creates a schema
of its own in that database (dropped at the end) and a random key_encryption_key.
``--auth-workers N`` runs the authorization server with N workers: a feed request
held by one worker hears of a revocation made in another at its next store check
(every 0.5 s), as it would of one made at another replica. Each revoke goes on a new
connection, so any worker may take it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import secrets
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_issuance import free_port, percentile

SECRET = "bench-secret-0123456789abcdefghijklmnopqrstuvwxyz"  # noqa: S105 - throwaway
FEED_SECRET = "bench-feed-secret-0123456789abcdefghijklmnopqrst"  # noqa: S105 - throwaway
POLL_EVERY = 0.010  # seconds between polls after the revoke
CONFIRM = 8  # requests after the pair: all must be refused
GIVE_UP = 10.0  # seconds a round may wait for the refusals


class Process:
    def __init__(self, workdir: Path, name: str, config: dict[str, Any], *args: str) -> None:
        self.workdir = workdir / name
        self.workdir.mkdir()
        self.config_path = self.workdir / "tokengate.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.stderr_path = self.workdir / "stderr.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokengate", "run", "-c", str(self.config_path), *args],
            cwd=self.workdir,  # not a checkout: python -m imports the installed tokengate
            stdout=subprocess.DEVNULL,
            stderr=self.stderr_path.open("wb"),
        )

    def wait_ready(self, url: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"tokengate exited; see {self.stderr_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise SystemExit(f"tokengate did not become ready; see {self.stderr_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()  # not the resource tracker
    ]


def accepted_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the loopback connection from ``client_port``."""
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote and fields[9] != "0":
            return fields[9]
    return None


def owner(inode: str, pids: list[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


class Gateway:
    def __init__(self, port: int, workers: list[int]) -> None:
        self.port = port
        self.workers = workers

    def ask(self, token: str) -> tuple[int, float, int | None]:
        """One GET on a new connection: (status, when it was answered, the worker that
        answered it)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/orders/1", headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            answered = time.monotonic()
            client_port = conn.sock.getsockname()[1]
            inode = accepted_inode(self.port, client_port)
            worker = owner(inode, self.workers) if inode else None
            # closed with a reset: no TIME_WAIT entries pile up in /proc/net/tcp
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return response.status, answered, worker
        finally:
            conn.close()


def fresh_schema(url: str) -> Iterator[str]:
    import psycopg

    schema = f"tg_bench_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"
    finally:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def run(
    args: argparse.Namespace, workdir: Path, store: str | None
) -> list[tuple[float, float, str]]:
    auth_port, auth_admin = free_port(), free_port()
    gw_port, gw_admin, echo_port = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{auth_port}/oauth2/bench"
    authserver: dict[str, Any] = {
        "listen": f"127.0.0.1:{auth_port}",
        "data_dir": str(workdir / "auth-data"),
        "servers": [
            {
                "name": "bench",
                "audience": "api://bench",
                "access_token_ttl": "10m",
                "scopes": ["orders:read"],
            }
        ],
        "clients": [
            {"client_id": "bench", "secret": SECRET, "scopes": ["orders:read"]},
            {"client_id": "gateway", "secret": FEED_SECRET, "introspect": "any"},
        ],
    }
    if store is not None:
        authserver["store"] = store
        authserver["key_encryption_key"] = base64.b64encode(secrets.token_bytes(32)).decode()
    auth_config = {
        "authserver": authserver,
        "admin": {"listen": f"127.0.0.1:{auth_admin}"},
        "audit": {"path": str(workdir / "auth-audit.log")},
    }
    gw_config = {
        "gateway": {
            "listen": f"127.0.0.1:{gw_port}",
            "issuers": [
                {
                    "issuer": issuer,
                    "audiences": ["api://bench"],
                    "revocations": {"client_id": "gateway", "secret": FEED_SECRET},
                }
            ],
            "routes": [
                {
                    "name": "orders",
                    "match": {"path": "/orders/**"},
                    "upstream": f"http://127.0.0.1:{echo_port}",
                    "require": {"scopes": ["orders:read"]},
                }
            ],
        },
        "echo": {"listen": f"127.0.0.1:{echo_port}"},
        "admin": {"listen": f"127.0.0.1:{gw_admin}"},
        "audit": {"path": str(workdir / "gw-audit.log")},
    }
    auth = Process(
        workdir, "auth", auth_config, "--only", "authserver", "--workers", str(args.auth_workers)
    )
    gw: Process | None = None
    try:
        auth.wait_ready(f"http://127.0.0.1:{auth_admin}/readyz")
        gw = Process(workdir, "gw", gw_config, "--only", "gateway", "--workers", "2")
        gw.wait_ready(f"http://127.0.0.1:{gw_admin}/readyz")
        workers = worker_pids(gw.proc.pid)
        if len(workers) != 2:
            raise SystemExit(f"expected 2 gateway workers, found {workers}")
        gateway = Gateway(gw_port, workers)
        delays: list[tuple[float, float, str]] = []
        with httpx.Client(timeout=10) as client:
            for n in range(args.rounds):
                delays.append(one_round(client, issuer, gateway))
                if args.verbose:
                    first, both, trace = delays[-1]
                    print(
                        f"round {n + 1}: first worker {first * 1000:.1f} ms, "
                        f"both {both * 1000:.1f} ms, polls {trace}",
                        flush=True,
                    )
        return delays
    finally:
        for process in (gw, auth):
            if process is not None:
                process.stop()


def one_round(client: httpx.Client, issuer: str, gateway: Gateway) -> tuple[float, float, str]:
    """(seconds to the first worker's refusal, seconds to both workers', the polls: a
    letter per poll for the worker that answered it, capital for a refusal)"""
    response = client.post(
        f"{issuer}/v1/token", data={"grant_type": "client_credentials"}, auth=("bench", SECRET)
    )
    response.raise_for_status()
    token = response.json()["access_token"]

    warmed: set[int] = set()
    for _ in range(200):
        status, _, worker = gateway.ask(token)
        if status != 200:
            raise SystemExit(f"a fresh token was answered {status}")
        if worker is not None:
            warmed.add(worker)
        if warmed == set(gateway.workers):
            break
    else:
        raise SystemExit(f"200 requests reached only workers {sorted(warmed)}")

    # a new connection: with several authorization-server workers, any of them may
    # take the revoke, as any replica behind a load balancer would
    response = httpx.post(
        f"{issuer}/v1/revoke", data={"token": token}, auth=("bench", SECRET), timeout=10
    )
    response.raise_for_status()
    revoked_at = time.monotonic()
    refused: set[int] = set()
    first: float | None = None
    polls = 0
    trace = ""
    while True:
        if time.monotonic() - revoked_at > GIVE_UP:
            raise SystemExit(f"after {GIVE_UP} s only workers {sorted(refused)} refuse the token")
        status, answered, worker = gateway.ask(token)
        polls += 1
        letter = "ab"[gateway.workers.index(worker)] if worker is not None else "?"
        trace += letter.upper() if status == 401 else letter
        if status == 401 and worker is not None:
            first = answered if first is None else first
            refused.add(worker)
            if refused == set(gateway.workers):
                break
        elif status not in (200, 401):
            raise SystemExit(f"unexpected status {status}")
        # polls start every 10 ms (at once if the last one took longer)
        time.sleep(max(0.0, revoked_at + polls * POLL_EVERY - time.monotonic()))
    delay = answered - revoked_at
    confirm = [gateway.ask(token)[0] for _ in range(CONFIRM)]
    if set(confirm) != {401}:
        raise SystemExit(f"a revoked token was answered {confirm} after both workers refused it")
    assert first is not None
    return first - revoked_at, delay, trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument(
        "--store", help="postgresql://... : the authorization server's store (default SQLite)"
    )
    parser.add_argument("--auth-workers", type=int, default=1, help="authorization server workers")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print each round's delays and polls (a letter per worker, capital: refused)",
    )
    args = parser.parse_args()
    command = shlex.join(["python", "bench/revocation_delay.py", *sys.argv[1:]])
    # SIGTERM unwinds too: the servers stop and the PostgreSQL schema is dropped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="tokengate-bench-") as tmp:
        if args.store:
            schemas = fresh_schema(args.store)
            try:
                delays = run(args, Path(tmp), next(schemas))
            finally:
                next(schemas, None)  # drops the schema
        else:
            delays = run(args, Path(tmp), None)
    ms = [both * 1000 for _, both, _ in delays]
    first_ms = [first * 1000 for first, _, _ in delays]
    result = {
        "store": "postgresql" if args.store else "sqlite",
        "auth_workers": args.auth_workers,
        "rounds": len(ms),
        "p50_ms": round(percentile(ms, 50), 1),
        "p90_ms": round(percentile(ms, 90), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
        "first_worker_p50_ms": round(percentile(first_ms, 50), 1),
        "first_worker_p99_ms": round(percentile(first_ms, 99), 1),
        "command": command,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"revoke to refusal on both gateway workers, {result['rounds']} rounds, "
            f"{result['store']} store, {args.auth_workers} authserver worker(s): "
            f"p50 {result['p50_ms']} ms  p90 {result['p90_ms']} ms  "
            f"p99 {result['p99_ms']} ms  max {result['max_ms']} ms  "
            f"(first worker: p50 {result['first_worker_p50_ms']} ms, "
            f"p99 {result['first_worker_p99_ms']} ms)"
        )
        print(f"command: {command}")


if __name__ == "__main__":
    main()
