"""Token issuance over real sockets: client_credentials tokens/s, p50/p99, CPU per token.

Starts ``tokengate run --workers N`` on a throwaway config and data dir, drives the
token endpoint with wrk (Debian package ``wrk``; HTTP Basic client auth, one new
signed JWT per request), and prints one result line per algorithm.

    python bench/token_issuance.py --workers 2 --alg RS256 --alg ES256

wrk, the server and its workers share the machine: on 2 cores the load generator
takes part of the CPU the workers could otherwise use.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jwt
import yaml

SECRET = "bench-secret-0123456789abcdefghijklmnopqrstuvwxyz"  # noqa: S105 - throwaway
LUA = """
wrk.method = "POST"
wrk.body = "grant_type=client_credentials"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic {basic}"
"""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes, from /proc."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def family(root: int) -> list[int]:
    """``root`` and its child processes (the workers)."""
    pids = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == root:
                pids.append(int(entry.name))
    return pids


def parse_wrk(output: str) -> dict[str, float]:
    def duration(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = duration(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = duration(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "requests": total,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "none",  # type: ignore[dict-item]
    }


def run_one(alg: str, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/oauth2/bench"
    config = {
        "authserver": {
            "listen": f"127.0.0.1:{port}",
            "data_dir": str(workdir / f"data-{alg}"),
            "servers": [
                {"name": "bench", "audience": "api://bench", "signing_alg": alg, "scopes": ["a"]}
            ],
            "clients": [{"client_id": "bench", "secret": SECRET}],
        },
        "audit": {"path": str(workdir / f"audit-{alg}.log")},
    }
    if args.redis:  # the failed-authentication throttle (and any limits) through Redis
        config["redis"] = args.redis
    config_path = workdir / f"tokengate-{alg}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    workers = ["--workers", str(args.workers)]
    server = subprocess.Popen(
        [sys.executable, "-m", "tokengate", "run", "-c", str(config_path), *workers],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / f"stderr-{alg}.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{issuer}/v1/keys", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"tokengate did not start; see {workdir}/stderr-{alg}.log")
            time.sleep(0.1)
        # sanity: the token verifies against the published JWKS
        token = httpx.post(
            f"{issuer}/v1/token",
            data={"grant_type": "client_credentials"},
            auth=("bench", SECRET),
        ).json()["access_token"]
        jwks = jwt.PyJWKClient(f"{issuer}/v1/keys").get_signing_key_from_jwt(token)
        jwt.decode(token, jwks.key, algorithms=[alg], audience="api://bench")

        basic = base64.b64encode(f"bench:{SECRET}".encode()).decode()
        script = workdir / "token.lua"
        script.write_text(LUA.format(basic=basic))
        wrk = [
            "wrk",
            f"-t{args.threads}",
            f"-c{args.connections}",
            "--latency",
            "-s",
            str(script),
            f"{issuer}/v1/token",
        ]
        subprocess.run([*wrk[:1], f"-d{args.warmup}s", *wrk[1:]], capture_output=True, check=True)
        pids = family(server.pid)
        cpu_before = cpu_seconds(pids)
        out = subprocess.run(
            [*wrk[:1], f"-d{args.duration}s", *wrk[1:]], capture_output=True, text=True, check=True
        ).stdout
        cpu = cpu_seconds(pids) - cpu_before
        result = parse_wrk(out)
        return {
            "alg": alg,
            "workers": args.workers,
            "connections": args.connections,
            "redis": bool(args.redis),
            **result,
            "server_cpu_us_per_token": round(cpu / max(1, int(result["requests"])) * 1e6, 1),
        }
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alg", action="append", choices=["RS256", "PS256", "ES256", "EdDSA"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--duration", type=int, default=10, help="seconds measured")
    parser.add_argument("--warmup", type=int, default=3, help="seconds before measuring")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--redis", metavar="URL", help="serve with redis: URL (shared throttle and limits)"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is required: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="tokengate-bench-") as tmp:
        for alg in args.alg or ["RS256", "ES256"]:
            result = run_one(alg, args, Path(tmp))
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(
                    f"{result['alg']:<6} workers={result['workers']} "
                    f"connections={result['connections']}  "
                    f"{result['rps']:>8.0f} tokens/s  p50 {result['p50_ms']:.2f} ms  "
                    f"p99 {result['p99_ms']:.2f} ms  "
                    f"server CPU {result['server_cpu_us_per_token']} us/token  "
                    f"non-2xx {result['non_2xx']}  socket errors: {result['socket_errors']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
