"""Gateway overhead: one fast upstream, measured directly and through tokengate, in one run.

    python bench/gateway_overhead.py --workers 2

The upstream is nginx (Debian package ``nginx-light`` or ``nginx``) returning a small
body; the load generator is wrk (package ``wrk``). tokengate serves its
authorization server and the gateway; the gateway verifies a real RS256 access token
on every request (its verified-token cache skips the signature for repeats), checks a
scope, and streams to nginx. Printed: req/s, p50, p99 for both, the ratio, and the
gateway's CPU time per request (user + system of the tokengate processes over the
measured run, divided by the requests they served). The same is measured for
bench/bare_proxy.py, a uvicorn + aiohttp proxy with no checks at all, as a
reference point.

A second phase sends 10,000 requests whose tokens carry random unknown ``kid``s and
counts the JWKS fetches they cause (nginx serves the JWKS copy and logs each fetch).

``--redis URL`` adds a route with a rate limit per ``client_id`` kept in that Redis
(``1000000/s``: nothing is refused, every request runs the limit's script) and
measures it against the same route without a limit, alternating, through the same
gateway processes: what a Redis-backed route limit costs.

``--source DIR`` runs tokengate from another checkout (a ``git worktree`` of an older
commit), to compare two versions in alternating runs. tokengate runs in a scratch
directory either way: ``python -m`` puts the working directory first on ``sys.path``,
so a run started in a checkout would measure that checkout whatever ``PYTHONPATH``
says.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_issuance import cpu_seconds, family, free_port, parse_wrk

SECRET = "bench-secret-0123456789abcdefghijklmnopqrstuvwxyz"  # noqa: S105 - throwaway

NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = /jwks.json {{
            access_log {dir}/jwks-fetches.log;
            default_type application/json;
            add_header Cache-Control "max-age=300";
            alias {dir}/jwks.json;
        }}
        location / {{
            default_type text/plain;
            return 200 "hello from upstream\\n";
        }}
    }}
}}
"""

RANDOM_KID_LUA = """
local header_prefix = '{"alg":"RS256","typ":"at+jwt","kid":"'
local payload = "%s"
local charset = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
local function b64url(s)
  local b = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
  return ((s:gsub('.', function(x)
    local r, byte = '', x:byte()
    for i = 8, 1, -1 do r = r .. (byte %% 2 ^ i - byte %% 2 ^ (i - 1) > 0 and '1' or '0') end
    return r
  end) .. '0000'):gsub('%%d%%d%%d?%%d?%%d?%%d?', function(x)
    if (#x < 6) then return '' end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == '1' and 2 ^ (6 - i) or 0) end
    return b:sub(c + 1, c + 1)
  end))
end
request = function()
  local kid = ""
  for i = 1, 16 do
    local n = math.random(1, #charset)
    kid = kid .. charset:sub(n, n)
  end
  local token = b64url(header_prefix .. kid .. '"}') .. "." .. payload .. ".c2ln"
  return wrk.format("GET", "/api/x", {["Authorization"] = "Bearer " .. token})
end
"""


def wrk(url: str, args: argparse.Namespace, *extra: str, duration: int | None = None) -> str:
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration or args.duration}s",
        "--latency",
        *extra,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def wait_for(url: str, deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kid-requests", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating gateway/bare runs")
    parser.add_argument("--source", type=Path, help="run tokengate from this checkout")
    parser.add_argument("--redis", help="also measure a route rate-limited in this Redis")
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required: apt-get install {tool}")

    with tempfile.TemporaryDirectory(prefix="tokengate-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers serve the JWKS copy from here
        up_port, auth_port, gw_port = free_port(), free_port(), free_port()
        issuer = f"http://127.0.0.1:{auth_port}/oauth2/bench"
        (work / "nginx.conf").write_text(NGINX.format(dir=work, port=up_port))
        nginx = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf")])
        config = {
            "authserver": {
                "listen": f"127.0.0.1:{auth_port}",
                "data_dir": str(work / "data"),
                "servers": [{"name": "bench", "audience": "api://bench", "scopes": ["read"]}],
                "clients": [{"client_id": "bench", "secret": SECRET}],
            },
            "gateway": {
                "listen": f"127.0.0.1:{gw_port}",
                "issuers": [
                    {
                        "issuer": issuer,
                        "audiences": ["api://bench"],
                        "jwks_uri": f"http://127.0.0.1:{up_port}/jwks.json",
                    }
                ],
                "routes": [
                    {
                        "name": "api",
                        "match": {"path": "/api/**"},
                        "upstream": f"http://127.0.0.1:{up_port}",
                        "require": {"scopes": ["read"]},
                    },
                    {
                        "name": "limited",
                        "match": {"path": "/limited/**"},
                        "upstream": f"http://127.0.0.1:{up_port}",
                        "require": {"scopes": ["read"]},
                        "rate_limit": {"per": "client_id", "limit": "1000000/s"},
                    },
                ],
            },
            "audit": {"path": str(work / "audit.log")},
        }
        if args.redis:
            config["redis"] = args.redis
        (work / "tokengate.yaml").write_text(yaml.safe_dump(config))
        # The JWKS copy nginx serves must exist before the gateway starts: the
        # authorization server alone first (its first start creates the keys).
        tokengate = [sys.executable, "-m", "tokengate"]
        config_arg = ["-c", str(work / "tokengate.yaml")]
        env = dict(os.environ)
        if args.source is not None:
            env["PYTHONPATH"] = str(args.source.resolve())
        auth_only = subprocess.Popen(
            [*tokengate, "run", "--only", "authserver", *config_arg],
            stderr=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            cwd=work,
            env=env,
        )
        wait_for(f"{issuer}/v1/keys")
        (work / "jwks.json").write_text(httpx.get(f"{issuer}/v1/keys").text)
        (work / "jwks.json").chmod(0o644)
        auth_only.send_signal(signal.SIGTERM)
        auth_only.wait()

        server = subprocess.Popen(
            [*tokengate, "run", *config_arg, "--workers", str(args.workers)],
            stdout=subprocess.DEVNULL,
            stderr=(work / "tokengate.err").open("wb"),
            cwd=work,
            env=env,
        )
        try:
            wait_for(f"http://127.0.0.1:{up_port}/")
            wait_for(f"http://127.0.0.1:{gw_port}/api/x")
            token = httpx.post(
                f"{issuer}/v1/token",
                data={"grant_type": "client_credentials"},
                auth=("bench", SECRET),
            ).json()["access_token"]
            auth = ["-H", f"Authorization: Bearer {token}"]
            direct_url = f"http://127.0.0.1:{up_port}/api/x"
            gateway_url = f"http://127.0.0.1:{gw_port}/api/x"
            check = httpx.get(gateway_url, headers={"Authorization": f"Bearer {token}"})
            if check.status_code != 200:
                raise SystemExit(f"the gateway answered {check.status_code}: {check.text}")

            wrk(direct_url, args, duration=args.warmup)
            direct = parse_wrk(wrk(direct_url, args))
            wrk(gateway_url, args, *auth, duration=args.warmup)
            pids = family(server.pid)
            bare_proxy = _start_bare_proxy(args, up_port)
            rounds: list[tuple[dict[str, float], float, dict[str, float], float]] = []
            for _ in range(args.rounds):  # alternate, so both see the same noisy machine
                before = cpu_seconds(pids)
                through = parse_wrk(wrk(gateway_url, args, *auth))
                cpu_us = (cpu_seconds(pids) - before) / max(1, int(through["requests"])) * 1e6
                bare, bare_cpu = bare_proxy.measure()
                rounds.append((through, cpu_us, bare, bare_cpu))
            bare_proxy.stop()
            limited_rounds: list[tuple[dict[str, float], float, dict[str, float], float]] = []
            if args.redis:
                limited_url = f"http://127.0.0.1:{gw_port}/limited/x"
                wrk(limited_url, args, *auth, duration=args.warmup)
                for _ in range(args.rounds):  # alternate with the same route unlimited
                    plain, plain_cpu = _measure(gateway_url, args, auth, pids)
                    limited, limited_cpu = _measure(limited_url, args, auth, pids)
                    limited_rounds.append((plain, plain_cpu, limited, limited_cpu))

            # random unknown kids: a flood of them must not become a flood of JWKS fetches
            fetches_before = _count_lines(work / "jwks-fetches.log")
            payload = _b64(
                json.dumps({"iss": issuer, "aud": "api://bench", "exp": int(time.time()) + 600})
            )
            (work / "kids.lua").write_text(RANDOM_KID_LUA % payload)
            seconds = 1
            kid = parse_wrk(wrk(gateway_url, args, "-s", str(work / "kids.lua"), duration=seconds))
            while kid["requests"] < args.kid_requests and seconds < 60:
                seconds = max(
                    seconds + 1, int(seconds * args.kid_requests / max(1, kid["requests"])) + 1
                )
                kid = parse_wrk(
                    wrk(gateway_url, args, "-s", str(work / "kids.lua"), duration=seconds)
                )
            kid_fetches = _count_lines(work / "jwks-fetches.log") - fetches_before
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=30)

    print(
        f"workers={args.workers} connections={args.connections} threads={args.threads} "
        f"duration={args.duration}s rounds={args.rounds} (medians; every round listed below)"
    )
    print(
        f"direct   {direct['rps']:>9.0f} req/s  p50 {direct['p50_ms']:.2f} ms  "
        f"p99 {direct['p99_ms']:.2f} ms  non-2xx {direct['non_2xx']}"
    )
    g = {k: statistics.median(r[0][k] for r in rounds) for k in ("rps", "p50_ms", "p99_ms")}
    b = {k: statistics.median(r[2][k] for r in rounds) for k in ("rps", "p50_ms", "p99_ms")}
    g_cpu = statistics.median(r[1] for r in rounds)
    b_cpu = statistics.median(r[3] for r in rounds)
    print(
        f"gateway  {g['rps']:>9.0f} req/s  p50 {g['p50_ms']:.2f} ms  p99 {g['p99_ms']:.2f} ms  "
        f"gateway CPU {g_cpu:.0f} us/request  non-2xx {sum(r[0]['non_2xx'] for r in rounds)}"
    )
    print(
        f"bare     {b['rps']:>9.0f} req/s  p50 {b['p50_ms']:.2f} ms  p99 {b['p99_ms']:.2f} ms  "
        f"proxy CPU {b_cpu:.0f} us/request  (uvicorn + aiohttp, no checks)"
    )
    print(
        f"ratio    gateway/direct {g['rps'] / direct['rps']:.3f}, "
        f"gateway/bare {g['rps'] / b['rps']:.3f}"
    )
    for i, (through, cpu_us, bare, bare_cpu) in enumerate(rounds, 1):
        print(
            f"  round {i}: gateway {through['rps']:.0f} req/s {cpu_us:.0f} us, "
            f"bare {bare['rps']:.0f} req/s {bare_cpu:.0f} us"
        )
    if limited_rounds:
        p = statistics.median(r[0]["rps"] for r in limited_rounds)
        q = statistics.median(r[2]["rps"] for r in limited_rounds)
        print(
            f"redis rate limit: limited route {q:.0f} req/s against {p:.0f} unlimited "
            f"(ratio {q / p:.3f}; non-2xx {sum(r[2]['non_2xx'] for r in limited_rounds)})"
        )
        for i, (plain, plain_cpu, limited, limited_cpu) in enumerate(limited_rounds, 1):
            print(
                f"  round {i}: unlimited {plain['rps']:.0f} req/s {plain_cpu:.0f} us, "
                f"limited {limited['rps']:.0f} req/s {limited_cpu:.0f} us"
            )
    print(
        f"random kids: {int(kid['requests'])} requests with unknown kids -> "
        f"{kid_fetches} JWKS fetches (non-2xx {kid['non_2xx']}, expected all 401)"
    )


def _measure(
    url: str, args: argparse.Namespace, auth: list[str], pids: list[int]
) -> tuple[dict[str, float], float]:
    """wrk against ``url``: its figures, and tokengate's CPU per request (us)."""
    before = cpu_seconds(pids)
    result = parse_wrk(wrk(url, args, *auth))
    return result, (cpu_seconds(pids) - before) / max(1, int(result["requests"])) * 1e6


class _start_bare_proxy:
    """bench/bare_proxy.py with the same worker count, measured on demand."""

    def __init__(self, args: argparse.Namespace, up_port: int) -> None:
        self.args = args
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/api/x"
        here = str(Path(__file__).parent)
        command = [sys.executable, "-m", "uvicorn", "bare_proxy:app", "--app-dir", here]
        command += ["--port", str(port), "--workers", str(args.workers), "--http", "httptools"]
        command += ["--loop", "uvloop", "--no-access-log", "--no-proxy-headers"]
        self.proc = subprocess.Popen(
            [*command, "--log-level", "warning"],
            env={**os.environ, "BARE_PROXY_UPSTREAM": f"http://127.0.0.1:{up_port}"},
        )
        wait_for(self.url)
        time.sleep(1)  # every worker up
        wrk(self.url, args, duration=args.warmup)
        self.pids = family(self.proc.pid)

    def measure(self) -> tuple[dict[str, float], float]:
        before = cpu_seconds(self.pids)
        result = parse_wrk(wrk(self.url, self.args))
        cpu = cpu_seconds(self.pids) - before
        return result, cpu / max(1, int(result["requests"])) * 1e6

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _b64(text: str) -> str:
    import base64

    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


if __name__ == "__main__":
    main()
